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
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

from pytorch_lightning.loggers.logger import Logger, rank_zero_experiment
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from mnist_dlops.trackers.base import Tracker

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
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_dir.resolve() / 'mlflow.db'}"


def artifact_root(runs_dir: Path, uri: str) -> Optional[str]:
    """Where a new experiment keeps its artifacts: beside a local database; a server's or PostgreSQL's own default
    otherwise."""
    return (runs_dir.resolve() / "mlflow-artifacts").as_uri() if uri.startswith("sqlite:") else None


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{path}/"))
        else:
            flat[path] = str(value)
    return flat


class _Client:
    """The logger's ``MlflowClient``, usable at once: an attribute read waits until the logger's thread has opened
    the store and the run (Lightning reads ``logger.experiment`` before a stage starts, and must not wait)."""

    def __init__(self, logger: MLflowLogger) -> None:
        self._logger = logger

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger._opened(), name)


class MLflowLogger(Logger, Tracker):
    """MLflow tracking into the runs folder's database, continuing its run across stages.

    Everything MLflow does runs on a thread of this logger's own, in call order: importing MLflow and opening its
    store take seconds, and each write a few milliseconds, which would otherwise add to the run; on that thread they
    overlap the training. ``finalize`` waits for the last write; an MLflow error is raised in the training thread at
    the next call.
    """

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
        super().__init__()
        self.run_dir = Path(save_dir) if save_dir is not None else Path("lightning_logs")
        runs_dir = self.run_dir.resolve().parent if save_dir is not None else self.run_dir.resolve()
        self._uri = store_uri(runs_dir, tracking_uri)
        self._artifact_location = artifact_root(runs_dir, self._uri)
        self._experiment_name, self._run_name = experiment_name, run_name or self.run_dir.name
        id_file = self.run_dir / RUN_ID_FILE
        self._run_id: Optional[str] = id_file.read_text().strip() if id_file.is_file() else None
        self._log_checkpoints = log_checkpoints
        self._checkpoint_callback: Any = None
        self._client: Any = None
        self._error: Optional[BaseException] = None
        self._ready = threading.Event()
        self._calls: queue.SimpleQueue[Optional[Callable[[], None]]] = queue.SimpleQueue()
        self._worker: Optional[threading.Thread] = None
        if rank_zero_only.rank == 0:  # the other processes of a DDP run log nothing
            self._worker = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        """The logger's thread: open the store and the run, then make the queued calls in order."""
        try:
            self._open()
        except BaseException as err:  # handed to the training thread (_submit, finalize, experiment)
            self._error = err
        finally:
            self._ready.set()
        while (call := self._calls.get()) is not None:
            if self._error is None:
                try:
                    call()
                except BaseException as err:
                    self._error = err

    def _open(self) -> None:
        from mlflow.tracking import MlflowClient
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        # An explicit client: mlflow.set_tracking_uri would also set MLFLOW_TRACKING_URI for the whole process.
        with _creating(self._uri):  # the experiment and run are created under the lock: two runs may start at once
            client = MlflowClient(tracking_uri=self._uri)
            if self._run_id is None:
                experiment = client.get_experiment_by_name(self._experiment_name)
                experiment_id = (
                    experiment.experiment_id
                    if experiment is not None
                    else client.create_experiment(self._experiment_name, artifact_location=self._artifact_location)
                )
                run = client.create_run(experiment_id, tags=resolve_tags({MLFLOW_RUN_NAME: self._run_name}))
                self._run_id = run.info.run_id
                # Kept in the run directory, so that later stages of this run continue the same MLflow run.
                if self.run_dir.is_dir():
                    (self.run_dir / RUN_ID_FILE).write_text(self._run_id)
            else:
                client.get_run(self._run_id)  # an error now if the run is gone
        self._client = client

    def _opened(self) -> Any:
        """The client, once the store and the run are open (waits for the logger's thread)."""
        self._ready.wait()
        self._raise()
        return self._client

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _submit(self, call: Callable[[], None]) -> None:
        """Queue ``call`` for the logger's thread; made at once when the thread has finished (after ``finalize``)."""
        self._raise()
        if self._worker is not None:
            self._calls.put(call)
        elif self._client is not None:
            call()

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The ``MlflowClient`` of this run's store (its methods wait until the store and the run are open)."""
        return _Client(self)

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run's id (waits until the run exists)."""
        self._opened()
        return self._run_id

    @property
    def name(self) -> str:
        return self._experiment_name

    @property
    def version(self) -> Optional[str]:
        """The MLflow run's id once it exists (never waits: Lightning reads it for the progress bar)."""
        return self._run_id

    @property
    def save_dir(self) -> str:
        return str(self.run_dir)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        timestamp = int(time.time() * 1000)
        # The characters MLflow allows in a metric name (as Lightning's own MLflow logger does).
        values = {re.sub(r"[^a-zA-Z0-9_/. -]+", "", k): float(v) for k, v in metrics.items() if not isinstance(v, str)}

        def call() -> None:
            from mlflow.entities import Metric

            batch = [Metric(key, value, timestamp, step or 0) for key, value in values.items()]
            self._client.log_batch(self._run_id, metrics=batch)

        self._submit(call)

    @rank_zero_only
    def log_hyperparams(self, params: Union[dict[str, Any], Any]) -> None:
        """The whole config as params, nested keys joined with ``/``; a value longer than MLflow allows is cut, with
        a ``...[cut]`` mark, rather than refused."""
        flat = _flatten(params if isinstance(params, dict) else vars(params))

        def call() -> None:
            from mlflow.entities import Param

            existing = self._client.get_run(self._run_id).data.params
            batch = [
                Param(key[:MAX_KEY], value if len(value) <= MAX_VALUE else value[: MAX_VALUE - 8] + "...[cut]")
                for key, value in flat.items()
                # MLflow refuses to change a param: a later stage keeps the fit's.
                if existing.get(key[:MAX_KEY]) is None
            ]
            for i in range(0, len(batch), 100):  # MLflow's limit per call
                self._client.log_batch(self._run_id, params=batch[i : i + 100])

        self._submit(call)

    @rank_zero_only
    def log_image(self, key: str, images: list[Any], step: Optional[int] = None) -> None:
        """The diagnostics' plots as image artifacts, ``plots/<key>/step_<step>.png``."""
        import numpy as np

        for i, image in enumerate(images):
            name = f"plots/{key}{'' if i == 0 else f'-{i}'}/step_{step or 0:06d}.png"
            pixels = np.asarray(image)
            self._submit(lambda p=pixels, n=name: self._client.log_image(self._run_id, p, artifact_file=n))

    @rank_zero_only
    def tag_run(self, tags: list[str], note: Optional[str]) -> None:
        """``--run.tags`` as MLflow tags (``tag.<name>``), ``--run.note`` as the run's description."""
        pairs = [(f"tag.{tag}", "true") for tag in tags] + ([("mlflow.note.content", note)] if note else [])
        self._submit(lambda: [self._client.set_tag(self._run_id, k, v) for k, v in pairs])

    @rank_zero_only
    def log_run_end(self, end: dict[str, Any]) -> None:
        pairs = [(f"provenance.{key}", str(value)) for key, value in end.items()]
        self._submit(lambda: [self._client.set_tag(self._run_id, k, v) for k, v in pairs])

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._checkpoint_callback = checkpoint_callback

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Log the best and the last checkpoint and the run's records as artifacts, end the run, and wait for the
        logger's thread to finish every write."""
        if self._worker is None:
            return
        callback, self._checkpoint_callback = self._checkpoint_callback, None
        checkpoints = []
        if self._log_checkpoints and callback is not None:
            checkpoints = [p for p in {callback.best_model_path, getattr(callback, "last_model_path", "")} if p]
        records = sorted(self.run_dir.glob("provenance*.yaml")) + sorted(self.run_dir.glob("config*.yaml"))
        state = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}.get(status, "FINISHED")

        def call() -> None:
            for path in checkpoints:
                if Path(path).is_file():
                    self._client.log_artifact(self._run_id, path, "checkpoints")
            for record in records:
                self._client.log_artifact(self._run_id, str(record), "run")
            self._client.set_terminated(self._run_id, state)

        self._submit(call)
        self._calls.put(None)
        self._worker.join()
        self._worker = None
        self._raise()
