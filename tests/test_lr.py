"""The optimizer's lr is the lr that drives training: the one-cycle schedule peaks at it, trackers and the runs
table show it, and short runs whose warm-up is a single step still work."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO, make_idx_set

from mnist_dlops.cli.app import cli_main
from mnist_dlops.commands.runs import runs_table

SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
         "--data.val_size", "20", "--data.batch_size", "16", "--trainer.enable_progress_bar", "false",
         "--data.download", "false",
         "--trainer.callbacks", "[]", "-c", str(REPO / "configs/csv.yaml")]


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_idx_set(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def logged_lr(run: Path) -> pd.Series:
    return pd.read_csv(run / "metrics.csv")["train/lr"].dropna()


@pytest.mark.parametrize(
    ("flags", "peak"),
    [
        (["--model.optimizer.init_args.lr", "0.0003"], 0.0003),
        (["--model.optimizer.init_args.lr", "0.03"], 0.03),
        (["--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.1", "--model.optimizer.momentum", "0.9"],
         0.1),
        (["--model.lr_scheduler.init_args.max_lr", "0.002"], 0.002),  # an explicit max_lr overrides it
    ],
    ids=["adam-3e-4", "adam-3e-2", "readme-sgd", "max_lr"],
)
def test_the_configured_lr_is_the_peak(cwd: Path, flags: list[str], peak: float) -> None:
    cli_main(["fit", "--data.data_dir", "data", "--trainer.limit_train_batches", "12", *SHORT, *flags])
    run = cwd / "lightning_logs/version_0"
    lrs = logged_lr(run)
    assert len(lrs) == 12
    assert lrs.max() == pytest.approx(peak, rel=1e-6)
    assert lrs.iloc[0] == pytest.approx(peak / 25, rel=1e-6) and lrs.iloc[-1] < peak / 1000
    assert runs_table(cwd / "lightning_logs")["lr"].tolist() == [peak]


def test_momentum_is_not_cycled_unless_asked(cwd: Path) -> None:
    """torch's one-cycle would cycle SGD's momentum from 0.95 down to 0.85; the configured 0.9 stays."""
    cli_main(["fit", "--data.data_dir", "data", "--trainer.limit_train_batches", "12", *SHORT,
              "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.1", "--model.optimizer.momentum", "0.9"])
    ckpt = torch.load(cwd / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["momentum"] == 0.9


@pytest.mark.parametrize("steps", [1, 2, 4, 5])
def test_short_runs_train(cwd: Path, steps: int) -> None:
    """Four steps at pct_start 0.25 is a one-step warm-up, where torch's one-cycle divides by zero."""
    cli_main(["fit", "--data.data_dir", "data", "--trainer.limit_train_batches", str(steps), *SHORT])
    assert len(logged_lr(cwd / "lightning_logs/version_0")) == steps
