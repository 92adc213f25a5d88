"""A run's folders: one ``version_N`` per run, claimed atomically; the runs under a folder; a checkpoint's run."""

from __future__ import annotations

import re
from pathlib import Path

_VERSION = re.compile(r"version_(\d+)$")


# One run, one directory: Lightning lets each logger pick its own folder and version, so two trackers of one run
# could disagree (TensorBoard in version_3, CSV in version_4). The CLI claims the directory first and gives it to the
# trainer and to every logger whose save_dir is null.
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


def run_dir_of(ckpt_path: str | None) -> Path | None:
    """The run directory a checkpoint was written in (``<run>/checkpoints/x.ckpt``), if it is one of ours."""
    if not ckpt_path:
        return None
    run = Path(ckpt_path).resolve().parent.parent
    return run if (run / "config.yaml").is_file() else None
