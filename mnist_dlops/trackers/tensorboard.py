"""TensorBoard, resumable: a resumed run tells TensorBoard to drop what its killed predecessor logged after the checkpoint."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from lightning_fabric.utilities.logger import _convert_params, _flatten_dict
from pytorch_lightning.loggers import TensorBoardLogger as LightningTensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from torch import Tensor

from mnist_dlops.trackers.base import Tracker

# The metrics TensorBoard's HParams tab compares runs by: it shows each run's last value of these scalars.
HPARAM_METRICS = ("val/acc", "val/loss", "test/acc", "test/loss")


class TensorBoardLogger(LightningTensorBoardLogger, Tracker):
    """Lightning's TensorBoard logger, with images and histograms for the diagnostics, and resumable.

    A run killed after its last checkpoint has logged steps that the resumed run logs again. On resume this logger
    writes TensorBoard's own restart marker (``SessionLog.START`` at the checkpoint's step), and TensorBoard's
    reader then discards the earlier events from that step on, so every step shows once.
    """

    def __init__(
        self,
        save_dir: Optional[str] = None,
        name: Optional[str] = "",
        version: Optional[str] = "",
        default_hp_metric: bool = False,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            save_dir: Folder of the event files; null: the run's directory (``lightning_logs`` outside the CLI).
            name: Sub-folder below ``save_dir`` (none by default: the run directory is the experiment's).
            version: Sub-folder below ``name`` (none by default).
            default_hp_metric: Lightning's placeholder metric ``hp_metric = -1`` in the HParams tab; off: the tab
                shows the run's real metrics (``HPARAM_METRICS``) instead.
        """
        super().__init__(
            save_dir if save_dir is not None else "lightning_logs", name=name, version=version,
            default_hp_metric=default_hp_metric, **kwargs,
        )

    @rank_zero_only
    def log_hyperparams(self, params: Any, metrics: Optional[dict[str, Any]] = None, step: Optional[int] = None) -> None:
        """Lightning's (hparams.yaml; the HParams tab when ``metrics`` are given), and without them the HParams tab
        with ``HPARAM_METRICS`` as its metric columns, filled from the run's own scalars as they are logged.

        Lightning would log the metrics' values at this step (at a run's start: none yet), so the summaries are
        written here with its own helpers (``_flatten_dict``, ``_sanitize_params``, the writer's
        ``_get_file_writer``, as Lightning's ``log_hyperparams`` does): none has a public counterpart.
        """
        super().log_hyperparams(params, metrics, step)
        if metrics is not None or self._default_hp_metric:
            return
        from torch.utils.tensorboard.summary import hparams

        flat = self._sanitize_params(_flatten_dict(_convert_params(params)))
        writer = self.experiment._get_file_writer()
        for summary in hparams(flat, dict.fromkeys(HPARAM_METRICS, 0.0)):
            writer.add_summary(summary, step)

    def state_dict(self) -> dict[str, Any]:
        """Nothing to keep: the checkpoint's step is enough. Flushes, so that the events so far are on disk."""
        if self._experiment is not None:
            self._experiment.flush()
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Mark the restart at ``state["global_step"]``, the first step the resumed run logs again."""
        restart = Event(step=int(state["global_step"]), session_log=SessionLog(status=SessionLog.START))
        self.experiment._get_file_writer().add_event(restart)
        self.experiment.flush()

    @rank_zero_only
    def log_image(self, key: str, images: list[np.ndarray], step: Optional[int] = None) -> None:
        """Images as ``[H, W, 3]`` uint8 arrays, under ``key`` (``key/1``, ``key/2``... for more than one)."""
        for i, image in enumerate(images):
            self.experiment.add_image(key if i == 0 else f"{key}/{i}", image, global_step=step, dataformats="HWC")

    @rank_zero_only
    def log_histograms(self, tensors: dict[str, Tensor], step: Optional[int] = None) -> None:
        """One histogram per tensor (the diagnostics send every weight tensor, each epoch)."""
        for name, values in tensors.items():
            self.experiment.add_histogram(name, values, global_step=step)

    @rank_zero_only
    def log_run_end(self, end: dict[str, Any]) -> None:
        """How the stage ended (time, wall time, status), as text in the Text tab."""
        self.experiment.add_text("provenance/end", "  \n".join(f"{k}: {v}" for k, v in end.items()))
        self.experiment.flush()
