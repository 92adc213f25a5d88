"""Callbacks a config can name (``mnist_dlops.callbacks.Diagnostics``...) and the CLI adds by default.

- ``Diagnostics``: confusion matrix, ROC/PR curves and a gallery of mistakes, for every tracker;
- ``DeviceStatsMonitor``: hardware utilization logged like any metric;
- ``ProgressBar``: Lightning's Rich bar, redrawn a few times a second;
- ``PredictionCSV``: ``predict`` writes what the model sees in each image.

The run's record (config and provenance) is ``mnist_dlops.rundir.record.RunConfigSaver``; what a checkpoint keeps to
resume exactly is ``mnist_dlops.rundir.checkpoints.ResumeState``.
"""

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
