"""MLflow: metrics, the config as params, tags, provenance, plots and checkpoints, in the runs folder's database."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Union

from filelock import FileLock
from pytorch_lightning.loggers import MLFlowLogger as LightningMLFlowLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from mnist_dlops.trackers.base import Tracker, flatten
from mnist_dlops.trackers.mlflow_store import RUN_ID_FILE, artifact_root, mlflow_uri

# MLflow's limits on a param (mlflow.utils.validation): longer keys are refused, longer values too.
MAX_KEY, MAX_VALUE = 250, 6000


def _creating(uri: str) -> Any:
    """One process at a time opens a new SQLite store: MLflow creates its tables on first use, and two runs
    started at the same instant would both run the migrations (and one fails)."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    lock = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(lock)


class MLflowLogger(LightningMLFlowLogger, Tracker):
    """Lightning's MLflow logger, writing to the runs folder's database, continuing its run across stages."""

    def __init__(
        self,
        experiment_name: str = "mnist-dlops",
        tracking_uri: Optional[str] = None,
        save_dir: Optional[str] = None,
        run_name: Optional[str] = None,
        log_checkpoints: bool = True,
    ) -> None:
        """
        Args:
            experiment_name: The MLflow experiment the runs belong to.
            tracking_uri: Where MLflow keeps runs; null: ``MLFLOW_TRACKING_URI`` if set, else
                ``sqlite:///<runs_dir>/mlflow.db``.
            save_dir: This run's directory (null: set by the CLI; ``lightning_logs`` outside it).
            run_name: Display name of the MLflow run (default: the run folder's name).
            log_checkpoints: Log the best and the last checkpoint as artifacts when the stage ends.
        """
        self.run_dir = Path(save_dir) if save_dir is not None else Path("lightning_logs")
        runs_dir = self.run_dir.resolve().parent if save_dir is not None else self.run_dir.resolve()
        uri = mlflow_uri(runs_dir, tracking_uri)
        id_file = self.run_dir / RUN_ID_FILE
        with _creating(uri):
            super().__init__(
                experiment_name=experiment_name,
                run_name=run_name or self.run_dir.name,
                tracking_uri=uri,
                # Used only when the experiment is created: its artifacts' root, beside the database when local.
                artifact_location=artifact_root(runs_dir, uri),
                run_id=id_file.read_text().strip() if id_file.is_file() else None,
                log_model=False,  # checkpoints are logged once, at the end (below), not at every save
            )
            # The experiment and run are created now, under the lock: two runs starting at once would both try.
            run_id = self.run_id
        # Kept in the run directory once, so that later stages of this run continue the same MLflow run.
        if run_id and self.run_dir.is_dir() and not id_file.is_file():
            id_file.write_text(run_id)
        self._log_checkpoints = log_checkpoints
        self._saved_by: Any = None

    @rank_zero_only
    def log_hyperparams(self, params: Union[dict[str, Any], Any]) -> None:
        """The whole config as params, nested keys joined with ``/``; a value longer than MLflow allows is cut, with
        a ``...[cut]`` mark, rather than refused."""
        from mlflow.entities import Param

        params = params if isinstance(params, dict) else vars(params)
        flat = {key: str(value) for key, value in flatten(params).items()}
        existing = self.experiment.get_run(self.run_id).data.params
        batch = [
            Param(key[:MAX_KEY], value if len(value) <= MAX_VALUE else value[: MAX_VALUE - 8] + "...[cut]")
            for key, value in flat.items()
            if existing.get(key[:MAX_KEY]) is None  # MLflow refuses to change a param: a later stage keeps the fit's
        ]
        for i in range(0, len(batch), 100):  # MLflow's limit per call
            self.experiment.log_batch(self.run_id, params=batch[i : i + 100])

    @rank_zero_only
    def log_image(self, key: str, images: list[Any], step: Optional[int] = None) -> None:
        """The diagnostics' plots as image artifacts, ``plots/<key>/step_<step>.png``."""
        import numpy as np

        for i, image in enumerate(images):
            name = f"plots/{key}{'' if i == 0 else f'-{i}'}/step_{step or 0:06d}.png"
            self.experiment.log_image(self.run_id, np.asarray(image), artifact_file=name)

    @rank_zero_only
    def tag_run(self, tags: list[str], note: Optional[str]) -> None:
        """``--run.tags`` as MLflow tags (``tag.<name>``), ``--run.note`` as the run's description."""
        for tag in tags:
            self.experiment.set_tag(self.run_id, f"tag.{tag}", "true")
        if note:
            self.experiment.set_tag(self.run_id, "mlflow.note.content", note)

    @rank_zero_only
    def log_run_end(self, end: dict[str, Any]) -> None:
        for key, value in end.items():
            self.experiment.set_tag(self.run_id, f"provenance.{key}", str(value))

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._saved_by = checkpoint_callback  # logged once, when the stage ends

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Log the best and the last checkpoint and the run's provenance files as artifacts; end the run."""
        callback = self._saved_by
        if self._log_checkpoints and callback is not None:
            for path in {callback.best_model_path, getattr(callback, "last_model_path", "")}:
                if path and Path(path).is_file():
                    self.experiment.log_artifact(self.run_id, path, "checkpoints")
        for record in sorted(self.run_dir.glob("provenance*.yaml")) + sorted(self.run_dir.glob("config*.yaml")):
            self.experiment.log_artifact(self.run_id, str(record), "run")
        super().finalize(status)
