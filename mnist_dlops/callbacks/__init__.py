"""Callbacks a config can name (``mnist_dlops.callbacks.Diagnostics``...) and the CLI adds by default."""

from importlib import import_module
from typing import Any

# name -> its module, loaded when a config or the CLI first names it (PEP 562): the package itself imports nothing.
_WHERE = {"DeviceStatsMonitor": "devices", "Diagnostics": "diagnostics", "PredictionCSV": "predictions",
          "ProgressBar": "progress"}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"mnist_dlops.callbacks.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
