"""The training loop is Lightning's: clipping, accumulation and callbacks that drive it work, every training image
counts once in the epoch's train metrics, and the default progress bar gives way to one the config names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cli_in_process, read_scalars, run_cli
from torchmetrics.classification import MulticlassAccuracy

from mnist_dlops.data import MNISTDataModule
from mnist_dlops.module import MNISTModule

TINY = ["--trainer.max_epochs", "2", "--data.val_size", "20", "--data.batch_size", "16",
        "--trainer.log_every_n_steps", "5", "--data.download", "false"]


def fit(tmp_path: Path, data: Path, name: str, *args: str) -> Path:
    """Fit on ``data`` in ``tmp_path/name``, in-process; the run's folder."""
    cwd = tmp_path / name
    cwd.mkdir()
    result = cli_in_process("fit", "--data.data_dir", str(data), *TINY, *args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "lightning_logs" / "version_0"


def fit_with_output(tmp_path: Path, data: Path, name: str, *args: str) -> tuple[Path, str]:
    """Fit on ``data`` in ``tmp_path/name`` as a process; the run's folder and what it printed (stdout + stderr)."""
    cwd = tmp_path / name
    cwd.mkdir()
    result = run_cli("fit", "--data.data_dir", str(data), *TINY, *args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "lightning_logs" / "version_0", result.stdout + result.stderr


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow  # a long real run or a server: in `pytest -m slow` and CI, to keep the default run short
def test_gradient_clipping_and_accumulation_are_lightnings(tmp_path: Path, tiny_idx: Path) -> None:
    """Lightning's own loop clips and accumulates: a clip that never binds changes nothing, bit for bit."""
    # Lightning clips no fused optimizer under mixed precision (the default's bf16 here): both runs unfused.
    unfused = ["--model.optimizer.init_args.fused", "false"]
    plain = fit(tmp_path, tiny_idx, "plain", *unfused)
    clipped = fit(tmp_path, tiny_idx, "clipped", *unfused, "--trainer.gradient_clip_val", "1e9")
    a, b = weights(plain), weights(clipped)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    scalars_a, scalars_b = read_scalars(plain), read_scalars(clipped)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "val/f1"):
        assert scalars_a[tag] == scalars_b[tag], tag
    fit(tmp_path, tiny_idx, "accumulate", "--trainer.accumulate_grad_batches", "2")


def test_a_callback_that_drives_lightnings_loop(tmp_path: Path, tiny_idx: Path) -> None:
    """GradientAccumulationScheduler works as in any Lightning project, with no switch."""
    scheduler = ('{"class_path": "pytorch_lightning.callbacks.GradientAccumulationScheduler",'
                 ' "init_args": {"scheduling": {"0": 2}}}')
    run = fit(tmp_path, tiny_idx, "accepted", "--trainer.callbacks+", scheduler, "--trainer.max_epochs", "1")
    # 280 training images in batches of 16: 18 batches, stepped every 2: 9 optimizer steps.
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9


def test_train_metrics_count_every_image_once(tmp_path: Path, tiny_idx: Path) -> None:
    """With a learning rate too small to move a weight, the epoch's train/acc is the accuracy of the final weights
    on every training image: none dropped or counted twice."""
    # Without BatchNorm: its running statistics move even when the weights cannot.
    run = fit(tmp_path, tiny_idx, "frozen", "--model.optimizer.lr", "1e-30", "--model.lr_scheduler", "null",
              "--model.network.init_args.batch_norm", "false", "--trainer.max_epochs", "1")
    model = MNISTModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True).eval()
    data = MNISTDataModule(data_dir=str(tiny_idx), val_size=20, download=False)
    data.setup("fit")
    images, labels = data.splits["train"]
    with torch.no_grad():
        expected = MulticlassAccuracy(num_classes=10, average="micro")(model(images), labels).item()
    logged = read_scalars(run)["train/acc"]
    assert len(logged) == 1
    assert abs(logged[0] - expected) < 1e-6, (logged, expected)
    assert 0.0 < expected < 1.0  # an untrained network on generated digits: some right, some wrong


@pytest.mark.slow  # a long real run or a server: in `pytest -m slow` and CI, to keep the default run short
def test_a_named_progress_bar_replaces_the_default(tmp_path: Path, tiny_idx: Path) -> None:
    """Ours is the default bar; naming Lightning's TQDM bar is no conflict (``enable_progress_bar: false`` is used by
    most other tests)."""
    _, default = fit_with_output(tmp_path, tiny_idx, "default", "--trainer.max_epochs", "1")
    _, tqdm = fit_with_output(tmp_path, tiny_idx, "tqdm", "--trainer.max_epochs", "1",
                              "--trainer.callbacks+", "pytorch_lightning.callbacks.TQDMProgressBar")
    # The Rich bar titles an epoch "Epoch 0/0" (of max_epochs - 1), the TQDM bar "Epoch 0: 100%".
    rich, tqdm_done = "Epoch 0/0", "Epoch 0: 100%"
    assert rich in default and tqdm_done not in default
    assert tqdm_done in tqdm and rich not in tqdm
