"""Configs are untrusted input: one-line parse errors, no abbreviated flags, values checked before a run starts.

What classes a config may name is ``mnist_dlops.trust``'s business.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

from jsonargparse import Namespace
from pytorch_lightning.cli import LightningArgumentParser

from mnist_dlops.errors import ConfigError


def one_line(message: str, limit: int = 400) -> str:
    """jsonargparse's multi-line message as one line: its lines joined, spaces collapsed, cut at ``limit``."""
    text = re.sub(r"\s+", " ", " ".join(line.strip() for line in str(message).splitlines() if line.strip()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class OneLineParser(LightningArgumentParser):
    """LightningCLI's parser with argparse's prefix matching off (``--trainer.max_epoch`` is an error, not
    ``max_epochs``) and errors printed as a single ``error:`` line, exit status 2, no usage dump."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse parses tentatively with errors raised, then retries: let it
            super().error(message, ex)
        print(f"error: {one_line(message)}", file=sys.stderr)
        sys.exit(2)


def check_values(config: Namespace) -> None:
    """Values that parse but make no sense, caught before any run directory exists."""
    optimizer = config.get("model.optimizer")
    lr = optimizer.get("init_args", Namespace()).get("lr") if isinstance(optimizer, Namespace) else None
    if isinstance(lr, (int, float)) and not lr > 0:
        raise ConfigError(f"model.optimizer.init_args.lr={lr}: must be > 0")
    epochs = config.get("trainer.max_epochs")
    if epochs is not None and epochs < -1:
        raise ConfigError(f"trainer.max_epochs={epochs}: must be >= 0 (or -1 for no limit)")
    for key in ("trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.limit_test_batches"):
        value = config.get(key)
        if isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"{key}={value}: must be >= 0")


def check_config_files(args: list[str]) -> None:
    """Every ``-c``/``--config`` file that exists must be valid YAML; the error names the file and the line."""
    import yaml

    for i, arg in enumerate(args):
        path = args[i + 1] if arg in ("-c", "--config") and i + 1 < len(args) else None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if not path or "\n" in path or not os.path.isfile(path):
            continue  # a missing file is jsonargparse's to report; a YAML string is parsed as such
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}: malformed YAML{where}: {getattr(err, 'problem', None) or err}") from None
