"""Checkpoints restore their run: evaluate, predict and export from a checkpoint alone, with one-line errors."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, cli_in_process, run_cli, run_module
from PIL import Image

from mnist_dlops.data.idx import read_idx_split


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """A short real run of the binary "3 vs not 3" MLP, fully validated, logging to CSV."""
    cwd = tmp_path_factory.mktemp("binary")
    result = cli_in_process(
        "fit", "-c", str(REPO / "configs/binary.yaml"), "-c", str(REPO / "configs/csv.yaml"),
        "--data.data_dir", str(mnist_dir), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "150",
        "--trainer.enable_progress_bar", "false", cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def ckpt_of(cwd: Path) -> Path:
    (best,) = (cwd / "lightning_logs/version_0/checkpoints").glob("epoch*.ckpt")
    return best


def last_value(csv_file: Path, column: str) -> float:
    return float(pd.read_csv(csv_file)[column].dropna().iloc[-1])


def test_validate_from_the_checkpoint_alone_reproduces_the_fit_accuracy(binary_run: Path) -> None:
    """No config, no --data flags: the binary task, digit and split come back from the checkpoint."""
    metrics = binary_run / "lightning_logs/version_0/metrics.csv"
    fit_acc = last_value(metrics, "val/acc")
    result = cli_in_process("validate", "--ckpt_path", "best", "--trainer.enable_progress_bar", "false", cwd=binary_run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_value(metrics, "val/acc") == pytest.approx(fit_acc, abs=1e-6)
    assert fit_acc > 0.95
    saved = yaml.safe_load((binary_run / "lightning_logs/version_0/config.validate.yaml").read_text())
    assert saved["data"]["task"] == "binary" and saved["model"]["network"]["class_path"].endswith("MLP")


def test_a_runs_best_is_read_from_its_summary_or_else_its_last_checkpoint(binary_run: Path, tmp_path: Path) -> None:
    """checkpoints/best.json names the best; a run written before it existed (or with it damaged) is read from its
    last.ckpt, with the same answer."""
    from mnist_dlops.rundir.run import SUMMARY, read_best, resolve_ckpt

    run = tmp_path / "lightning_logs" / "version_0"
    shutil.copytree(binary_run / "lightning_logs" / "version_0", run)
    best = read_best(run)
    assert best.path == run / "checkpoints" / ckpt_of(binary_run).name
    assert (best.monitor, best.mode) == ("val/loss", "min") and 0 < best.score < 1
    (run / "checkpoints" / SUMMARY).unlink()
    assert read_best(run) == best
    (run / "checkpoints" / SUMMARY).write_text("{not json")
    assert read_best(run) == best
    assert resolve_ckpt("best", tmp_path / "lightning_logs") == best.path


def test_print_config_shows_what_the_checkpoint_will_run(binary_run: Path) -> None:
    result = run_cli("test", "--ckpt_path", str(ckpt_of(binary_run)), "--data.eval_batch_size", "500",
                     "--print_config", cwd=binary_run)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load(result.stdout)
    assert config["data"]["task"] == "binary" and config["data"]["batch_size"] == 64  # from the checkpoint
    assert config["data"]["eval_batch_size"] == 500  # an explicit flag still wins
    assert config["model"]["network"]["class_path"] == "mnist_dlops.networks.MLP"
    assert config["ckpt_path"] == str(ckpt_of(binary_run))


@pytest.fixture(scope="module")
def test_pngs(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """The 10,000 MNIST test digits written as PNG files, one folder per digit."""
    root = tmp_path_factory.mktemp("pngs")
    images, labels = read_idx_split(mnist_dir, "test")
    for i, (image, label) in enumerate(zip(images.numpy(), labels.tolist())):
        folder = root / str(label)
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return root


@pytest.mark.slow  # real data or several processes: run by `pytest -m slow` and CI
def test_predict_on_png_files_reproduces_the_test_accuracy(tmp_path: Path, mnist_dir: Path, test_pngs: Path) -> None:
    """A 10-class run: `predict` over the test digits as PNGs agrees with `test` on the IDX files."""
    result = cli_in_process(
        "fit", "--data.data_dir", str(mnist_dir), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "60",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = ckpt_of(tmp_path)
    tested = run_cli("test", "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-3000:]
    test_acc = float(next(line for line in tested.stdout.splitlines() if "test/acc" in line).split()[-2])

    result = run_cli("predict", "--ckpt_path", str(ckpt), "--data.predict_dir", str(test_pngs),
                     "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "lightning_logs/version_0/predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10_000 and set(rows[0]) == {"file", "predicted", "probability", "true"}
    assert all(row["true"] == Path(row["file"]).parent.name for row in rows)
    accuracy = np.mean([row["predicted"] == row["true"] for row in rows])
    assert accuracy == pytest.approx(test_acc, abs=1e-6)
    assert f"accuracy on the 10000 images of known class: {accuracy:.4f}" in result.stdout
    assert all(0.0 < float(row["probability"]) <= 1.0 for row in rows[:100])


def test_export_matches_the_checkpoint(binary_run: Path, mnist_dir: Path) -> None:
    import onnxruntime

    from mnist_dlops.module import MNISTModule

    result = run_module("mnist_dlops", "export", "--ckpt_path", "best", cwd=binary_run)
    assert result.returncode == 0, result.stderr[-3000:]
    export_dir = binary_run / "lightning_logs/version_0/export"
    assert (export_dir / "classes.txt").read_text().split("\n")[:2] == ["no 3", "3"]

    # Checked here independently of the exporter's own check, on real digits.
    images = read_idx_split(mnist_dir, "test")[0][:500].unsqueeze(1)
    model = MNISTModule.load_from_checkpoint(ckpt_of(binary_run), weights_only=True).eval()
    with torch.no_grad():
        expected = model(images).softmax(-1)
        scripted = torch.jit.load(str(export_dir / "model.pt"))(images)
    session = onnxruntime.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"images": images.numpy()})
    assert (scripted - expected).abs().max() < 1e-5
    assert np.abs(onnx_out - expected.numpy()).max() < 1e-5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("fit", "--ckpt_path", "last"), "error: lightning_logs: no training run to take a checkpoint from"),
        (("fit", "--ckpt_path", "nope.ckpt"), "error: nope.ckpt: no such checkpoint file"),
        (("test", "--ckpt_path", "best"), "error: lightning_logs: no training run to take a checkpoint from"),
    ],
)
def test_nothing_to_resume_is_one_line_and_no_run(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = cli_in_process(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == message + (
        " (run `python cli.py fit` first)" if "no training run" in message else ""
    )
    assert not (tmp_path / "lightning_logs" / "version_0").exists()


def test_a_run_without_last_checkpoint_has_nothing_to_resume(tmp_path: Path) -> None:
    run = tmp_path / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    result = cli_in_process("fit", "--ckpt_path", "last", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {Path('lightning_logs/version_0')}: nothing to resume or evaluate, " \
        "it has no checkpoints/last.ckpt yet"


def test_a_weights_only_checkpoint_loads_in_python_and_is_refused_by_the_cli_in_one_line(tiny_idx: Path) -> None:
    """The CLI restores a run from the config its checkpoints keep; a weights-only one has none, and says so."""
    cwd = tiny_idx.parent
    fit = cli_in_process("fit", "--data.data_dir", str(tiny_idx), "--data.val_size", "40", "--trainer.max_epochs", "1",
                         "--checkpoint.save_weights_only", "true", "--trainer.enable_progress_bar", "false",
                         "--trainer.callbacks", "[]", cwd=cwd)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (ckpt,) = (cwd / "lightning_logs/version_0/checkpoints").glob("epoch*.ckpt")
    from mnist_dlops.module import MNISTModule

    assert MNISTModule.load_from_checkpoint(ckpt).network is not None
    files = sorted((cwd / "lightning_logs/version_0").rglob("*"))
    result = cli_in_process("test", "--ckpt_path", str(ckpt), cwd=cwd)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {ckpt}: records no run configuration") and "load_from_checkpoint" in line, line
    assert sorted((cwd / "lightning_logs/version_0").rglob("*")) == files  # nothing added to the run
