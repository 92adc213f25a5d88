"""MLflow: metrics, the full config as params, tags, provenance, plots and checkpoints, in one embedded database.

By default every run of a runs folder logs into ``sqlite:///<runs_dir>/mlflow.db`` (one database for all runs, as
MLflow expects), so ``mlflow ui --backend-store-uri sqlite:///lightning_logs/mlflow.db`` shows them all; artifacts
go to ``<runs_dir>/mlflow-artifacts/`` beside it (MLflow puts a run's artifacts under its experiment's artifact
root, not where the run's other files are). ``MLFLOW_TRACKING_URI`` or ``tracking_uri`` points it at a
PostgreSQL database or a tracking server instead. The MLflow run id is kept in the run directory
(``.mlflow_run_id``), so ``validate``/``test --ckpt_path`` and a resumed fit continue the same MLflow run.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

from pytorch_lightning.loggers import MLFlowLogger as LightningMLFlowLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from mnist_dlops.errors import ConfigError, UserError
from mnist_dlops.trackers.base import Tracker, flatten
from mnist_dlops.trust import TRACKING_SCHEMES, check_url, redact
from mnist_dlops.writeguard import allow_writes

RUN_ID_FILE = ".mlflow_run_id"
# MLflow's limits on a param (mlflow.utils.validation): longer keys are refused, longer values too.
MAX_KEY, MAX_VALUE = 250, 6000


@contextmanager
def _creating(uri: str) -> Iterator[None]:
    """One process at a time opens a new SQLite store: MLflow creates its tables on first use, and two runs
    started at the same instant would both run the migrations (and one fails)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def store_uri(runs_dir: Path, tracking_uri: Optional[str] = None) -> str:
    """Where MLflow keeps runs and models: ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else one SQLite database
    for the whole runs folder."""
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):  # checked before SQLAlchemy imports its driver by name
        key = "tracking_uri" if tracking_uri else "MLFLOW_TRACKING_URI"
        return check_url(key, tracking_uri or os.environ["MLFLOW_TRACKING_URI"], TRACKING_SCHEMES)
    return f"sqlite:///{runs_dir.resolve() / 'mlflow.db'}"


def store_client(uri: str) -> Any:
    """A client of the store at ``uri``, for runs and models. Never ``mlflow.set_tracking_uri``: it also sets
    ``MLFLOW_TRACKING_URI`` in the process environment, and every later run in the process would log into it."""
    import mlflow

    allow_store_writes(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def allow_store_writes(uri: str) -> None:
    """A command opens its MLflow store by design: a local one's database, lock and artifacts may be written."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        for path in (db, db.with_name(db.name + ".lock"), db.with_name(db.name + "-journal"), db.parent / "mlflow-artifacts"):
            allow_writes(path, "the MLflow store")
    elif "://" not in uri or uri.startswith("file:"):
        allow_writes(uri.removeprefix("file://"), "the MLflow store")


def artifact_root(runs_dir: Path, uri: str) -> Optional[str]:
    """Where a new experiment keeps its artifacts: beside a local database; a server's or PostgreSQL's own default
    otherwise."""
    return (runs_dir.resolve() / "mlflow-artifacts").as_uri() if uri.startswith("sqlite:") else None


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
        uri = store_uri(runs_dir, tracking_uri)
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


# The store itself, for the registry's commands, the promotion gate and the server: a client, and its failures
# (locked, full, read-only, unreachable) as one line.
class RegistryError(UserError):
    """MLflow refused an operation on the store (a locked or read-only database, a missing version...)."""


def open_client(runs_dir: str, tracking_uri: Optional[str]) -> Any:
    """A client of the runs folder's store, or of ``tracking_uri``'s (the registry's commands and the server)."""
    return store_client(store_uri(Path(runs_dir), tracking_uri))


def store_errors() -> tuple[type[BaseException], ...]:
    """What a failing store raises: MLflow's error, SQLAlchemy's (a locked SQLite database surfaces raw), OSError."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return MlflowException, SQLAlchemyError, OSError


@contextmanager
def store(what: str) -> Iterator[None]:
    """Turn a failing store (locked, full, read-only, unreachable) into one RegistryError line saying what was being
    done and the database's own reason."""
    try:
        yield
    except store_errors() as err:
        raise store_error(what, err) from None


def store_error(what: str, err: BaseException) -> RegistryError:
    """The driver's error under MLflow's and SQLAlchemy's wrappers (``attempt to write a readonly database``)."""
    seen: set[int] = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "orig", None) or err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    text = str(getattr(err, "message", None) or err).strip().splitlines()
    return RegistryError(redact(f"{what}: {text[0] if text else type(err).__name__}"))


def check_name(client: Any, name: str) -> bool:
    """Whether ``name`` exists already; a name MLflow refuses, or one that MLflow's own search filters cannot quote
    (``registry list`` would fail for every model), is a ConfigError naming it."""
    from mlflow.exceptions import MlflowException

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"name={name!r}: use letters, digits, '_', '-' and '.'")
    try:
        client.get_registered_model(name)
        return True
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        if err.error_code == "INVALID_PARAMETER_VALUE":
            raise ConfigError(f"name={name!r}: {str(err.message).splitlines()[0]}") from None
        raise store_error(f"registry {client.tracking_uri}", err) from None
