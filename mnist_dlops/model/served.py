"""What the server serves: a registered version, an export or a checkpoint, checked before anything loads."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional
from unittest.mock import patch  # patch.dict: set environment variables for a block, restored after

import yaml

from mnist_dlops.errors import CheckpointError, ConfigError, invoked, reason
from mnist_dlops.model.formats import FORMATS, ExportFormat, Forward, is_torchscript, no_grad
from mnist_dlops.model.reference import Reference

Format = Literal["checkpoint", ExportFormat]  # what is served: a checkpoint, or an export


# The folder a server downloads registered versions into, for every process it starts (removed when it stops).
DOWNLOADS_ENV = "MNIST_DLOPS_SERVE_DOWNLOADS"


@dataclass
class ServedModel:
    """A model ready to load in each server worker, with what the API reports about it."""

    file: Path
    format: Format
    class_names: list[str]
    name: str
    version: Optional[str] = None
    data_fingerprint: Optional[str] = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    reference: Optional[Reference] = None  # the training data's statistics, for input drift; None: no drift metrics

    def metadata(self) -> dict[str, Any]:
        """What ``GET /metadata`` answers: the model, its classes, and the input the API takes."""
        return {
            "model": {"name": self.name, "version": self.version, "format": self.format, "source": self.source},
            "classes": self.class_names,
            "data_fingerprint": self.data_fingerprint,
            "data_version": self.reference.data_version if self.reference else "",
            "input": {
                "image": "POST /predict with a PNG/JPEG body, a multipart upload, or JSON {\"image\": <base64>}",
                "arrays": "JSON {\"images\": [28x28 arrays of 0-255]}, white digit on black, as MNIST",
            },
            "output": "class and probabilities per class name",
        }

    def load(self) -> Forward:
        """The model's forward function (in a worker process): probabilities for uint8 images."""
        if self.format == "checkpoint":
            from mnist_dlops.module import Probabilities, rebuild

            return no_grad(Probabilities(rebuild(self.file)).eval())
        return FORMATS[self.format].load(self.file)


def from_checkpoint(ckpt_path: str, runs_dir: str = "lightning_logs") -> ServedModel:
    """A checkpoint (``best``/``last``, a run folder, or a file), checked as every entry point checks one."""
    from mnist_dlops.model.reference import training_reference
    from mnist_dlops.module import Probabilities, rebuild
    from mnist_dlops.rundir.record import run_data
    from mnist_dlops.rundir.run import resolve_ckpt

    path = resolve_ckpt(ckpt_path, Path(runs_dir)).resolve()
    module = rebuild(path)  # fails here, in the parent, rather than in every worker
    run_dir = path.parent.parent
    reference = training_reference(path, Probabilities(module).eval())
    fingerprint = run_data(run_dir).get("fingerprint")
    return ServedModel(path, "checkpoint", list(module.class_names), run_dir.name, None, fingerprint, str(path),
                       reference=reference)


