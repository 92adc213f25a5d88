"""What the redesigns must not break: a checkpoint written before them, the class paths in configs/, and the one
dispatcher, with hints in the project's two spellings (``python cli.py fit``, ``mnist-dlops <command>``)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, cli_in_process

from mnist_dlops.module import MNISTModule

# Written by `cli.py fit` at 88809c2, the last commit before the redesign (MLP, 5 steps, CSV tracker, a schedule).
OLD_CHECKPOINT = Path(__file__).parent / "fixtures" / "pre_redesign.ckpt"


def test_a_checkpoint_from_before_the_redesign_evaluates_loads_and_serves(tmp_path: Path, mnist_dir: Path) -> None:
    stored = torch.load(OLD_CHECKPOINT, weights_only=True)["hyper_parameters"]
    assert stored["network"]["class_path"] == "mnist_dlops.networks.MLP"
    result = cli_in_process("test", "--ckpt_path", str(OLD_CHECKPOINT), "--data.data_dir", str(mnist_dir),
                            "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test/acc" in result.stdout
    model = MNISTModule.load_from_checkpoint(OLD_CHECKPOINT, weights_only=True)
    assert model.network.__class__.__name__ == "MLP"
    from mnist_dlops.model.served import resolve

    served = resolve(None, str(OLD_CHECKPOINT))
    probabilities = served.load()(torch.zeros(3, 1, 28, 28, dtype=torch.uint8))
    assert probabilities.shape == (3, 10) and torch.allclose(probabilities.sum(1), torch.ones(3))


def test_every_class_path_in_configs_imports() -> None:
    paths = set()
    for file in (REPO / "configs").rglob("*.yaml"):
        text = yaml.safe_load(file.read_text())
        stack = [text]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                paths |= {node["class_path"]} if isinstance(node.get("class_path"), str) else set()
                stack += list(node.values())
            elif isinstance(node, list):
                stack += node
    assert "mnist_dlops.trackers.csv.CSVLogger" in paths
    for path in sorted(paths | {"mnist_dlops.data.MNISTDataModule", "mnist_dlops.module.MNISTModule",
                                "mnist_dlops.schedules.OneCycleLR", "mnist_dlops.callbacks.Diagnostics"}):
        module, _, name = path.rpartition(".")
        assert hasattr(importlib.import_module(module), name), path


def dispatchers() -> list[list[str]]:
    """The installed ``mnist-dlops`` script (when this venv has it) and ``python -m mnist_dlops``."""
    script = Path(sys.executable).with_name("mnist-dlops")
    return ([[str(script)]] if script.is_file() else []) + [[sys.executable, "-m", "mnist_dlops"]]


def test_the_hints_name_the_projects_two_spellings(tmp_path: Path) -> None:
    """LightningCLI's subcommands as ``python cli.py <subcommand>``, every other as ``mnist-dlops <command>``."""
    for command in dispatchers():
        done = subprocess.run([*command, "test", "--ckpt_path", "best"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2
        assert done.stderr.strip().endswith("(run `python cli.py fit` first)"), done.stderr
        done = subprocess.run([*command, "datasets", "verify", "x"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert "(mnist-dlops datasets add x)" in done.stderr, done.stderr
        done = subprocess.run([*command, "nope"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.startswith("error: nope: no such command"), done.stderr
    result = cli_in_process("test", "--ckpt_path", "best", cwd=tmp_path)
    assert result.stderr.strip().endswith("(run `python cli.py fit` first)"), result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sub", ["fit", "validate", "test", "predict", "sweep", "runs", "export", "registry",
                                 "datasets", "serve"])
def test_the_dispatcher_runs_every_command(sub: str, tmp_path: Path) -> None:
    for command in dispatchers():
        done = subprocess.run([*command, sub, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "usage:" in done.stdout, (sub, done.stderr)
