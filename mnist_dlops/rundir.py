"""One run, one directory: claim ``<runs_dir>/version_N`` and point every tracker and checkpoint into it.

Lightning lets each logger pick its own folder and version, so two trackers in one run can disagree (TensorBoard
in ``version_3``, CSV in ``version_4``) and W&B writes ``./config.yaml`` and ``./wandb`` in the working directory.
Here the CLI claims the run directory first and every logger writes inside it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional


_VERSION = re.compile(r"version_(\d+)$")


def claim_run_dir(runs_dir: Path) -> Path:
    """Create and return ``runs_dir/version_N`` for the lowest free N.

    ``mkdir`` either creates the directory or fails because it exists, atomically, so two runs started at the same
    instant never share a directory.
    """
    runs_dir.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in runs_dir.iterdir() if (m := _VERSION.match(p.name))]
    n = max(taken, default=-1) + 1
    while True:
        try:
            (runs_dir / f"version_{n}").mkdir()
            return runs_dir / f"version_{n}"
        except FileExistsError:
            n += 1


def training_runs(runs_dir: Path) -> list[Path]:
    """The run folders under ``runs_dir`` that hold a training config, in version order."""
    runs = [p for p in runs_dir.glob("version_*") if _VERSION.match(p.name) and (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda p: int(_VERSION.match(p.name).group(1)))


def recorded_best(last_checkpoint: dict[str, Any], folder: Path) -> tuple[Optional[str], Optional[Path]]:
    """The best checkpoint the checkpoint callback recorded in a loaded ``last.ckpt``: (recorded path, existing file).

    The file is looked up in ``folder`` (where last.ckpt is) first, so a moved run still finds it; None if gone.
    """
    states = last_checkpoint.get("callbacks", {}).values()
    best = next((s["best_model_path"] for s in states if isinstance(s, dict) and s.get("best_model_path")), None)
    if not best:
        return None, None
    found = next((c for c in (folder / Path(best).name, Path(best)) if c.is_file()), None)
    return best, found


def run_dir_of(ckpt_path: str | None) -> Path | None:
    """The run directory a checkpoint was written in (``<run>/checkpoints/x.ckpt``), if it is one of ours."""
    if not ckpt_path:
        return None
    run = Path(ckpt_path).resolve().parent.parent
    return run if (run / "config.yaml").is_file() else None
