"""TensorBoard, resumable: a resumed run tells TensorBoard to drop what its killed predecessor logged after the checkpoint."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.loggers import TensorBoardLogger as LightningTensorBoardLogger
from tensorboard.compat.proto.event_pb2 import Event, SessionLog


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoard logger, marking where a resumed run restarts.

    A run killed after its last checkpoint has logged steps that the resumed run logs again. On resume this logger
    writes TensorBoard's own restart marker (``SessionLog.START`` at the checkpoint's step), and TensorBoard's
    reader then discards the earlier events from that step on, so every step shows once.
    """

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
