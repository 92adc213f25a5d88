"""A progress bar that redraws a few times a second, not after every batch."""

from __future__ import annotations

import time
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, redrawn at most every ``refresh_interval`` seconds and at each loop's end.

    Lightning's bar updates its task, reads the metrics and redraws after every batch whatever its ``refresh_rate``
    says (the rate only turns it on or off): for a small network, a noticeable share of each step.
    """

    def __init__(
        self, refresh_interval: float = 0.1, leave: bool = False, console_kwargs: Optional[dict[str, Any]] = None
    ) -> None:
        """
        Args:
            refresh_interval: Seconds between redraws; the bar always shows a loop's last batch.
            leave: Keep each finished epoch's bar on screen (else one bar is reused).
            console_kwargs: Arguments for Rich's ``Console``, e.g. ``{force_terminal: true}``.
        """
        super().__init__(leave=leave, console_kwargs=console_kwargs)
        self.refresh_interval = refresh_interval
        self._drawn_at = float("-inf")

    def _due(self, done: int, total: float) -> bool:
        """Whether to redraw after ``done`` of ``total`` batches (asked only when enabled: other ranks count none)."""
        now = time.monotonic()
        if done >= total or now - self._drawn_at >= self.refresh_interval:
            self._drawn_at = now
            return True
        return False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.is_enabled and self._due(batch_idx + 1, self.total_train_batches):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.is_enabled and self._due(batch_idx + 1, self.total_val_batches_current_dataloader):
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.is_enabled and self._due(batch_idx + 1, self.total_test_batches_current_dataloader):
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.is_enabled and self._due(batch_idx + 1, self.total_predict_batches_current_dataloader):
            super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
