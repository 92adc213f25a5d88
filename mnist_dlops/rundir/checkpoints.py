"""Writing checkpoints (atomically, periodically, on preemption, with ``checkpoints/best.json``) and what they keep
beyond Lightning's state to resume exactly."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from mnist_dlops.errors import DivergedError
from mnist_dlops.files import write_atomic
from mnist_dlops.rundir.run import load_checkpoint, write_summary
from mnist_dlops.trackers.base import tracker_keys

# Top-level key of this project's own entries in a checkpoint; every value under it is plain (weights_only-safe).
STATE_KEY = "mnist_dlops"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it, then renames it into place; reads
    every checkpoint Lightning loads (a resume, a fault-tolerant callback's file) as plain data, checked.

    A kill or a full disk at any moment leaves either the previous file or the complete new one, never a torn file.
    With ``hold_last``, ``last.ckpt`` is serialized when saved but written by ``write_held`` (``RunCheckpoint``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.hold_last = False
        self._held: Optional[tuple[Path, io.BytesIO]] = None

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        return load_checkpoint(path)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Serialized in memory first: torch's writer reports a failed write (disk full) as a bare RuntimeError.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        if self.hold_last and path.name == "last.ckpt":
            self._held = path, buffer
        else:
            self._write(path, buffer)

    def write_held(self) -> None:
        """Write the held-back ``last.ckpt``, if any."""
        if self._held is not None:
            path, buffer = self._held
            self._held = None
            self._write(path, buffer)

    def drop_held(self) -> None:
        """Forget the held-back ``last.ckpt``: the one on disk stays."""
        self._held = None

    @staticmethod
    def _write(path: Path, buffer: io.BytesIO) -> None:
        try:
            write_atomic(path, buffer.getbuffer(), durable=True)
        except OSError as err:  # disk full, quota, read-only: name the checkpoint; the previous one is untouched
            raise OSError(err.errno, f"cannot write checkpoint ({err.strerror}); the previous one is intact", str(path)) from err


def holding_io(trainer: pl.Trainer) -> Optional[AtomicCheckpointIO]:
    """The trainer's checkpoint IO when it is ours, which may hold back ``last.ckpt``."""
    checkpoint_io = trainer.strategy.checkpoint_io
    return checkpoint_io if isinstance(checkpoint_io, AtomicCheckpointIO) else None


