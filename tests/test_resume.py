"""Resuming: a run killed mid-epoch and resumed ends exactly like an uninterrupted one; SIGTERM exits non-zero."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from conftest import REPO, read_scalars, run_cli
from pytorch_lightning import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mnist_dlops.cli import app

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


class SigtermInValidation(Callback):
    """Records each validation's step; sends this process SIGTERM after the first batch of epoch ``epoch``'s."""

    def __init__(self, epoch: Optional[int]) -> None:
        self.epoch = epoch
        self.validated: list[int] = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object,
                                batch: object, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking and batch_idx == 0:
            self.validated.append(trainer.global_step)
            if trainer.current_epoch == self.epoch:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning stops after this batch, the first of three


def tiny_fit(tiny_idx: Path, *args: str) -> list[str]:
    """A fit of four steps an epoch and three validation batches, in-process."""
    return ["fit", "--data.data_dir", str(tiny_idx), "--data.val_size", "10", "--data.batch_size", "8",
            "--data.eval_batch_size", "4", "--data.download", "false", "--trainer.limit_train_batches", "4",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.callbacks", "[]", *args]


def test_last_ckpt_is_not_refreshed_before_a_validation(tmp_path: Path, tiny_idx: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A periodic last.ckpt at a batch a validation follows (an epoch's last, a val_check_interval's) would be taken
    before that validation and the epoch-end metrics: a run resumed from it skips them for good (the kill-and-resume
    test above once found 64 rows of 66)."""
    seen: list[tuple[int, int]] = []

    class LastCheckpointAtValidation(Callback):
        def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not trainer.sanity_checking:
                last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
                seen.append((trainer.global_step, torch.load(last, weights_only=True)["global_step"]))

    monkeypatch.chdir(tmp_path)
    app.run(tiny_fit(tiny_idx, "--trainer.max_epochs", "2", "--checkpoint.last_every_n_train_steps", "2"),
            callbacks=[LastCheckpointAtValidation()])
    # Refreshed at step 2 and 6 within the epochs, not at 4 and 8 (their last batches) before validating them.
    assert seen == [(4, 2), (8, 6)]

    seen.clear()
    app.run(tiny_fit(tiny_idx, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6",
                     "--trainer.val_check_interval", "3", "--checkpoint.last_every_n_train_steps", "1"),
            callbacks=[LastCheckpointAtValidation()])
    assert seen == [(3, 2), (6, 5)]  # nor before a validation within the epoch


def test_sigterm_during_validation_keeps_the_checkpoint_from_before_it(tmp_path: Path, tiny_idx: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A last.ckpt saved in the middle of a validation resumes past the rest of it (Lightning counts it as run):
    SIGTERM there keeps the last.ckpt from before, and the resumed run validates that step whole."""
    monkeypatch.chdir(tmp_path)
    args = tiny_fit(tiny_idx, "--trainer.max_epochs", "3", "--checkpoint.last_every_n_train_steps", "2")
    with pytest.raises(SIGTERMException):
        app.run(args, callbacks=[SigtermInValidation(epoch=1)])
    last = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6  # the refresh before step 8's validation

    resumed = SigtermInValidation(epoch=None)
    app.run([*args, "--ckpt_path", "last"], callbacks=[resumed])
    assert resumed.validated == [8, 12]  # step 8's validation again, whole, after its last two steps
    assert torch.load(last, weights_only=True)["global_step"] == 12


def test_sigterm_before_any_checkpoint_says_there_is_nothing_to_resume(tmp_path: Path, tiny_idx: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SIGTERMException):
        app.run(tiny_fit(tiny_idx, "--checkpoint.last_every_n_train_steps", "0"),
                callbacks=[SigtermInValidation(epoch=0)])
    assert "stopped by SIGTERM before the run's first checkpoint: nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "lightning_logs/version_0").exists()  # a new run with no checkpoint leaves nothing


@pytest.mark.parametrize("save_on_exception", [False, True])
def test_an_error_keeps_the_last_ckpt_from_before_unless_lightning_is_asked_to_save(
        tmp_path: Path, tiny_idx: Path, monkeypatch: pytest.MonkeyPatch, save_on_exception: bool) -> None:
    """An error before the next batch drops the step's held last.ckpt; ``checkpoint.save_on_exception`` still gets
    the checkpoint it asks Lightning for, last.ckpt included."""

    class CrashAtTheLastBatch(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
            if trainer.global_step == 3:  # step 3's last.ckpt is held: its metrics may not be logged yet
                raise RuntimeError("a bug")

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="a bug"):
        app.run(tiny_fit(tiny_idx, "--trainer.max_epochs", "1", "--checkpoint.last_every_n_train_steps", "1",
                         "--checkpoint.save_on_exception", str(save_on_exception).lower()),
                callbacks=[CrashAtTheLastBatch()])
    last = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == (3 if save_on_exception else 2)


def test_last_ckpt_appears_only_once_its_steps_metrics_are_logged(tmp_path: Path, tiny_idx: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning logs a step's and an epoch's metrics after the hooks that save last.ckpt: a kill between the two
    left a checkpoint whose metrics the resumed run never logs (the kill-and-resume test lost a row now and then)."""
    logged: list[tuple[int, int, bool]] = []  # (logged step, last.ckpt's step on disk then, an epoch's metrics)

    class SpyOnTheTracker(Callback):
        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            tracker = trainer.logger
            log_metrics = tracker.log_metrics

            def spy(metrics: dict[str, float], step: Optional[int] = None) -> None:
                last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
                on_disk = torch.load(last, weights_only=True)["global_step"] if last.is_file() else 0
                training = not any(key.startswith("val/") for key in metrics)  # a step's or an epoch's
                if training:
                    logged.append((step, on_disk, "train/loss" not in metrics))
                log_metrics(metrics, step)

            monkeypatch.setattr(tracker, "log_metrics", spy)

    monkeypatch.chdir(tmp_path)
    app.run(tiny_fit(tiny_idx, "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1",
                     "--trainer.logger", "mnist_dlops.trackers.csv.CSVLogger",
                     "--checkpoint.last_every_n_train_steps", "1"), callbacks=[SpyOnTheTracker()])
    # Step s is logged as s - 1 (Lightning's count of steps before it); its last.ckpt must not be on disk yet.
    assert [(step, on_disk) for step, on_disk, _ in logged if on_disk > step] == []
    assert sum(epoch for _, _, epoch in logged) == 2 and len(logged) == 8 + 2
