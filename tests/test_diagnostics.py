"""Diagnostics: the plots are right, and every tracker holds them; the runs table over real runs."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, cli_in_process, read_scalars, run_module
from PIL import Image
from test_trackers import DEBUG, neptune_operations, wandb_records
from torchmetrics.classification import BinaryAUROC, MulticlassAUROC

from mnist_dlops.callbacks.diagnostics import confusion, pr_curves, roc_curves
from mnist_dlops.callbacks.plots import confusion_figure, curves_figure, plt

KNOWN = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])


def predictions_with(matrix: np.ndarray, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and labels whose confusion matrix is ``matrix``: matrix[t, p] images of class t predicted p."""
    rng = np.random.default_rng(seed)
    probs, labels = [], []
    for t, row in enumerate(matrix):
        for p, count in enumerate(row):
            for _ in range(count):
                scores = rng.uniform(0, 1, len(matrix))
                scores[p] = 2 + rng.uniform()  # p is the most probable class
                probs.append(scores / scores.sum())
                labels.append(t)
    return torch.tensor(np.array(probs), dtype=torch.float32), torch.tensor(labels)


def test_confusion_matrix_counts_and_the_numbers_drawn() -> None:
    probs, labels = predictions_with(KNOWN)
    matrix = confusion(probs, labels).numpy()
    assert (matrix == KNOWN).all()
    fig = confusion_figure(matrix, ["a", "b", "c"])
    counts_ax, normalized_ax = fig.axes[:2]
    assert [int(t.get_text()) for t in counts_ax.texts] == KNOWN.flatten().tolist()
    expected = (KNOWN / KNOWN.sum(1, keepdims=True)).flatten()
    assert [float(t.get_text()) for t in normalized_ax.texts] == pytest.approx(expected, abs=0.005)
    assert [t.get_text() for t in counts_ax.get_xticklabels()] == ["a", "b", "c"]
    plt.close(fig)


def test_roc_auc_is_torchmetrics_auroc_and_matches_the_drawn_curve() -> None:
    probs, labels = predictions_with(KNOWN, seed=1)
    curves = roc_curves(probs, labels, ["a", "b", "c"])
    expected = MulticlassAUROC(num_classes=3, average=None)(probs, labels)
    assert [c.area for c in curves] == pytest.approx(expected.tolist(), abs=1e-6)
    for curve in curves:  # the area under the plotted points is the AUC shown
        assert np.trapezoid(curve.y, curve.x) == pytest.approx(curve.area, abs=1e-6)
    fig = curves_figure(curves, "roc")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        f"{n} (AUC {a:.4f})" for n, a in zip("abc", expected.tolist())
    ]
    plt.close(fig)

    binary = torch.stack([1 - probs[:, 0], probs[:, 0]], 1)
    target = (labels == 0).long()
    (curve,) = roc_curves(binary, target, ["no a", "a"])
    assert curve.area == pytest.approx(float(BinaryAUROC()(binary[:, 1], target)), abs=1e-6)
    (pr,) = pr_curves(binary, target, ["no a", "a"])
    assert pr.name == "a" and 0 < pr.area <= 1


