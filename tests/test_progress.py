"""The progress bar as a person sees it on a real 80-column terminal (tmux), read back with capture-pane."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, make_idx_set


def terminal_output(cwd: Path, args: list[str], columns: int) -> str:
    """Run ``python cli.py ARGS`` in a detached tmux terminal ``columns`` wide; the whole screen and scrollback."""
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("tmux missing: .ci/run installs Debian's tmux")
        pytest.skip("tmux is not installed")
    session = f"bar{os.getpid()}"
    command = f"cd {shlex.quote(str(cwd))} && {shlex.quote(sys.executable)} {REPO / 'cli.py'} " \
              f"{shlex.join(args)}; echo EXIT=$?; sleep 300"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", str(columns), "-y", "40", command], check=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            screen = subprocess.run(["tmux", "capture-pane", "-t", session, "-p", "-S", "-200"],
                                    capture_output=True, text=True, check=True).stdout
            if "EXIT=" in screen:
                return screen
            time.sleep(0.5)
        pytest.fail(f"the fit did not end within 240 s:\n{screen}")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_the_bar_fits_80_columns_and_keeps_lightnings_lines(tmp_path: Path) -> None:
    make_idx_set(tmp_path / "data", n_train=900)
    screen = terminal_output(tmp_path, ["fit", "--data.data_dir", "data", "--data.val_size", "100",
                                        "--data.batch_size", "16", "--trainer.callbacks", "[]"], columns=80)
    lines = [line.rstrip() for line in screen.splitlines()]
    assert "EXIT=0" in lines, screen
    # Lightning's status line survives the live display instead of being drawn over.
    assert any("`Trainer.fit` stopped: `max_epochs=2` reached." in line for line in lines), screen
    # The final bar is drawn once (a redraw below a stray line would leave a second copy).
    assert sum(line.startswith("Epoch 1/1") for line in lines) == 1, screen
    # Every metric stands whole, name and value on one line: none is left dangling at a line's end.
    assert not [line for line in lines if re.search(r"(train|val)/\w+:$", line)], screen
    for name in ("train/loss", "val/loss", "val/acc"):
        assert any(re.search(rf"{name}: \d\.\d{{3}}", line) for line in lines), (name, screen)
