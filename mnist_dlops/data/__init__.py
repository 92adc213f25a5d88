"""The data: the data module a config names, IDX files, images, downloads, batches, fingerprints and DVC
versions; loaded when first named (PEP 562)."""

from importlib import import_module
from typing import Any

__all__ = ["DataChangedWarning", "MNISTDataModule"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("mnist_dlops.data.datamodule"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
