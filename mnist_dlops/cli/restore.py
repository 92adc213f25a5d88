"""``--ckpt_path``: find the checkpoint meant (``last``, ``best``, a run folder or a file) and restore its config.

LightningCLI restores the model's arguments from a checkpoint after parsing, over the user's own flags, and not
the data module's; ``--print_config`` shows the defaults. Here the checkpoint's configuration is put in front of
the command line as its first ``--config``, so it is what runs and what ``--print_config`` shows, and every
``--config`` or flag the user gives after it still overrides it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from mnist_dlops.cli import argv
from mnist_dlops.cli.parser import check_yaml
from mnist_dlops.errors import TRAINING, CheckpointError, ConfigError, invoked
from mnist_dlops.rundir.checkpoints import STATE_KEY, load_checkpoint
from mnist_dlops.rundir.folders import recorded_best, training_runs
from mnist_dlops.trust import check_classes


def latest_run(runs_dir: Path) -> Path:
    """The newest training run (highest ``version_N`` with a ``config.yaml``) under ``runs_dir``."""
    runs = training_runs(runs_dir)
    if not runs:
        raise CheckpointError(f"{runs_dir}: no training run to take a checkpoint from (run `{invoked('fit')}` first)")
    return runs[-1]


def best_of(last: Path) -> Path:
    """The best checkpoint recorded by the checkpoint callback in ``last`` (looked up next to it if moved)."""
    best, found = recorded_best(load_checkpoint(last), last.parent)
    if not best:
        raise CheckpointError(f"{last}: records no best checkpoint (was it validated?); pass a .ckpt file instead")
    if found is None:
        raise CheckpointError(f"{last}: its best checkpoint {best} no longer exists")
    return found


def best_checkpoint(runs_dir: Path) -> tuple[Path, str]:
    """The best checkpoint of every training run under ``runs_dir``, by the metric their checkpoints monitor, and
    how it was chosen (``val/loss 0.0301, the best of 3 runs``).

    Runs that monitor different metrics, or the same one in opposite directions, cannot be ranked together: that
    is one line asking for a run folder or a file."""
    ranked = []
    for run in training_runs(runs_dir) or [latest_run(runs_dir)]:  # none: latest_run says so
        last = run / "checkpoints" / "last.ckpt"
        if not last.is_file():
            continue
        checkpoint = load_checkpoint(last)
        state = next((s for s in checkpoint.get("callbacks", {}).values()
                      if isinstance(s, dict) and s.get("best_model_score") is not None), None)
        found = recorded_best(checkpoint, last.parent)[1]
        if state is None or found is None:
            continue
        mode = ((yaml.safe_load((run / "config.yaml").read_text()) or {}).get("checkpoint") or {}).get("mode", "min")
        ranked.append(((state["monitor"], mode), float(state["best_model_score"]), found))
    if not ranked:
        raise CheckpointError(f"{runs_dir}: no training run with a best checkpoint (run `{invoked('fit')}` first)")
    kinds = {kind for kind, _, _ in ranked}
    if len(kinds) > 1:
        raise CheckpointError(f"best: the runs under {runs_dir} monitor different metrics "
                              f"({', '.join(sorted(f'{m} ({mode})' for m, mode in kinds))}); pass a run folder or a .ckpt file")
    (monitor, mode), = kinds
    score, path = (min if mode == "min" else max)((s, p) for _, s, p in ranked)
    return path, f"{monitor} {score:.4f}, the best of {len(ranked)} run{'s' if len(ranked) > 1 else ''}"


def resolve_ckpt(value: str, runs_dir: Path) -> Path:
    """Turn ``best`` (the best checkpoint of all runs), ``last`` (the newest run's last.ckpt), a run folder or a
    file path into the checkpoint file it means."""
    if value == "best":
        return best_checkpoint(runs_dir)[0]
    if value == "last":
        run = latest_run(runs_dir)
    elif Path(value).is_dir() and (Path(value) / "checkpoints").is_dir():
        run = Path(value)
    else:
        return Path(value)
    return run_checkpoint(run)


def run_checkpoint(run: Path, best: bool = False) -> Path:
    """A run folder's ``last.ckpt``, or the best checkpoint it records."""
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise CheckpointError(f"{run}: nothing to resume or evaluate, it has no checkpoints/last.ckpt yet")
    return best_of(last) if best else last


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
