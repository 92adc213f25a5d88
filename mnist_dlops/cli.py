"""MNISTCLI: LightningCLI with the project's defaults, the links between data and model, and one-line errors."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

from mnist_dlops.data import MNISTDataModule
from mnist_dlops.module import MNISTModule
from mnist_dlops.sources import DataError


class MNISTCLI(LightningCLI):
    """``fit``/``validate``/``test``/``predict`` over MNISTModule and MNISTDataModule, configured from YAML."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The network's output size and the plots' labels follow the data module's task: set once, there.
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        # Checkpointing is always on and configurable as `checkpoint.*`: the best by val/loss, plus last.ckpt.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                # Metric names hold a '/', which Lightning would turn into a sub-folder: name the parts by hand.
                "checkpoint.filename": "epoch{epoch:02d}-val_loss{val/loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "trainer.max_epochs": 3,
                "trainer.logger": {
                    "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "lightning_logs", "name": ""},
                },
            }
        )


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix (bad data files, ...) into one ``error:`` line and exit status 1."""
    try:
        yield
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def cli_main(args: ArgsType = None) -> None:
    """Parse ``args`` (default: the command line) and run the chosen subcommand."""
    with user_errors():
        MNISTCLI(MNISTModule, MNISTDataModule, args=args, seed_everything_default=42, auto_configure_optimizers=False)
