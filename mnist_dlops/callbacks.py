"""Callbacks the CLI always adds: the run's config (saved, logged, kept in checkpoints) and its resumable state."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning import Callback
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.trainer.states import TrainerFn


def free_name(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/stem.suffix``, or ``stem-1.suffix``, ``stem-2.suffix``... whichever does not exist yet."""
    path, n = folder / f"{stem}{suffix}", 0
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved config into the run directory and logs it, whole, as every tracker's hyperparameters.

    ``fit`` writes ``config.yaml`` (a resumed fit ``config-1.yaml``...); an evaluation of the run's checkpoint (``validate``/``test``/``predict``) lands
    in the same directory and writes ``config.<stage>.yaml`` beside it (``-1``, ``-2``... if repeated), so nothing
    of the training run is overwritten.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            run_dir = Path(trainer.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            stem = "config" if stage == TrainerFn.FITTING else f"config.{TrainerFn(stage).value}"
            name = free_name(run_dir, stem, ".yaml")
            self.parser.save(self.config, name, skip_none=False, overwrite=False, multifile=False)
            # A resumed fit continues a run whose trackers hold its config already: logging it again would add a
            # second copy to each (TensorBoard's hparams at step 0, for one). Its own config file is written above.
            if not (stage == TrainerFn.FITTING and self.config.get("ckpt_path")):
                self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Log the full config (trainer, model, data, checkpoint) to every tracker, not only the model's arguments."""
        # Round-trip through the YAML dump: plain values only (no Path objects), exactly what config.yaml holds.
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the model graph where a tracker is set to (TensorBoard's ``log_graph``), as autologging would have.

        Here, not in ``setup``: the model must be on its device first.
        """
        if trainer.is_global_zero and not trainer.ckpt_path:
            for logger in trainer.loggers:
                logger.log_graph(pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Keep the run's whole config in each checkpoint (as YAML text), so that ``fit --ckpt_path`` can resume it."""
        checkpoint.setdefault(STATE_KEY, {})["config"] = self.parser.dump(self.config, skip_none=False)


# Top-level key of this project's own entries in a checkpoint; every value under it is plain (weights_only-safe).
STATE_KEY = "mnist_dlops"


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
                _tracker_key(i, logger): {**logger.state_dict(), "global_step": trainer.global_step}
                for i, logger in enumerate(trainer.loggers)
                if hasattr(logger, "state_dict")
            }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get(STATE_KEY, {})
        if trainer.state.fn != "fit":
            return  # evaluating a checkpoint neither draws random numbers nor rewrites the run's history
        if "rng" in state:
            rng = state["rng"]
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            version, internal, gauss = rng["python"]
            random.setstate((version, tuple(internal), gauss))
        if trainer.is_global_zero:
            trackers: dict[str, Any] = state.get("trackers", {})
            for i, logger in enumerate(trainer.loggers):
                if hasattr(logger, "load_state_dict") and _tracker_key(i, logger) in trackers:
                    logger.load_state_dict(trackers[_tracker_key(i, logger)])


def _tracker_key(index: int, logger: Any) -> str:
    return f"{index}:{type(logger).__name__}"
