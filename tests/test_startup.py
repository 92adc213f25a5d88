"""Commands import only what they use: help and the registry's and data versions' listings start without torch or
Lightning (their import alone takes seconds). Checked by what is imported, not by a clock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys
from mnist_dlops.__main__ import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(name for name in ("torch", "pytorch_lightning", "lightning_fabric", "mlflow") if name in sys.modules))
"""


@pytest.mark.parametrize("argv, allowed", [
    (["--help"], []), (["registry", "--help"], []), (["datasets", "--help"], []), (["serve", "--help"], []),
    (["registry", "list"], ["mlflow"]), (["datasets", "list", "data"], []),
])
def test_commands_that_do_not_train_import_neither_torch_nor_lightning(tmp_path: Path, argv: list[str],
                                                                      allowed: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip().splitlines()[-1] == str(allowed), done.stdout + done.stderr


def test_the_runs_table_reads_each_runs_best_from_its_summary(tmp_path: Path) -> None:
    """A run's checkpoint callback records its best in checkpoints/best.json: ``runs`` reads that, no checkpoint,
    so neither torch nor Lightning is imported."""
    from mnist_dlops.rundir.run import write_summary

    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints.parent / "config.yaml").write_text("model: {}\ndata: {}\ntrainer: {max_epochs: 2}\n")
    (checkpoints / "epoch01-val_loss0.0300.ckpt").write_bytes(b"")  # never opened
    write_summary(checkpoints, "val/loss", "min", str(checkpoints / "epoch01-val_loss0.0300.ckpt"), 0.03)
    done = subprocess.run([sys.executable, "-c", PROBE, "runs"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert "version_0: lightning_logs/version_0/checkpoints/epoch01-val_loss0.0300.ckpt" in done.stdout, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr
