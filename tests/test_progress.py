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
                                        "--data.batch_size", "16", "--trainer.callbacks", "[]", "--log_level", "info"],
                             columns=80)
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


def test_the_sanity_checks_metrics_are_not_shown_as_results(tiny_idx: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Until the first real validation, the bar shows no val/ metric (the sanity check's two batches are no result)."""
    from pytorch_lightning import Callback

    from mnist_dlops.callbacks import ProgressBar
    from mnist_dlops.cli.app import run

    seen: list[dict] = []

    class Watch(Callback):
        def look(self, trainer) -> None:  # noqa: ANN001
            bar = next(c for c in trainer.callbacks if isinstance(c, ProgressBar))
            seen.append(bar.get_metrics(trainer, trainer.lightning_module))

        def on_validation_end(self, trainer, pl_module):  # noqa: ANN001
            if trainer.sanity_checking:  # what the bar draws as the sanity check ends, and keeps till it redraws
                self.look(trainer)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            self.look(trainer)

    monkeypatch.chdir(tmp_path)
    run(["fit", "--data.data_dir", str(tiny_idx), "--data.download", "false", "--data.val_size", "20",
         "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.callbacks", "[]"],
        callbacks=[Watch()])
    assert not any(key.startswith("val/") for key in seen[0] | seen[1] | seen[2])  # only the sanity check had run
    assert any(key.startswith("val/") for key in seen[3])  # epoch 1: epoch 0's validation is a result


def test_validate_alone_draws_its_bar(tiny_idx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A validate (no sanity check before it) runs with the bar on: its end hook needs no fit's state."""
    from mnist_dlops.cli.app import run

    monkeypatch.chdir(tmp_path)
    common = ["--data.data_dir", str(tiny_idx), "--data.download", "false", "--data.val_size", "20"]
    run(["fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.callbacks", "[]",
         "--trainer.enable_progress_bar", "false"])
    cli = run(["validate", "--ckpt_path", str(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"), *common])
    assert "val/acc" in cli.trainer.callback_metrics
