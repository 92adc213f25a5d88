"""At the default log level the commands print their own lines only: no library's seed, device, summary, banner or
bookkeeping line; ``--log_level info`` brings Lightning's, W&B's and Neptune's back."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO, make_idx_set, run_cli, run_module

# What the libraries say on their own: Lightning's start-up and end lines and summary, W&B's and Neptune's banners,
# MLflow's bookkeeping.
THEIRS = re.compile(r"Seed set to|GPU available|TPU available|Loading `train_dataloader`|`Trainer\.fit` stopped|"
                    r"Trainable params|^wandb:|\[neptune\]|Experiment with name|Created version|Registered model|"
                    r"Successfully registered|Downloading artifacts")
TINY = ["--data.data_dir", "data", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--data.val_size", "20",
        "--data.download", "false", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]


@pytest.mark.slow  # four commands as processes, every tracker: in `pytest -m slow` and CI
def test_fit_test_export_and_register_print_no_library_line(tmp_path: Path) -> None:
    make_idx_set(tmp_path / "data")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    outputs = [run_cli("fit", "-c", "configs/all_trackers.yaml", *TINY, cwd=tmp_path),
               run_cli("test", "--ckpt_path", "best", *TINY, cwd=tmp_path),
               run_module("mnist_dlops", "export", "--ckpt_path", "best", cwd=tmp_path),
               run_module("mnist_dlops", "registry", "register", "--ckpt_path", "best", "--name", "m", cwd=tmp_path)]
    for result in outputs:
        assert result.returncode == 0, result.stderr[-2000:]
        lines = (result.stdout + result.stderr).splitlines()
        assert not [line for line in lines if THEIRS.search(line)], (result.args, lines)
    loud = run_cli("test", "--ckpt_path", "best", *TINY, "--log_level", "info", cwd=tmp_path)
    assert "GPU available" in loud.stdout + loud.stderr and "[neptune]" in loud.stdout + loud.stderr