@pytest.mark.slow  # a long real run or a server: in `pytest -m slow` and CI, to keep the default run short
def test_every_tracker_holds_the_plots_after_fit_and_test(tmp_path: Path, mnist_dir: Path) -> None:
    fit = cli_in_process("fit", "-c", str(REPO / "configs/all_trackers.yaml"), "-c", DEBUG, "--data.data_dir", str(mnist_dir),
                  cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    # No config: the checkpoint brings back the run's trackers and its diagnostics callback.
    test = cli_in_process("test", "--ckpt_path", "last", "--trainer.limit_test_batches", "2", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    names = ["confusion_matrix", "roc", "pr", "mistakes"]

    for stage, prefix in (("val", "epoch00-"), ("test", "")):
        for name in names:
            with Image.open(run / "plots" / stage / f"{prefix}{name}.png") as img:
                assert img.size[0] > 300 and img.size[1] > 200

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    assert {f"{s}/{n}" for s in ("val", "test") for n in names} <= set(acc.Tags()["images"])
    image = acc.Images("test/confusion_matrix")[0]
    assert image.width > 300 and image.encoded_image_string[:4] == b"\x89PNG"
    assert any(tag.startswith("weights/network.") for tag in acc.Tags()["histograms"])
    assert acc.Tags()["graph"] and len(acc.Graph().node) > 10  # log_graph: true in all_trackers.yaml

    logged: dict[str, str] = {}
    for wandb_file in run.glob("wandb/offline-run-*/run-*.wandb"):
        for r in wandb_records(wandb_file):
            if r.WhichOneof("record_type") == "history":
                logged.update({i.key or "/".join(i.nested_key): i.value_json for i in r.history.item})
    for stage in ("val", "test"):
        for name in names:
            assert json.loads(logged[f"{stage}/{name}/_type"]) == "images/separated"
        for native in ("confusion_matrix", "roc", "pr"):  # W&B's own plots, stored as tables
            assert f"{stage}/wandb_{native}_table/_latest_artifact_path" in logged or \
                f"{stage}/wandb_{native}_table/_type" in logged
    assert list(run.glob("wandb/offline-run-*/files/media/images/test/confusion_matrix_*.png"))

    images = {"/".join(op["path"]): op["values"] for op in neptune_operations(run) if op["type"] == "LogImages"}
    for stage in ("val", "test"):
        for name in names:
            png = base64.b64decode(images[f"{stage}/{name}"][0]["value"]["data"])
            with Image.open(io.BytesIO(png)) as img:  # the image Neptune would upload, decoded
                assert img.format == "PNG" and img.size[0] > 300


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """Default, binary and cnn experiments, short, in one folder; the cnn one logs to CSV, the others to TensorBoard."""
    cwd = tmp_path_factory.mktemp("runs")
    short = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "10", "--trainer.limit_val_batches", "2",
             "--data.data_dir", str(mnist_dir), "--trainer.callbacks", "[]"]
    for configs in ([], ["binary.yaml"], ["cnn.yaml", "csv.yaml"]):
        args = [a for c in configs for a in ("-c", str(REPO / "configs" / c))]
        result = cli_in_process("fit", *args, *short, cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]
    return cwd


@pytest.mark.slow  # several runs or processes: in `pytest -m slow` and CI, to keep the default run short
def test_runs_table_lists_three_real_runs(three_runs: Path) -> None:
    result = run_module("mnist_dlops", "runs", "--csv", "runs.csv", "--plot", "val/loss", "--plot_file", "curves.png",
                        cwd=three_runs)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(three_runs / "runs.csv")
    assert table["run"].tolist() == ["version_0", "version_1", "version_2"]
    assert table["model"].tolist() == ["FastCNN", "MLP", "SeedCNN"]
    assert table["task"].tolist() == ["multiclass", "binary (3)", "multiclass"]
    assert table["batch_size"].tolist() == [128, 64, 128]
    assert table["epochs"].tolist() == [2, 2, 2]
    # The best val/acc is the best epoch's, read back independently from each tracker's files.
    tb = read_scalars(three_runs / "lightning_logs/version_0")
    assert table.loc[0, "val/acc"] == pytest.approx(max(tb["val/acc"]))
    csv = pd.read_csv(three_runs / "lightning_logs/version_2/metrics.csv")
    assert table.loc[2, "val/loss"] == pytest.approx(csv["val/loss"].min())
    for ckpt in table["best_checkpoint"]:
        assert (three_runs / ckpt).is_file() and "epoch01" in ckpt or "epoch00" in ckpt
    with Image.open(three_runs / "curves.png") as img:
        assert img.format == "PNG" and img.size[0] > 300

    filtered = run_module("mnist_dlops", "runs", "--where", "task=binary (3)", "--csv", "one.csv", cwd=three_runs)
    assert filtered.returncode == 0, filtered.stderr
    assert pd.read_csv(three_runs / "one.csv")["run"].tolist() == ["version_1"]
    ranked = run_module("mnist_dlops", "runs", "--sort", "val/loss", "--ascending", "true", "--csv", "ranked.csv",
                        cwd=three_runs)
    assert pd.read_csv(three_runs / "ranked.csv")["val/loss"].is_monotonic_increasing, ranked.stdout
    bad = run_module("mnist_dlops", "runs", "--where", "colour=blue", cwd=three_runs)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --where 'colour=blue'")
