"""The export formats as a table, one row each (file, packages, writer, loader, MLflow flavor): adding a format
is a row here."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import zipfile
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:  # torch loads with a model, not with the commands that only name a format (registry --help)
    from torch import Tensor, nn

ExportFormat = Literal["torchscript", "onnx"]  # the names export, the registry and the server take
Forward = Callable[["Tensor"], "Tensor"]  # uint8 [N, 1, 28, 28] -> float32 probabilities [N, num_classes]


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (its compiled code inside), not a pickled Python object."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def no_grad(module: nn.Module) -> Forward:
    """``module`` as a forward function under ``torch.inference_mode``."""
    import torch

    def forward(images: Tensor) -> Tensor:
        with torch.inference_mode():
            return module(images)

    return forward


def _save_torchscript(model: nn.Module, images: Tensor, file: Path) -> None:
    import torch

    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, images[:2]), str(file))


def _load_torchscript(file: Path) -> Forward:
    import torch

    return no_grad(torch.jit.load(str(file), map_location="cpu").eval())


def _log_torchscript(file: Path, folder: Path, **common: Any) -> None:
    import mlflow
    import torch

    # Requirements given, not inferred: MLflow would otherwise import the model in a subprocess to guess them.
    # "pickle" is MLflow's name for its non-pt2 format; a ScriptModule is saved by torch.jit.save.
    mlflow.pytorch.save_model(torch.jit.load(str(file)), str(folder), serialization_format="pickle",
                              pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], **common)


def _save_onnx(model: nn.Module, images: Tensor, file: Path) -> None:
    import torch

    batch = torch.export.Dim("batch")
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates each of its passes
        program = torch.onnx.export(
            model, (images[:2],), dynamic_shapes={"images": {0: batch}}, input_names=["images"], output_names=["probs"]
        )
    program.save(str(file))


def _load_onnx(file: Path) -> Forward:
    import onnxruntime
    import torch

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward(images: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {name: images.numpy()})[0])

    return forward


def _log_onnx(file: Path, folder: Path, **common: Any) -> None:
    import mlflow
    import onnx

    mlflow.onnx.save_model(onnx.load(str(file)), str(folder),
                           pip_requirements=[f"onnxruntime=={package_version('onnxruntime')}"], **common)


@dataclass(frozen=True)
class Format:
    """One export format."""

    file: str  # its file name in an export folder
    flavor: str  # the MLflow flavor of a registered version
    packages: tuple[str, ...]  # what writing and loading it needs beyond torch (an optional extra)
    save: Callable[[nn.Module, Tensor, Path], None]  # (model, sample images, file)
    load: Callable[[Path], Forward]
    log: Callable[..., None]  # (file, MLflow model folder, signature=, input_example=, metadata=)
    registered: Callable[[dict[str, Any], Path], Path]  # (the flavor's MLmodel entry, model folder) -> its file


FORMATS: dict[str, Format] = {
    "torchscript": Format("model.pt", "pytorch", (), _save_torchscript, _load_torchscript, _log_torchscript,
                          lambda flavor, folder: folder / flavor.get("model_data", "data") / "model.pth"),
    "onnx": Format("model.onnx", "onnx", ("onnx", "onnxscript", "onnxruntime"), _save_onnx, _load_onnx, _log_onnx,
                   lambda flavor, folder: folder / flavor["data"]),
}


def available(name: str) -> bool:
    """Whether the packages a format needs are installed (ONNX's: ``pip install ".[export]"``)."""
    return all(importlib.util.find_spec(package) is not None for package in FORMATS[name].packages)