def validates_after(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether a validation follows this training batch: at an epoch's last batch, and every ``val_check_interval``
    batches (Lightning's rule, read from the trainer's public fields)."""
    if batch_idx + 1 >= trainer.num_training_batches:
        return True
    every = trainer.val_check_batch
    done = batch_idx if trainer.check_val_every_n_epoch is not None else trainer.fit_loop.epoch_loop.total_batch_idx
    return isinstance(every, int) and (done + 1) % every == 0


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (best by a metric + ``last.ckpt``), made safe to kill at any moment.

    Every write is atomic; ``last.ckpt`` is also refreshed every ``last_every_n_train_steps`` steps within an
    epoch, and on SIGTERM or Ctrl-C, so a crash or a preemption loses little work and always leaves a checkpoint
    that resumes; it is written once its step's metrics are logged, and never before a validation.
    """

    def __init__(self, *args: Any, last_every_n_train_steps: int = 500, **kwargs: Any) -> None:
        """
        Args:
            last_every_n_train_steps: Refresh ``last.ckpt`` every this many training steps within an epoch (0: only
                at epoch ends, which always save it once the epoch's validation has run).
        """
        super().__init__(*args, **kwargs)
        if last_every_n_train_steps < 0:
            raise ValueError(f"checkpoint.last_every_n_train_steps={last_every_n_train_steps} must be >= 0")
        self.last_every_n_train_steps = last_every_n_train_steps

    # private: ModelCheckpoint's one place every save goes through (best, top-k and last); no public hook around it.
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        """Save, unless the weights are not finite: a diverged model never becomes ``best`` or ``last``."""
        bad = [name for name, p in trainer.lightning_module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise DivergedError(f"not saving {filepath}: non-finite weights in {', '.join(bad[:3])}")
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:  # Lightning has set best_model_path/score by now: rundir.run reads them back
            write_summary(Path(self.dirpath), self.monitor, self.mode, self.best_model_path, self.best_model_score)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Always the run's own folder: Lightning would otherwise nest it under the first logger's name and version.
        # Resolved, as Lightning resolves a dirpath given to __init__: a resumed run must find its own last.ckpt.
        self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
        super().setup(trainer, pl_module, stage)
        # Lightning logs a step's (and an epoch's) metrics after the hooks that save it: last.ckpt, the point a run
        # resumes from, is written once they are on disk (at the next batch, or the training's end), so that a kill
        # in between leaves the previous one, never one whose metrics the resumed run would not log again.
        if isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO) and stage == "fit":
            trainer.strategy.checkpoint_io.hold_last = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if held := holding_io(trainer):
            held.write_held()

    # private, here and below: ModelCheckpoint has no public "save last.ckpt now"; its own _save_last_checkpoint,
    # the checks it makes before it and its record of the last step saved (tests/test_private_members.py).
    # Never before a validation: a run resumed from a checkpoint taken before it would skip it (and the epoch-end
    # metrics) for good; the epoch's end saves last.ckpt once its validation has run.
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self.last_every_n_train_steps
        if n and self.save_last and trainer.global_step % n == 0 and not validates_after(trainer, batch_idx) \
                and not self._should_skip_saving_checkpoint(trainer):
            saved_before = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            # A validation at this same step must still save its best-by-metric checkpoint: Lightning skips any save
            # at a step already saved, so this refresh of last.ckpt does not count as one.
            self._last_global_step_saved = saved_before

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After Lightning's saves at the epoch's end (validation has run by then), refresh ``last.ckpt`` too:
        Lightning writes it only at a step where it also saved a best-by-metric checkpoint, so after an epoch that
        did not improve, last.ckpt would lag an epoch behind."""
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``last.ckpt`` holds the final step (Lightning's own saves it only if none was ever written)."""
        super().on_train_end(trainer, pl_module)
        if self.save_last and not trainer.fast_dev_run and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if held := holding_io(trainer):
            held.write_held()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """On SIGTERM or Ctrl-C, save ``last.ckpt`` at the current step, unless in a validation (the one from before
        it stays); other errors leave the last good one (and what ``save_on_exception`` asks Lightning to save)."""
        stopped = isinstance(exception, (SIGTERMException, KeyboardInterrupt))
        training = trainer.state.fn == "fit" and not (trainer.validating or trainer.sanity_checking)
        save = stopped and self.save_last and training
        held = holding_io(trainer)
        if held and not save:  # an error may come before the held last.ckpt's metrics are logged: not that one
            held.drop_held()
        super().on_exception(trainer, pl_module, exception)  # Lightning's save_on_exception, if the user asked
        if save and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if held:
            held.write_held()
        if save:
            rank_zero_info(f"Interrupted at step {trainer.global_step}: saved {self.last_model_path}")
        elif stopped and trainer.validating and not self.save_on_exception:
            # Lightning counts a validation saved mid-way as run: a resume would skip the rest of it.
            kept = f"kept {self.last_model_path}, from before it" if self.last_model_path else "no checkpoint yet"
            rank_zero_info(f"Interrupted in the validation at step {trainer.global_step}: {kept}")


class ResumeState(Callback):
    """Saves what Lightning leaves out of a checkpoint and a resumed run needs to continue exactly as if uninterrupted.

    - the random number generators (torch, CUDA, Python), for anything stochastic in the model;
    - each tracker's state (loggers with ``state_dict``/``load_state_dict``, such as ours for CSV and TensorBoard),
      with the checkpoint's step: resuming drops what a killed run logged after it, so no step shows twice.
    """

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.setdefault(STATE_KEY, {})
        state["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # Python's state is (version, tuple of ints, gauss): stored as lists, plain values only.
            "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        }
        if trainer.is_global_zero:
            state["trackers"] = {
                key: {**tracker.state_dict(), "global_step": trainer.global_step}
                for key, tracker in tracker_keys(trainer.loggers).items()
            }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get(STATE_KEY, {})
        if trainer.state.fn != "fit":
            # An evaluation is logged at the checkpoint's step and epoch, after the run's curves: logged at step 0,
            # TensorBoard would take it for a restart and drop every later point. Nothing else of the fit loop runs.
            if "loops" in checkpoint:
                trainer.fit_loop.load_state_dict(checkpoint["loops"]["fit_loop"])
            return  # and it neither draws random numbers nor rewrites the run's history
        if "rng" in state:
            rng = state["rng"]
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            version, internal, gauss = rng["python"]
            random.setstate((version, tuple(internal), gauss))
        if trainer.is_global_zero:
            saved: dict[str, Any] = state.get("trackers", {})
            for key, tracker in tracker_keys(trainer.loggers).items():
                if key in saved:
                    tracker.load_state_dict(saved[key])
