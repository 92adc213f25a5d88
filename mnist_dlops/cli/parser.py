"""Configs are untrusted input: one-line parse errors, no abbreviated flags, values checked before a run starts."""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, NoReturn

import yaml
from jsonargparse import Namespace, get_loader, set_loader
from pytorch_lightning.cli import LightningArgumentParser

from mnist_dlops.cli import argv
from mnist_dlops.errors import ArgumentsError, ConfigError, one_line
from mnist_dlops.importguard import GATE

# A config holds hundreds of values; a YAML alias bomb of a few hundred bytes expands to billions.
MAX_YAML_VALUES = 100_000


def _values(node: yaml.Node, seen: dict[int, int]) -> int:
    """How many values ``node`` stands for once its aliases are expanded (each shared node counted once per use)."""
    if id(node) not in seen:
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        seen[id(node)] = 1 + sum(_values(child, seen) for child in children)
    return seen[id(node)]


def check_yaml(text: str, name: str) -> None:
    """YAML from anywhere is refused in one line, in bounded memory, when its aliases would expand it past
    ``MAX_YAML_VALUES`` values or it nests deeper than Python can parse; any other fault is the parser's to report."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        size = _values(node, {}) if node is not None else 0
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply to parse") from None
    except yaml.YAMLError:
        return
    if size > MAX_YAML_VALUES:
        raise ConfigError(f"{name}: its aliases expand to more than {MAX_YAML_VALUES:,} values; refusing it")


def _bounded(load: Any) -> Any:
    def bounded_load(text: str) -> Any:
        check_yaml(text, "a config value or file")
        return load(text)

    return bounded_load


# Every YAML that jsonargparse reads (a -c file, one nested in it, a flag's value) goes through the check first.
set_loader("yaml", _bounded(get_loader("yaml")), exceptions=(yaml.YAMLError,))


class OneLineParser(LightningArgumentParser):
    """LightningCLI's parser with argparse's prefix matching off (``--trainer.max_epoch`` is an error, not
    ``max_epochs``) and its errors raised as one line (``user_errors`` prints it, exit status 2, no usage dump)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse parses tentatively with errors raised, then retries: let it
            super().error(message, ex)
        if GATE.depth and GATE.refused:  # the gate refused a module the config named: that is the news, with the key
            keys = re.findall(r'Parser key "([^"]+)"', str(message))  # outermost first: model, model.network
            keys = [key for key, inner in zip(keys, [*keys[1:], ""]) if not inner.startswith(key)]
            message = ": ".join([*keys, GATE.refused[-1]])
        unknown = re.search(r"unrecognized arguments: --?([\w.]+)", str(message), re.IGNORECASE)
        if unknown:  # a misspelled flag: the closest of the parser's own keys
            close = difflib.get_close_matches(unknown.group(1), list(self.get_defaults().keys()), n=1)
            message = f"{message} (did you mean --{close[0]}?)" if close else message
        raise ArgumentsError(one_line(message))


def check_values(config: Namespace) -> None:
    """Values that parse but make no sense, or that a run would ignore, caught before any run directory exists."""
    optimizer = config.get("model.optimizer")
    init_args = optimizer.get("init_args", Namespace()) if isinstance(optimizer, Namespace) else Namespace()
    lr, fused = init_args.get("lr"), init_args.get("fused")
    if isinstance(lr, (int, float)) and not lr > 0:
        raise ConfigError(f"model.optimizer.init_args.lr={lr}: must be > 0")
    precision, clip = str(config.get("trainer.precision")), config.get("trainer.gradient_clip_val")
    if clip and fused and "mixed" in precision:  # Lightning's mixed-precision plugin refuses it mid-run, traceback
        raise ConfigError(
            f"trainer.gradient_clip_val={clip}: Lightning cannot clip a fused optimizer's gradients under "
            f"trainer.precision={precision}; add --model.optimizer.init_args.fused=false (or --trainer.precision=32-true)"
        )
    epochs = config.get("trainer.max_epochs")
    if epochs is not None and (epochs == 0 or epochs < -1):
        raise ConfigError(f"trainer.max_epochs={epochs}: must be >= 1 (or -1 for no limit)")
    limits = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")
    for key in (f"trainer.{name}" for name in limits):
        value = config.get(key)
        if isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"{key}={value}: must be >= 0")
    if config.get("trainer.limit_train_batches") == 0:
        raise ConfigError("trainer.limit_train_batches=0: nothing would be trained; give a number of batches >= 1")
    if not str(config.get("runs_dir") or "").strip():
        raise ConfigError("runs_dir='': give the folder that holds the runs (default: lightning_logs)")
    # Each run gets its own directory and checkpoints its checkpoints/ folder: a value here would be ignored.
    if config.get("trainer.default_root_dir") is not None:
        raise ConfigError(
            f"trainer.default_root_dir={config.trainer.default_root_dir}: each run gets its own directory under "
            "--runs_dir; set that instead"
        )
    if config.get("checkpoint.dirpath") is not None:
        raise ConfigError(
            f"checkpoint.dirpath={config.checkpoint.dirpath}: checkpoints are always written to the run's "
            "checkpoints/ folder; use --runs_dir to choose where runs go"
        )


def check_config_files(args: list[str]) -> None:
    """Every ``-c``/``--config`` file that exists must be valid YAML; the error names the file and the line."""
    for path in argv.config_files(args):
        if "\n" in path or not os.path.isfile(path):
            continue  # a missing file is jsonargparse's to report; a YAML string is parsed as such
        try:
            with open(path) as f:
                text = f.read()
            check_yaml(text, path)
            content = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}: malformed YAML{where}: {getattr(err, 'problem', None) or err}") from None
        if content is None:
            raise ConfigError(f"{path}: empty config file (expected keys such as trainer:, model:, data:)")
        if not isinstance(content, dict):
            raise ConfigError(f"{path}: a config file holds keys (trainer:, model:, data:...), not a {type(content).__name__}")
