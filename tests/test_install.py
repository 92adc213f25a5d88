"""What the installed package promises beyond training: the trackers' own command-line tools run, and the CLI's
start-up does not import the heavy optional packages (they load only when a config or command uses them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

HEAVY = ("wandb", "neptune", "mlflow", "optuna", "litserve", "onnx", "onnxruntime", "sqlalchemy")


@pytest.mark.parametrize("tool", ["neptune", "wandb"])
def test_tracker_tools_run(tool: str) -> None:
    """neptune's CLI needs pkg_resources (setuptools < 81, pinned); wandb's is used for `wandb sync`."""
    result = subprocess.run([str(Path(sys.executable).parent / tool), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Usage:" in result.stdout


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"]])
def test_help_imports_no_optional_package(args: list[str]) -> None:
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['cli.py', *{args!r}]\n"
        "try:\n    runpy.run_path('cli.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "LOADED []" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def test_importing_the_package_loads_none_of_its_commands() -> None:
    """``mnist-dlops <command>`` runs a module the package itself has not imported yet (else Python warns
    that it was found in sys.modules and runs a second copy of it)."""
    commands = ["mnist_dlops.cli", "mnist_dlops.commands.runs", "mnist_dlops.commands.export",
                "mnist_dlops.commands.registry", "mnist_dlops.cli.sweep", "mnist_dlops.serve.command"]
    code = f"import sys, mnist_dlops\nprint('LOADED', [m for m in {commands!r} if m in sys.modules])\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "LOADED []" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