def from_export(path: str) -> ServedModel:
    """A file of ``mnist_dlops.export``: ``model.pt`` (TorchScript) or ``model.onnx``, with ``classes.txt`` beside."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"model={path}: no such file")
    classes = file.with_name("classes.txt")
    if not classes.is_file():
        raise ConfigError(f"model={path}: no classes.txt beside it ({invoked('export')} writes one)")
    class_names = classes.read_text().split()
    fmt = next((name for name, f in FORMATS.items() if Path(f.file).suffix == file.suffix), "torchscript")
    if fmt == "torchscript" and not is_torchscript(file):
        raise CheckpointError(f"{file}: not a TorchScript archive; the server loads TorchScript or ONNX only")
    return ServedModel(file.resolve(), fmt, class_names, file.parent.name, source=str(file),
                       reference=Reference.load(file.parent))


def from_registry(uri: str, runs_dir: str = "lightning_logs", tracking_uri: Optional[str] = None,
                  cache_dir: Optional[str] = None) -> ServedModel:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` from the MLflow registry, downloaded once."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from mnist_dlops.trackers.mlflow_store import mlflow_client, mlflow_uri, store_step

    reference = uri.removeprefix("models:/")
    name, at, alias = reference.partition("@")
    if not at:
        name, _, number = reference.rpartition("/")
    if not name or not (alias if at else number):
        raise ConfigError(f"model={uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    location = mlflow_uri(Path(runs_dir), tracking_uri)
    with store_step(f"model={uri}"):
        client = mlflow_client(location)
        try:
            version = client.get_model_version_by_alias(name, alias) if at else client.get_model_version(name, number)
        except MlflowException:
            raise ConfigError(f"model={uri}: no such registered model version in {location}") from None
        # Into the server's own folder (removed when it stops); this process removes it again at a switch.
        target = Path(cache_dir or tempfile.mkdtemp(prefix="model-", dir=os.environ.get(DOWNLOADS_ENV)))
        # Downloaded from where the version's files are, by the registry's own answer: MLflow's models:/ download
        # would look the name up in the process-wide registry, not this one.
        source = client.get_model_version_download_uri(name, version.version)
        # MLflow's own switch for its "Downloading artifacts" bar: a few kB, drawn as if something were slow.
        with patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(target),
                                                              tracking_uri=location))
    # The files land in the folder, or in a sub-folder named after the version's source path: find its MLmodel.
    descriptor = next(iter(sorted(folder.rglob("MLmodel"), key=lambda p: len(p.parts))), None)
    if descriptor is None:
        raise CheckpointError(f"model={uri}: not an MLflow model (no MLmodel file in its artifacts)")
    folder = descriptor.parent
    try:
        mlmodel = yaml.safe_load(descriptor.read_text()) or {}
    except yaml.YAMLError as err:  # a !!python/object tag among them: safe_load builds plain values only
        raise CheckpointError(f"model={uri}: its MLmodel is not plain YAML ({reason(err, 400)})") from None
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    metadata = (mlmodel.get("metadata") if isinstance(mlmodel, dict) else None) or {}
    if not isinstance(flavors, dict) or not all(isinstance(f, dict) for f in flavors.values()) or not isinstance(
            metadata, dict):
        raise CheckpointError(f"model={uri}: its MLmodel's flavors or metadata are malformed (not MLflow's own)")
    fmt = next((name for name, f in FORMATS.items() if f.flavor in flavors), None)
    if fmt is None:
        raise CheckpointError(f"model={uri}: flavors {sorted(flavors)}; the server loads TorchScript or ONNX only "
                              "(a python_function model is pickled code)")
    file = FORMATS[fmt].registered(flavors[FORMATS[fmt].flavor], folder)
    if fmt == "torchscript" and not is_torchscript(file):
        raise CheckpointError(f"model={uri}: a pickled PyTorch model, which would run code when loaded; "
                              "the server loads TorchScript or ONNX versions only (registry register makes one)")
    class_names = [str(c) for c in metadata.get("class_names") or []]
    if not class_names:
        raise CheckpointError(f"model={uri}: records no class_names (register it with {invoked('registry')})")
    download = {} if cache_dir else {"download": str(target), "downloaded_by": os.getpid()}
    return ServedModel(file, fmt, class_names, name, str(version.version), metadata.get("data_fingerprint"), uri,
                       extra={"registry": location, **download}, reference=Reference.load(folder))


def discard(served: ServedModel) -> None:
    """Remove the files this process downloaded for ``served``, once another version has replaced it."""
    if served.extra.get("downloaded_by") == os.getpid():
        shutil.rmtree(served.extra["download"], ignore_errors=True)


def promoted(served: ServedModel) -> Optional[ServedModel]:
    """For a model served by alias (``models:/<name>@<alias>``): the version the alias names now, when it has moved
    since ``served`` was loaded; None when it has not, or the model was not served by alias."""
    from mnist_dlops.trackers.mlflow_store import mlflow_client

    if not served.source.startswith("models:/") or "@" not in served.source or "registry" not in served.extra:
        return None
    name, alias = served.source.removeprefix("models:/").split("@", 1)
    location = served.extra["registry"]
    version = mlflow_client(location).get_model_version_by_alias(name, alias)
    if str(version.version) == served.version:
        return None
    return from_registry(served.source, tracking_uri=location)


def resolve(model: Optional[str], ckpt_path: Optional[str], runs_dir: str = "lightning_logs",
            tracking_uri: Optional[str] = None) -> ServedModel:
    """The served model named by ``--model`` (a registry URI or an export file) or ``--ckpt_path``."""
    if (model is None) == (ckpt_path is None):
        raise ConfigError("give either --model (models:/<name>@<alias>, or an exported model.pt/model.onnx) "
                          "or --ckpt_path (best, last, a run folder or a .ckpt file)")
    if ckpt_path is not None:
        return from_checkpoint(ckpt_path, runs_dir)
    if model.startswith("models:/"):
        return from_registry(model, runs_dir, tracking_uri)
    return from_export(model)


def check(served: ServedModel) -> None:
    """Load once and run one blank image: a model that does not map MNIST images to its classes fails here."""
    import torch

    try:
        probs = served.load()(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    except Exception as err:  # noqa: BLE001 - TorchScript's and ONNX Runtime's parsers raise types of their own
        raise CheckpointError(f"{served.source}: cannot be loaded as {served.format} ({reason(err)})") from None
    if tuple(probs.shape) != (1, len(served.class_names)) or abs(float(probs.sum()) - 1) > 1e-3:
        raise CheckpointError(f"{served.source}: gives {tuple(probs.shape)} outputs for one image, not "
                              f"probabilities over its {len(served.class_names)} classes")
