"""Resuming: a run killed mid-epoch and resumed ends exactly like an uninterrupted one; SIGTERM exits non-zero."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO, read_scalars, run_cli

CONFIG = """
trainer:
  max_epochs: 3
  limit_train_batches: 50
  limit_val_batches: 2
  log_every_n_steps: 5
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    - class_path: mnist_dlops.trackers.tensorboard.TensorBoardLogger
    - class_path: mnist_dlops.trackers.csv.CSVLogger
checkpoint:
  last_every_n_train_steps: 10
data:
  data_dir: {data_dir}
"""


def start_fit(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "fit", "-c", "run.yaml", *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for_checkpoint(proc: subprocess.Popen, ckpt: Path, min_step: int, timeout: float = 300) -> int:
    """Poll ``ckpt`` until it holds ``min_step`` or more; return its step (the process keeps running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.is_file():
            step = torch.load(ckpt, weights_only=True)["global_step"]
            if step >= min_step:
                return step
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint at step >= {min_step} (process exit code {proc.poll()})")


@pytest.fixture
def runs(tmp_path: Path, mnist_dir: Path) -> tuple[Path, Path]:
    """Two working directories with the same run config: one to run through, one to interrupt."""
    dirs = tmp_path / "straight", tmp_path / "interrupted"
    for d in dirs:
        d.mkdir()
        (d / "run.yaml").write_text(CONFIG.format(data_dir=mnist_dir))
    return dirs


@pytest.mark.slow  # several runs or processes: in `pytest -m slow` and CI, to keep the default run short
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(runs: tuple[Path, Path]) -> None:
    straight, interrupted = runs
    result = run_cli("fit", "-c", "run.yaml", cwd=straight)
    assert result.returncode == 0, result.stderr[-3000:]

    run = interrupted / "lightning_logs" / "version_0"
    proc = start_fit(interrupted)
    step = wait_for_checkpoint(proc, run / "checkpoints" / "last.ckpt", min_step=70)
    time.sleep(0.3)  # let it log steps past the checkpoint, which the resumed run must not keep twice
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert 70 <= step < 150 and step % 50 != 0, "the kill must land mid-epoch"

    # The documented short form resumes the newest run, in place.
    result = run_cli("fit", "--ckpt_path", "last", "--log_level", "info", cwd=interrupted)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (interrupted / "lightning_logs").iterdir()) == ["version_0"]
    assert "Restored all states from the checkpoint at lightning_logs/version_0/checkpoints/last.ckpt" in result.stderr
    assert (run / "config-1.yaml").is_file()  # the resumed part's config, beside the original

    a = torch.load(straight / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 150
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key  # bitwise on CPU

    # Hardware utilization (DeviceStatsMonitor) is logged too, and differs between any two runs: compare the rest,
    # and the hardware columns' steps.
    csv_a = pd.read_csv(straight / "lightning_logs/version_0/metrics.csv")
    csv_b = pd.read_csv(run / "metrics.csv")[csv_a.columns]
    hardware = [c for c in csv_a.columns if c.startswith("train/system/")]
    assert hardware
    model_rows = csv_a.drop(columns=hardware).dropna(how="all", subset=[c for c in csv_a if "/" in c and c not in hardware])
    assert len(model_rows) == 150 // 5 + 3 * 2  # train/loss every 5 steps; per epoch one val row and one train row
    pd.testing.assert_frame_equal(csv_a.drop(columns=hardware), csv_b.drop(columns=hardware))
    pd.testing.assert_frame_equal(csv_a[hardware].isna(), csv_b[hardware].isna())

    # TensorBoard, read with its own reader: every step once, values equal to the uninterrupted run's.
    tb_a, tb_b = read_scalars(straight / "lightning_logs/version_0"), read_scalars(run)
    assert tb_a.keys() == tb_b.keys()
    assert {k: v for k, v in tb_a.items() if k not in hardware} == {k: v for k, v in tb_b.items() if k not in hardware}
    assert all(len(tb_a[k]) == len(tb_b[k]) for k in tb_a)


@pytest.mark.slow  # real data or several processes: run by `pytest -m slow` and CI
def test_sigterm_saves_a_resumable_checkpoint_and_exits_non_zero(runs: tuple[Path, Path]) -> None:
    _, cwd = runs
    run = cwd / "lightning_logs" / "version_0"
    proc = start_fit(cwd)
    step = wait_for_checkpoint(proc, run / "checkpoints" / "last.ckpt", min_step=20)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output[-3000:]  # a scheduler must not mistake preemption for success
    stopped = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert step <= stopped < 150
    assert f"resume with: python cli.py fit --ckpt_path {Path('lightning_logs/version_0')}/checkpoints/last.ckpt" in output

    result = run_cli("fit", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 150
    steps = pd.read_csv(run / "metrics.csv").dropna(subset=["train/loss"])["step"].tolist()
    assert steps == list(range(4, 150, 5))  # no step missing or doubled across the stop


def test_last_ckpt_is_not_refreshed_at_an_epochs_last_batch(tmp_path: Path, tiny_idx: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A periodic last.ckpt at an epoch's last batch would be taken before that epoch's validation and epoch-end
    metrics: a run resumed from it skips them for good (the kill-and-resume test above once found 64 rows of 66)."""
    import pytorch_lightning as pl
    from pytorch_lightning import Callback

    from mnist_dlops.cli.app import run

    seen: list[tuple[int, int]] = []

    class LastCheckpointAtValidation(Callback):
        def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not trainer.sanity_checking:
                last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
                seen.append((trainer.global_step, torch.load(last, weights_only=True)["global_step"]))

    monkeypatch.chdir(tmp_path)
    run(["fit", "--data.data_dir", str(tiny_idx), "--data.val_size", "10", "--data.batch_size", "8",
         "--data.download", "false", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4",
         "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.callbacks", "[]",
         "--checkpoint.last_every_n_train_steps", "2"], callbacks=[LastCheckpointAtValidation()])
    # Refreshed at step 2 and 6 within the epochs, not at 4 and 8 (their last batches) before validating them.
    assert seen == [(4, 2), (8, 6)]
