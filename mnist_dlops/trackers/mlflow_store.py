"""MLflow's store, apart from the tracker: where it is, a client, and its failures (locked, full, read-only,
unreachable) as one line. The registry's commands, the promotion gate and the server use it without Lightning."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from mnist_dlops.errors import ConfigError, UserError, reason
from mnist_dlops.trust import TRACKING_SCHEMES, check_url, redact
from mnist_dlops.writeguard import allow_writes

# Where a run folder keeps its MLflow run's id, so that its later stages and the registry find the same MLflow run.
RUN_ID_FILE = ".mlflow_run_id"


def mlflow_uri(runs_dir: Path, tracking_uri: Optional[str] = None) -> str:
    """Where MLflow keeps runs and models: ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else one SQLite database
    for the whole runs folder."""
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):  # checked before SQLAlchemy imports its driver by name
        key = "tracking_uri" if tracking_uri else "MLFLOW_TRACKING_URI"
        return check_url(key, tracking_uri or os.environ["MLFLOW_TRACKING_URI"], TRACKING_SCHEMES)
    return runs_store(runs_dir)


def runs_store(runs_dir: Path) -> str:
    """The runs folder's own store: one SQLite database for all its runs."""
    return f"sqlite:///{runs_dir.resolve() / 'mlflow.db'}"


def mlflow_client(uri: str) -> Any:
    """A client of the store at ``uri``, for runs and models. Never ``mlflow.set_tracking_uri``: it also sets
    ``MLFLOW_TRACKING_URI`` in the process environment, and every later run in the process would log into it."""
    import mlflow

    allow_store_writes(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def allow_store_writes(uri: str) -> None:
    """A command opens its MLflow store by design: a local one's database, lock and artifacts may be written (SQLite's
    journal beside the database is written by C code, which the gate does not see)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        for path in (db, db.with_name(f"{db.name}.lock"), db.parent / "mlflow-artifacts"):
            allow_writes(path, "the MLflow store")
    elif "://" not in uri or uri.startswith("file:"):
        allow_writes(uri.removeprefix("file://"), "the MLflow store")


def artifact_root(runs_dir: Path, uri: str) -> Optional[str]:
    """Where a new experiment keeps its artifacts: ``<runs_dir>/mlflow-artifacts`` for a database store (SQLite or
    PostgreSQL: MLflow's own default would be ``./mlruns`` wherever the command runs); a server's own otherwise."""
    return (runs_dir.resolve() / "mlflow-artifacts").as_uri() if uri.startswith(("sqlite:", "postgresql")) else None


class RegistryError(UserError):
    """MLflow refused an operation on the store (a locked or read-only database, a missing version...)."""


def registry_client(runs_dir: str, tracking_uri: Optional[str]) -> Any:
    """A client of the runs folder's store, or of ``tracking_uri``'s (the registry's commands and the server)."""
    allow_writes(Path(runs_dir) / "mlflow-artifacts", "the MLflow store's artifacts")  # a database store's, too
    return mlflow_client(mlflow_uri(Path(runs_dir), tracking_uri))


def store_failures() -> tuple[type[BaseException], ...]:
    """What a failing store raises: MLflow's error, SQLAlchemy's (a locked SQLite database surfaces raw), OSError."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return MlflowException, SQLAlchemyError, OSError


@contextmanager
def store_step(what: str) -> Iterator[None]:
    """One step on the MLflow store, named ``what``: a failing store (locked, full, read-only, unreachable) becomes one
    RegistryError line saying what was being done and the database's own reason."""
    try:
        yield
    except store_failures() as err:
        raise registry_error(what, err) from None


def registry_error(what: str, err: BaseException) -> RegistryError:
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


def model_exists(client: Any, name: str) -> bool:
    """Whether a registered model ``name`` exists; a name MLflow refuses, or one that MLflow's own search filters
    cannot quote (``registry list`` would fail for every model), is a ConfigError naming it."""
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
            raise ConfigError(f"name={name!r}: {reason(err.message, 400)}") from None
        raise registry_error(f"registry {client.tracking_uri}", err) from None
