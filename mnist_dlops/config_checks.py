"""Configs are untrusted input: one-line parse errors, no abbreviated flags, and only classes a config may name.

A YAML file passed around can name any importable callable as a network or a callback: ``os.system`` would run a
shell command when the model is built. Every class or function a config names must come from the libraries a
config legitimately uses: torch, Lightning, torchmetrics, or this package.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

from jsonargparse import Namespace
from pytorch_lightning.cli import LightningArgumentParser

ALLOWED_MODULES = ("torch", "pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics", "mnist_dlops")


class ConfigError(ValueError):
    """A config value that parses but cannot be used; the message names the key and the value."""


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


def _named_objects(value: Any, key: str) -> Iterator[tuple[str, str]]:
    """Every (config key, dotted import path) that ``value`` names: ``class_path`` entries and callables."""
    if isinstance(value, Namespace):
        for sub_key, sub_value in value.items():  # leaves, with dotted keys
            yield from _named_objects(sub_value, f"{key}.{sub_key}" if key else sub_key)
        return
    if isinstance(value, dict):
        for sub_key, sub_value in value.items():
            yield from _named_objects(sub_value, f"{key}.{sub_key}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _named_objects(item, f"{key}[{i}]")
        return
    if key.endswith("class_path") and isinstance(value, str):
        yield key, value
    elif callable(value) and hasattr(value, "__module__") and hasattr(value, "__qualname__"):
        yield key, f"{value.__module__}.{value.__qualname__}"


def check_class_paths(config: Namespace) -> None:
    """Refuse a config naming a class or function outside ``ALLOWED_MODULES`` (``os.system``, ``subprocess.Popen``)."""
    for key, path in _named_objects(config, ""):
        if path.split(".", 1)[0] not in ALLOWED_MODULES:
            allowed = ", ".join(ALLOWED_MODULES)
            raise ConfigError(f"{key}: {path!r} is not allowed in a config (classes must come from {allowed})")


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
