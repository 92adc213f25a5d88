"""Callbacks a config can name (``mnist_dlops.callbacks.Diagnostics``...) and the CLI adds by default.

- ``Diagnostics``: confusion matrix, ROC/PR curves and a gallery of mistakes, for every tracker;
- ``DeviceStatsMonitor``: hardware utilization logged like any metric;
- ``ProgressBar``: Lightning's Rich bar, redrawn a few times a second;
- ``PredictionCSV``: ``predict`` writes what the model sees in each image.

The run's record (config and provenance) is ``mnist_dlops.rundir.record.RunConfigSaver``; what a checkpoint keeps to
resume exactly is ``mnist_dlops.rundir.checkpoints.ResumeState``.
"""

from mnist_dlops.callbacks.devices import DeviceStatsMonitor
from mnist_dlops.callbacks.diagnostics import Diagnostics
from mnist_dlops.callbacks.predictions import PredictionCSV
from mnist_dlops.callbacks.progress import ProgressBar

__all__ = ["Diagnostics", "DeviceStatsMonitor", "PredictionCSV", "ProgressBar"]
