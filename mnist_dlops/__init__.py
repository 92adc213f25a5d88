"""mnist-dlops: config-driven, tracked and reproducible MNIST experiments on LightningCLI; imports nothing
heavy itself (PEP 562), so nothing loads before a command's import gate is up."""

from importlib import import_module
from typing import Any

__all__ = ["MNISTDataModule", "MNISTModule"]
_WHERE = {"MNISTDataModule": "mnist_dlops.data.datamodule", "MNISTModule": "mnist_dlops.module"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
