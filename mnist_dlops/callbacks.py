"""Callbacks the CLI always adds: saving the resolved config into the run and sending it to every tracker."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import yaml
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

    ``fit`` writes ``config.yaml``; an evaluation of the run's checkpoint (``validate``/``test``/``predict``) lands
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
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Log the full config (trainer, model, data, checkpoint) to every tracker, not only the model's arguments."""
        # Round-trip through the YAML dump: plain values only (no Path objects), exactly what config.yaml holds.
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
