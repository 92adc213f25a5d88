"""A callback for the benchmarks: seconds from process start to the first training step, and RSS at epoch ends.

Used as ``MNIST_DLOPS_TRUST=probe PYTHONPATH=benchmarks python cli.py fit --trainer.callbacks+ probe.Probe``;
it prints ``first_step_s=<s>`` once, ``rss_mb=<MB>`` after each training epoch and ``peak_rss_mb=<MB>`` (the
process's high-water mark) when training ends.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import psutil
import pytorch_lightning as pl


class Probe(pl.Callback):
    """Prints the start-up time (process start to the first training batch) and the resident memory per epoch."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.seen_first = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.seen_first:
            self.seen_first = True
            print(f"first_step_s={time.time() - self.process.create_time():.3f}", flush=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        print(f"rss_mb={self.process.memory_info().rss / 2**20:.1f}", flush=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
        print(f"peak_rss_mb={peak_kb / 1024:.1f}", flush=True)
