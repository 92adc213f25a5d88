"""Full training runs on the real MNIST (minutes each): the accuracy each shipped experiment promises.

Marked ``slow``: run with ``pytest -m slow``. Wall times are printed for the README, never asserted.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import REPO, read_scalars, run_cli

EXPERIMENTS = [
    # (config files, minimum test accuracy)
    ([], 0.990),  # the default: FastCNN with BatchNorm, 2 epochs
    (["configs/binary.yaml"], 0.994),  # the seeds' MLP, 3 vs rest
    (["configs/cnn.yaml"], 0.990),  # the seeds' CNN
]


@pytest.mark.slow
@pytest.mark.parametrize(("configs", "min_acc"), EXPERIMENTS, ids=["default", "binary", "cnn"])
def test_experiment_reaches_its_accuracy(tmp_path: Path, mnist_dir: Path, configs: list[str], min_acc: float) -> None:
    config_args = [arg for c in configs for arg in ("-c", str(REPO / c))]
    start = time.perf_counter()
    fit = run_cli("fit", *config_args, "--data.data_dir", str(mnist_dir), "--trainer.enable_progress_bar=false",
                  cwd=tmp_path)
    fit_s = time.perf_counter() - start
    assert fit.returncode == 0, fit.stderr[-3000:]
    best = next((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("epoch*.ckpt"))
    test = run_cli("test", *config_args, "--data.data_dir", str(mnist_dir), "--ckpt_path", str(best), cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    test_acc = read_scalars(tmp_path / "lightning_logs" / "version_0")["test/acc"][-1]  # test lands in the fit's run
    print(f"\n{configs or ['default']}: fit {fit_s:.0f} s, test/acc {test_acc:.4f} (best {best.name})")
    assert test_acc >= min_acc
