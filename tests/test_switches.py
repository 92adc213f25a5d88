"""Lightning's own Trainer switches work as the Lightning docs teach, and evaluations add to a run's curves without
erasing or misplacing any point (read back with TensorBoard's own reader and pandas)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO, make_idx_set, run_cli

from mnist_dlops.cli.app import cli_main

TINY = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6", "--trainer.limit_val_batches", "2",
        "--data.val_size", "40", "--data.batch_size", "16", "--trainer.enable_progress_bar", "false",
        "--data.download", "false", "--data.data_dir", "data", "--trainer.log_every_n_steps", "2"]


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_idx_set(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_files(lab: Path) -> set[str]:
    runs = list((lab / "lightning_logs").glob("version_*"))
    assert len(runs) == 1, runs
    return {p.relative_to(runs[0]).as_posix() for p in runs[0].rglob("*") if p.is_file()}


# (flags, files the run must hold, files it must not)
SWITCHES = {
    # Lightning saves no config in a fast_dev_run (LightningCLI skips it), but its checkpoint callback a last.ckpt.
    "fast_dev_run": (["--trainer.fast_dev_run", "true"], {"checkpoints/last.ckpt"}, {"config.yaml"}),
    "overfit_batches": (["--trainer.overfit_batches", "2"], {"checkpoints/last.ckpt"}, set()),
    "max_steps": (["--trainer.max_steps", "3", "--trainer.max_epochs", "-1"], {"checkpoints/last.ckpt"}, set()),
    "max_time": (["--trainer.max_time", "00:00:01:00"], {"checkpoints/last.ckpt"}, set()),
    "val_check_interval": (["--trainer.val_check_interval", "3"], {"checkpoints/last.ckpt"}, set()),
    "accumulate": (["--trainer.accumulate_grad_batches", "2"], {"checkpoints/last.ckpt"}, set()),
    # Lightning clips no fused optimizer under mixed precision (the one-line error: tests/test_bad_input.py).
    "clip": (["--trainer.gradient_clip_val", "0.5", "--model.optimizer.init_args.fused", "false"],
             {"checkpoints/last.ckpt"}, set()),
    # The default is bf16-mixed where the CPU computes bf16 natively (as CI's does): fp32 stays a switch away.
    "fp32": (["--trainer.precision", "32-true"], {"checkpoints/last.ckpt"}, set()),
    "bf16": (["--trainer.precision", "bf16-mixed"], {"checkpoints/last.ckpt"}, set()),
    "plots every epoch": (
        ["--trainer.callbacks", '[{"class_path": "mnist_dlops.callbacks.Diagnostics", "init_args": {"every_n_epochs": 1}}]'],
        {"plots/val/epoch00-confusion_matrix.png", "plots/val/epoch01-mistakes.png"}, set(),
    ),
    "deterministic": (["--trainer.deterministic", "true"], {"checkpoints/last.ckpt"}, set()),
    "detect_anomaly": (["--trainer.detect_anomaly", "true"], {"checkpoints/last.ckpt"}, set()),
    "profiler": (["--trainer.profiler", "simple"], {"checkpoints/last.ckpt"}, set()),
    "short callback name": (["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor", "val/loss"],
                            {"checkpoints/last.ckpt"}, set()),
    "no checkpoints": (["--trainer.enable_checkpointing", "false"], {"config.yaml", "provenance.yaml"},
                       {"checkpoints/last.ckpt"}),
    "no logger": (["--trainer.logger", "false"], {"checkpoints/last.ckpt", "config.yaml"}, {"metrics.csv"}),
}


@pytest.mark.parametrize("switch", SWITCHES)
def test_trainer_switch(lab: Path, switch: str, capsys: pytest.CaptureFixture) -> None:
    flags, present, absent = SWITCHES[switch]
    cli_main(["fit", *TINY, *flags])
    files = run_files(lab)
    assert present <= files, files
    assert not absent & files, files
    if switch == "no logger":
        assert not [f for f in files if "tfevents" in f], files
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("run: "), out  # every fit names its run last


@pytest.mark.slow  # a long real run or a server: in `pytest -m slow` and CI, to keep the default run short
def test_a_short_logger_name(lab: Path) -> None:
    """``--trainer.logger=CSVLogger`` as Lightning's docs write it, in a fresh process (in this one, our CSVLogger
    has been imported by other tests, and the short name would be ambiguous, as jsonargparse says). Its save_dir
    stays inside the run (a folder elsewhere is refused by the write gate: tests/test_write_gate.py)."""
    result = run_cli("fit", *TINY, "--trainer.logger=CSVLogger", "--trainer.logger.save_dir",
                     "lightning_logs/version_0/csv", cwd=lab)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((lab / "lightning_logs/version_0/csv").rglob("metrics.csv"))  # where the user's save_dir says


def test_an_evaluation_adds_to_the_curves(lab: Path) -> None:
    """validate + test after a fit: TensorBoard keeps every training point (no purge), and the evaluation lands
    at the checkpoint's step, in TensorBoard and in the CSV file alike."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli_main(["fit", *TINY, "-c", str(REPO / "configs/csv.yaml"), "--trainer.logger+",
              "mnist_dlops.trackers.tensorboard.TensorBoardLogger"])
    run = lab / "lightning_logs/version_0"

    def scalars() -> dict[str, list[tuple[int, float]]]:
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    before = scalars()
    assert len(before["val/loss"]) == 2
    # Diagnostics' default draws a fit's validation once, from its last epoch (every_n_epochs: null).
    assert [p.name for p in sorted((run / "plots" / "val").glob("*confusion_matrix*"))] == [
        "epoch01-confusion_matrix.png"
    ]
    for command in ("validate", "test"):
        cli_main([command, "--ckpt_path", str(run), "--trainer.enable_progress_bar", "false",
                  "--data.data_dir", "data"])
    after = scalars()
    step = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"]
    for tag, points in before.items():
        assert after[tag][: len(points)] == points, tag  # nothing erased or moved
    assert after["val/loss"][-1][0] == step and after["test/acc"][0][0] == step
    rows = pd.read_csv(run / "metrics.csv")
    assert rows.dropna(subset=["test/acc"])["step"].tolist() == [step]
    assert sorted((run / "plots" / "val").glob("epoch01-confusion_matrix*.png"))  # named by the checkpoint's epoch


def test_last_checkpoint_follows_every_epoch(lab: Path) -> None:
    """Weights frozen (lr 1e-30): no epoch improves on the first, so Lightning alone would leave last.ckpt at the
    first epoch, and a resume would go back an epoch."""
    # Without BatchNorm: its running statistics move even when the weights cannot.
    cli_main(["fit", *TINY, "--model.optimizer.lr", "1e-30", "--model.lr_scheduler", "null",
              "--model.network.init_args.batch_norm", "false", "--checkpoint.monitor", "val/acc",
              "--checkpoint.mode", "max", "--trainer.callbacks", "[]"])
    checkpoints = lab / "lightning_logs/version_0/checkpoints"
    assert [p.name[:7] for p in checkpoints.glob("epoch*.ckpt")] == ["epoch00"]  # the only best
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == 12 and last["epoch"] == 1
