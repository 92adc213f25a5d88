"""``--ckpt_path``: the checkpoint's stored config put in front of the command line as its first ``--config``, so
it is what runs and what ``--print_config`` shows, and the user's own flags still override it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from mnist_dlops.cli import argv
from mnist_dlops.cli.parser import check_yaml
from mnist_dlops.errors import TRAINING, CheckpointError, ConfigError
from mnist_dlops.rundir.checkpoints import STATE_KEY
from mnist_dlops.rundir.run import load_checkpoint, resolve_ckpt
from mnist_dlops.trust import check_classes


def checkpoint_config(checkpoint: dict[str, Any], subcommand: str, path: Path) -> dict[str, Any]:
    """The configuration to start from, read from the one copy a checkpoint keeps (the run's config, saved by
    ``RunConfigSaver``): all of it to resume ``fit``; to evaluate, the model, the data module, and the run's trackers
    and callbacks (so results reach the same trackers, with the same plots)."""
    if subcommand == "fit" and (not checkpoint.get("optimizer_states") or "loops" not in checkpoint):
        raise CheckpointError(f"{path}: holds weights only, nothing to resume training from")
    saved = checkpoint.get(STATE_KEY, {}).get("config")
    if not saved:
        raise CheckpointError(
            f"{path}: records no run configuration (weights only, or not written by this project); use the run's "
            "last.ckpt or best checkpoint, or load it in Python with MNISTModule.load_from_checkpoint"
        )
    check_yaml(saved, f"{path}: its stored config")
    config = yaml.safe_load(saved)
    config.pop("ckpt_path", None)
    # A resume continues in the checkpoint's own run, an evaluation too (or a new one under the user's --runs_dir):
    # a checkpoint does not choose where anything is written.
    config.pop("run_dir", None)
    config.pop("runs_dir", None)
    if subcommand == "fit":
        return config
    trainer = config.get("trainer") or {}
    evaluated = {"model": config["model"], "data": config["data"]}
    evaluated["trainer"] = {key: trainer[key] for key in ("logger", "callbacks") if key in trainer}
    return evaluated


def restore_from_checkpoint(args: list[str]) -> tuple[list[str], Optional[Path], Optional[dict[str, Any]]]:
    """``args`` with ``--ckpt_path`` resolved to a file and that checkpoint's config inserted as the first
    ``--config``, and the checkpoint file and its contents (loaded and checked here, once), if there is one."""
    sub = argv.subcommand(args, TRAINING)
    if sub is None:
        return args, None, None
    head, rest = args[: sub + 1], args[sub + 1 :]
    option = argv.last(rest, "ckpt_path")
    if option is None or not option.value or argv.last(rest, "help"):
        return args, None, None
    runs_dir = argv.last(rest, "runs_dir")
    value = option.value
    path = resolve_ckpt(value, Path(runs_dir.value if runs_dir and runs_dir.value else "lightning_logs"))
    checkpoint = load_checkpoint(path)
    config = checkpoint_config(checkpoint, args[sub], path)
    try:  # strictly, before the parser imports anything the checkpoint names
        check_classes(config)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None
    rest = [*rest[: option.start], f"--ckpt_path={path}", *rest[option.end :]]
    return [*head, "--config", yaml.safe_dump(config, sort_keys=False), *rest], path, checkpoint
