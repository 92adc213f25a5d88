"""TensorBoard, resumable: a resumed run tells TensorBoard to drop what its killed predecessor logged after the checkpoint."""

from __future__ import annotations

from argparse import Namespace
from typing import Any, Optional

import numpy as np
from pytorch_lightning.loggers import TensorBoardLogger as LightningTensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from torch import Tensor

from mnist_dlops.trackers.base import Tracker, flatten

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
        self.default_hp_metric = default_hp_metric

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        """Lightning's, then flushed: the step's ``last.ckpt`` is written at the next batch, and a run killed with
        these metrics unflushed would lose them; the resumed run, starting after that step, never logs them again."""
        super().log_metrics(metrics, step)
        self.experiment.flush()

    @rank_zero_only
    def log_hyperparams(self, params: Any, metrics: Optional[dict[str, Any]] = None, step: Optional[int] = None) -> None:
        """Lightning's (hparams.yaml; the HParams tab when ``metrics`` are given), and without them the HParams tab
        with ``HPARAM_METRICS`` as its metric columns, filled from the run's own scalars as they are logged.

        Lightning would log the metrics' values at this step (at a run's start: none yet), so the summaries are
        written here, into the run's own event file, as Lightning's ``log_hyperparams`` does.
        """
        super().log_hyperparams(params, metrics, step)
        if metrics is not None or self.default_hp_metric:
            return
        from torch.utils.tensorboard.summary import hparams

        params = vars(params) if isinstance(params, Namespace) else dict(params)
        flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(params).items()}
        # private: SummaryWriter's public add_hparams writes a run of its own beside this one (a second folder)
        writer = self.experiment._get_file_writer()
        for summary in hparams(flat, dict.fromkeys(HPARAM_METRICS, 0.0)):
            writer.add_summary(summary, step)

    def state_dict(self) -> dict[str, Any]:
        """Nothing to keep: the checkpoint's step is enough. Flushes, so that the events so far are on disk."""
        self.experiment.flush()
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Mark the restart at ``state["global_step"]``, the first step the resumed run logs again."""
        restart = Event(step=int(state["global_step"]), session_log=SessionLog(status=SessionLog.START))
        # private: SummaryWriter has no public way to write a raw event (TensorBoard's restart marker)
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
