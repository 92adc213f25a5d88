"""``cli_main`` is re-entrant: many runs in one process (as a sweep makes them) leave no state behind and give the
results the same commands give as separate processes."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, make_idx_set, run_cli

from mnist_dlops.cli.app import cli_main

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6", "--trainer.limit_val_batches", "2",
        "--data.val_size", "40", "--data.batch_size", "16", "--trainer.enable_progress_bar", "false",
        "--data.download", "false", "--data.data_dir", "data"]
TRACKERS = ["tensorboard", "csv", "wandb", "neptune", "all_trackers"]


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def tracker_configs(tracker: str) -> list[str]:
    """The tracker's config, plus CSV (read back below) where it has none."""
    csv = [] if tracker in ("csv", "all_trackers") else ["--trainer.logger+=mnist_dlops.trackers.csv.CSVLogger"]
    return ["-c", str(REPO / f"configs/{tracker}.yaml"), *csv]


def val_loss(run: Path) -> float:
    return float(pd.read_csv(run / "metrics.csv")["val/loss"].dropna().iloc[-1])


@pytest.mark.slow  # several runs or processes: in `pytest -m slow` and CI, to keep the default run short
def test_ten_runs_in_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_idx_set(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    environ = dict(os.environ)
    files = []
    for i in range(10):
        tracker = TRACKERS[i % len(TRACKERS)]
        cli_main(["fit", *TINY, *tracker_configs(tracker)])
        if i % 3 == 0:  # an evaluation of that run, in the same process
            cli_main(["test", "--ckpt_path", f"lightning_logs/version_{i}", "--trainer.enable_progress_bar", "false",
                      "--data.data_dir", "data"])
        assert dict(os.environ) == environ, set(os.environ.items()) ^ set(environ.items())
        files.append(open_files())
    runs = sorted((tmp_path / "lightning_logs").glob("version_*"))
    assert [r.name for r in runs] == [f"version_{i}" for i in range(10)]
    for run in runs:
        assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    # Each W&B run is its own, in its own run directory (wandb keeps a current run and settings per process); a
    # test of the run continues its id.
    ids = []
    for i, run in enumerate(runs):
        if TRACKERS[i % len(TRACKERS)] in ("wandb", "all_trackers"):
            folders = list((run / "wandb").glob("offline-run-*"))
            assert len(folders) == (2 if i % 3 == 0 else 1), (i, folders)
            ids.append({f.name.rsplit("-", 1)[-1] for f in folders})
    assert len(ids) == 4 and all(len(i) == 1 for i in ids) and len(set.union(*ids)) == 4, ids
    assert not (tmp_path / "wandb").exists()
    # Open files settle once every tracker has run once (clients' one-time pools), then stay flat: the second round
    # of the five trackers opens no file it does not close.
    print("open files after each run:", files)
    assert files[5:] == [files[4]] * 5, files

    # The same commands as separate processes give the same numbers, bit for bit.
    for i in (0, 1):
        result = run_cli("fit", *TINY, *tracker_configs(TRACKERS[i]), "--runs_dir", "separate", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    for i, separate in enumerate(sorted((tmp_path / "separate").glob("version_*"))):
        assert val_loss(separate) == val_loss(runs[i])
