"""``mnist-dlops registry``: a checkpoint's model as a versioned MLflow model, picked by alias for serving."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from mnist_dlops.data.versions import version_label
from mnist_dlops.errors import ConfigError, command, invoked
from mnist_dlops.model.formats import FORMATS
from mnist_dlops.model.formats import ExportFormat as Format
from mnist_dlops.model.reference import REFERENCE_FILE
from mnist_dlops.trackers.mlflow_store import (
    RUN_ID_FILE,
    artifact_root,
    mlflow_uri,
    model_exists,
    registry_client,
    registry_error,
    store_failures,
    store_step,
)

EXPERIMENT = "mnist-dlops"
# Model version tags that `list` shows, besides the run and the data fingerprint.
SHOWN_METRICS = ("val/acc", "val/loss", "test/acc")


def _run_record(run_dir: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """The data a training run recorded (fingerprint, DVC version) and its last val/test metrics (its own records)."""
    from mnist_dlops.commands.runs import run_row
    from mnist_dlops.rundir.record import run_data

    try:
        row = run_row(run_dir)
    except (OSError, ValueError):  # a checkpoint copied out of its run: no records beside it
        return {}, {}
    metrics = {k: float(v) for k, v in row.items() if k.startswith(("val/", "test/")) and v == v and v is not None}
    return run_data(run_dir), metrics


def _mlflow_run(client: Any, run_dir: Path, metrics: dict[str, float], runs_dir: Path) -> str:
    """The MLflow run the training run logged (configs/mlflow.yaml), or a new one named after its folder."""
    from mlflow.exceptions import MlflowException

    id_file = run_dir / RUN_ID_FILE
    if id_file.is_file():
        try:
            return client.get_run(id_file.read_text().strip()).info.run_id
        except MlflowException:
            pass  # logged into another store: this store gets a run of its own
    experiment = client.get_experiment_by_name(EXPERIMENT)
    # A new experiment keeps its artifacts in the runs folder (the run itself may lie elsewhere: pipeline/fit).
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        EXPERIMENT, artifact_location=artifact_root(runs_dir, client.tracking_uri))
    run = client.create_run(experiment_id, run_name=run_dir.name, tags={"mnist_dlops.run_dir": str(run_dir)})
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _log_model(client: Any, file: Path, fmt: Format, class_names: list[str], metadata: dict[str, Any],
               run_id: str) -> str:
    """Log the export as an MLflow model in ``run_id``, with its signature and an input example."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from mnist_dlops.commands.export import sample_images

    # Unnamed tensors: MLflow then hands the model the array itself (a named one arrives as a dict, which its
    # PyTorch flavor refuses), and callers pass a plain uint8 array.
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 1, 28, 28))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(class_names)))]),
    )
    example = sample_images(2).numpy()
    common = {"signature": signature, "input_example": example, "metadata": metadata}
    # Saved to a folder, then logged into the run by the client: MLflow's fluent log_model needs the process-wide
    # tracking URI (see _client). Each registration gets its own artifact folder, so no version replaces another's.
    artifact_path = f"registered-model-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp, _quiet_mlflow():
        folder = Path(tmp) / artifact_path
        FORMATS[fmt].log(file, folder, **common)
        if (file.parent / REFERENCE_FILE).is_file():  # the drift reference, loaded with the model by the server
            shutil.copy(file.parent / REFERENCE_FILE, folder / REFERENCE_FILE)
        client.log_artifacts(run_id, str(folder), artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Silence three warnings that are about MLflow, not this model: its JSON serving check of the example, which
    its PyTorch flavor refuses for any tensor input; its caution about pickle, which a TorchScript file is not
    (MLflow writes it with torch.jit.save); torch's note that MLflow loads TorchScript through torch.load."""
    # Here, not in mnist_dlops.quiet: MLflow's logging set-up (dictConfig, at its import) resets its child loggers'
    # levels, so this one is set once MLflow is loaded.
    logger = logging.getLogger("mlflow.pytorch")
    level = logger.level
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            logger.setLevel(logging.ERROR)
            yield
    finally:
        logger.setLevel(level)


def register(
    ckpt_path: str = "best",
    name: str = "mnist-digits",
    format: Format = "torchscript",
    alias: Optional[str] = None,
    sweep: Optional[str] = None,
    sweep_storage: Optional[str] = None,
    runs_dir: str = "lightning_logs",
    tracking_uri: Optional[str] = None,
) -> int:
    """Register a checkpoint's model as a new version of ``name``; returns the version number.

    Args:
        ckpt_path: A .ckpt file, a run folder, or ``last``/``best`` of the newest run under ``runs_dir``.
        name: The registered model's name.
        format: The export to register: ``torchscript`` (needs torch to load) or ``onnx`` (needs onnxruntime).
        alias: Also point this alias (e.g. ``production``) at the new version.
        sweep: Register the best trial of this sweep (its study name) instead of ``ckpt_path``'s run.
        sweep_storage: The sweep's Optuna storage, if not ``sqlite:///<runs_dir>/sweeps/<sweep>/study.db``.
        runs_dir: Folder of the runs.
        tracking_uri: The MLflow store; default ``MLFLOW_TRACKING_URI``, else ``sqlite:///<runs_dir>/mlflow.db``.
    """
    from mnist_dlops.commands.export import export  # the heavy part (torch): only when registering
    from mnist_dlops.module import rebuild
    from mnist_dlops.rundir.run import resolve_ckpt, run_checkpoint, sweep_best

    if sweep:
        run = sweep_best(sweep, runs_dir, sweep_storage)
        print(f"sweep {sweep}: the best trial's run is {run}")
        path = run_checkpoint(run, best=True)
    else:
        path = resolve_ckpt(ckpt_path, Path(runs_dir))
    path = path.resolve()  # recorded in the registry: absolute, so that it means the same from anywhere
    module = rebuild(path)  # the same checks as every other entry point: weights-only, trusted classes of its kind
    with store_step(f"opening the registry {mlflow_uri(Path(runs_dir), tracking_uri)}"):
        client = registry_client(runs_dir, tracking_uri)
        existed = model_exists(client, name)
    run_dir = path.parent.parent
    data, metrics = _run_record(run_dir)
    fingerprint, data_version = data.get("fingerprint"), data.get("version") or {}
    metadata = {"class_names": list(module.class_names), "data_fingerprint": fingerprint,
                "input": "uint8 [N, 1, 28, 28], white digit on black (0-255), as mnist_dlops.data.images.to_mnist_image",
                "output": "class probabilities [N, num_classes], in class_names order", "checkpoint": str(path)}
    version = None
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            export(str(path), formats=[format], out_dir=tmp)  # its lines name a temporary folder: not the news
            run_id = _mlflow_run(client, run_dir, metrics, Path(runs_dir))
            file = Path(tmp) / FORMATS[format].file
            source = _log_model(client, file, format, list(module.class_names), metadata, run_id)
        if not existed:
            client.create_registered_model(name, description="MNIST digit classifier (mnist-dlops)")
        tags = {"run_dir": str(run_dir), "checkpoint": str(path), "format": format,
                "data_fingerprint": fingerprint or "", **{k: f"{v:.6g}" for k, v in metrics.items()},
                # The DVC data version the run trained on: its folder, DVC hash, pointer commit and tags.
                **{f"data_version.{k}": ",".join(v) if isinstance(v, list) else str(v)
                   for k, v in data_version.items() if v is not None and k in ("path", "md5", "commit", "tags", "rev")}}
        version = client.create_model_version(name, source, run_id=run_id, tags=tags).version
        if alias:
            client.set_registered_model_alias(name, alias, version)
    except store_failures() as err:
        _take_back(client, name, version, existed)
        raise registry_error(f"registering {path} as {name}", err) from None
    except BaseException:
        _take_back(client, name, version, existed)
        raise
    shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("val/loss", "val/acc", "test/acc") if k in metrics)
    print(f"registered {name} version {version}{f' as @{alias}' if alias else ''}: run {run_dir}, checkpoint "
          f"{path.name}{f' ({shown})' if shown else ''}  (load: mlflow.pyfunc.load_model('models:/{name}/{version}'))")
    return int(version)


