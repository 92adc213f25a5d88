"""A progress bar that redraws a few times a second, not after every batch, and fits a terminal's width."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.callbacks.progress.rich_progress import RichProgressBarTheme

# Lightning's loggers, whose handlers write its status lines ("`Trainer.fit` stopped: ...").
LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric")


class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is at the time: while Rich's live display is drawn, that is
    Rich's proxy, which prints the line above the bar instead of under it (where the next redraw would erase it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class ProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, redrawn at most every ``refresh_interval`` seconds and at each loop's end.

    Lightning's bar updates its task, reads the metrics and redraws after every batch whatever its ``refresh_rate``
    says (the rate only turns it on or off): for a small network, a noticeable share of each step.

    Fitted to a terminal: the metrics (the model logs its losses and accuracy to the bar) stand one per line beside
    it, so that a narrow terminal never wraps a metric's name away from its value, and Lightning's own status lines
    print above the bar rather than being drawn over.
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
        super().__init__(leave=leave, theme=RichProgressBarTheme(metrics_text_delimiter="\n"),
                         console_kwargs=console_kwargs)
        self.refresh_interval = refresh_interval
        self._drawn_at = float("-inf")
        self._validated = True  # false from a fit's sanity check until its first real validation ends
        self._log_streams: list[tuple[logging.StreamHandler, Any]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Send Lightning's log lines through the live display (see ``_CurrentStderr``) for this stage."""
        super().setup(trainer, pl_module, stage)
        if not self.is_enabled or self._log_streams:
            return
        for name in LIGHTNING_LOGGERS:
            for handler in logging.getLogger(name).handlers:
                if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
                    self._log_streams.append((handler, handler.setStream(_CurrentStderr())))

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_sanity_check_start(trainer, pl_module)
        self._validated = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._validated = self._validated or not trainer.sanity_checking

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Lightning's, less the sanity check's validation metrics: two batches of an untrained model are no result."""
        metrics = super().get_metrics(trainer, pl_module)
        if not self._validated:
            metrics = {key: value for key, value in metrics.items() if not key.startswith("val/")}
        return metrics

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._restore_log_streams()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._restore_log_streams()

    def _restore_log_streams(self) -> None:
        for handler, stream in self._log_streams:
            handler.setStream(stream)
        self._log_streams = []

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
