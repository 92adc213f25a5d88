"""Hardware utilization (CPU, memory; GPU when present), logged like any metric."""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.accelerators.cpu import get_cpu_stats
from pytorch_lightning.callbacks import DeviceStatsMonitor as LightningDeviceStatsMonitor


class DeviceStatsMonitor(LightningDeviceStatsMonitor):
    """Lightning's ``DeviceStatsMonitor`` (CPU and memory use; GPU when present), logged like any metric as
    ``train/system/<stat>``, once per logging step.

    Lightning's logs every stat twice a step (at the batch's start and end) under two groups of its own, which
    TensorBoard lists before the model's metrics; named so, they come after the model's train metrics. Idle in a run
    without a logger (``trainer.logger: false``) instead of refusing to start, so that one switch turns tracking off.
    """

    def __init__(self, cpu_stats: Optional[bool] = None) -> None:
        """
        Args:
            cpu_stats: Log CPU and memory use (psutil) too when training on an accelerator; false turns the stats
                off when training on the CPU; null: Lightning's default (on for the CPU, off beside an accelerator).
        """
        super().__init__(cpu_stats=cpu_stats)
        self.cpu_stats = cpu_stats
        self._logged_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.loggers:
            super().setup(trainer, pl_module, stage)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        """Nothing: the stats are read once per logging step, at its end."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        # The optimizer has stepped: this batch's metrics are logged at the step before (as Lightning logs them).
        step = trainer.global_step - 1
        every = trainer.log_every_n_steps
        if not trainer.loggers or not every or step == self._logged_step or (step + 1) % every != 0:
            return
        device = trainer.strategy.root_device
        if device.type == "cpu" and self.cpu_stats is False:
            return
        stats = trainer.accelerator.get_device_stats(device)
        if self.cpu_stats and device.type != "cpu":
            stats.update(get_cpu_stats())
        self._logged_step = step
        for logger in trainer.loggers:
            logger.log_metrics({f"train/system/{name}": value for name, value in stats.items()}, step=step)
