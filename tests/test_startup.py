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