def _take_back(client: Any, name: str, version: Optional[str], existed: bool) -> None:
    """Leave nothing half-registered: the new version goes, and the registered model if this call created it."""
    try:
        if version is not None:
            client.delete_model_version(name, version)
        if not existed and client.search_model_versions(f"name='{name}'") == []:
            client.delete_registered_model(name)
    except store_failures():
        pass  # the store itself is failing (locked, read-only): nothing was written to take back


def alias(target: str, version: int, runs_dir: str = "lightning_logs", tracking_uri: Optional[str] = None) -> None:
    """Point an alias at a version: ``alias mnist-digits@production 3``.

    Args:
        target: ``<name>@<alias>``.
        version: The version the alias will name.
        runs_dir: Folder of the runs.
        tracking_uri: The MLflow store; default ``MLFLOW_TRACKING_URI``, else ``sqlite:///<runs_dir>/mlflow.db``.
    """
    from mlflow.exceptions import MlflowException

    name, sep, label = target.partition("@")
    if not sep or not name or not label:
        raise ConfigError(f"target={target!r}: expected <name>@<alias>, e.g. mnist-digits@production")
    with store_step(f"alias {target}"):
        client = registry_client(runs_dir, tracking_uri)
        if not model_exists(client, name):
            raise ConfigError(f"target={target}: no registered model named {name!r}")
        try:
            client.get_model_version(name, str(version))
        except MlflowException:
            raise ConfigError(
                f"version={version}: {name} has no such version (see: {invoked('registry list')} --name {name})"
            ) from None
        client.set_registered_model_alias(name, label, str(version))
    print(f"{name}@{label} -> version {version}")


def versions(name: Optional[str] = None, runs_dir: str = "lightning_logs",
             tracking_uri: Optional[str] = None) -> list[dict[str, Any]]:
    """The registered versions (of ``name``, or of every model), newest first, as rows of plain values."""
    with store_step(f"reading the registry {mlflow_uri(Path(runs_dir), tracking_uri)}"):
        return _versions(registry_client(runs_dir, tracking_uri), name)


def _versions(client: Any, name: Optional[str]) -> list[dict[str, Any]]:
    from datetime import datetime

    if name is not None and not model_exists(client, name):
        raise ConfigError(f"name={name}: no registered model of that name")
    models = [client.get_registered_model(name)] if name else client.search_registered_models()
    rows = []
    for model in models:
        aliases: dict[str, list[str]] = {}
        # The search results carry no aliases: the registered model itself does.
        for label, number in client.get_registered_model(model.name).aliases.items():
            aliases.setdefault(str(number), []).append(label)
        for v in client.search_model_versions(f"name='{model.name}'"):
            rows.append({
                "name": model.name, "version": int(v.version), "aliases": ",".join(sorted(aliases.get(str(v.version), []))),
                **{m: v.tags.get(m, "") for m in SHOWN_METRICS},
                "run": Path(v.tags.get("run_dir", "")).name, "run_id": (v.run_id or "")[:8],
                "data": v.tags.get("data_fingerprint", "")[:12], "format": v.tags.get("format", ""),
                "data_version": version_label({"tags": [t for t in v.tags.get("data_version.tags", "").split(",") if t],
                                               "commit": v.tags.get("data_version.commit"),
                                               "md5": v.tags.get("data_version.md5")}) if "data_version.md5" in v.tags else "",
                "date": datetime.fromtimestamp(v.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M"),
            })
    return sorted(rows, key=lambda r: (r["name"], -r["version"]))


def list_versions(name: Optional[str] = None, runs_dir: str = "lightning_logs",
                  tracking_uri: Optional[str] = None) -> None:
    """Print the registered versions with their aliases, metrics, run, data fingerprint and date.

    Args:
        name: One registered model (default: all).
        runs_dir: Folder of the runs.
        tracking_uri: The MLflow store; default ``MLFLOW_TRACKING_URI``, else ``sqlite:///<runs_dir>/mlflow.db``.
    """
    import pandas as pd

    rows = versions(name, runs_dir, tracking_uri)
    if not rows:
        print(f"no registered model yet (register one: {invoked('registry register')} --ckpt_path best)")
        return
    print(pd.DataFrame(rows).to_string(index=False))


def main(argv: Optional[list[str]] = None) -> None:
    """``mnist-dlops registry {register,alias,list,promote}``, with one-line errors."""
    from mnist_dlops.commands.promote import promote

    command({"register": register, "alias": alias, "list": list_versions, "promote": promote}, argv, "registry")
