"""Bad input, bad files and hostile files: each gets one ``error:`` line, the right exit code, and nothing is lost.

Each case runs the real CLI (in-process, ``cli_main``, unless it needs a process of its own). Exit codes: 2 for a bad config or checkpoint argument (found
before anything starts), 1 for bad data, a diverged training or an unwritable path.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, cli_in_process, make_idx_set, make_png_tree, run_cli, write_idx

TINY = ["--trainer.max_epochs", "1", "--data.val_size", "10", "--trainer.enable_progress_bar", "false",
        "--data.download", "false"]


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def assert_one_line_error(result: subprocess.CompletedProcess, status: int, *fragments: str) -> str:
    """The exit status, and a last stderr line ``error: ...`` holding every fragment; no traceback."""
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


def no_run_started(cwd: Path) -> None:
    runs = cwd / "lightning_logs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())


# ---- config errors: exit 2 at parse time, naming the key or flag and the value, no run directory ----------------

EVIL = '''
from pytorch_lightning import Callback
from pathlib import Path

class Evil(Callback):
    def __init__(self):
        Path("pwned").write_text("instantiated")
'''


@pytest.mark.parametrize(
    ("files", "args", "fragments"),
    [
        ({}, ["fit", "-c", "nope.yaml"], ["nope.yaml", "does not exist"]),
        ({"c.yaml": "trainer:\n  max_epoch: 3\n"}, ["fit", "-c", "c.yaml"], ["max_epoch"]),
        ({"c.yaml": "trainer: [1, 2\n"}, ["fit", "-c", "c.yaml"], ["c.yaml"]),
        ({}, ["fit", "--trainer.max_epoch", "3"], ["unrecognized arguments: --trainer.max_epoch 3"]),
        ({}, ["fit", "--data.bach_size", "3"], ["--data.bach_size"]),
        ({}, ["fit", "--data.batch_size", "abc"], ["data.batch_size", "abc"]),
        ({}, ["fit", "--data.batch_size", "-3"], ["data.batch_size", "-3"]),
        ({}, ["fit", "--data.task", "ternary"], ["data.task", "ternary"]),
        ({}, ["fit", "--model.optimizer.init_args.lr", "-0.1"], ["model.optimizer.init_args.lr=-0.1", "> 0"]),
        ({}, ["fit", "--trainer.max_epochs", "-5"], ["trainer.max_epochs=-5"]),
        ({}, ["fit", "--trainer.precision", "bf16-mixed", "--trainer.gradient_clip_val", "1"],
         ["trainer.gradient_clip_val=1", "fused=false"]),
        ({}, ["fit", "--model.network", "os.system"], ["model.network", "os.system"]),
        ({"evil.py": EVIL, "c.yaml": "trainer:\n  callbacks:\n    - class_path: evil.Evil\n"}, ["fit", "-c", "c.yaml"],
         ["trainer.callbacks", "refused to import 'evil'", "MNIST_DLOPS_TRUST=evil"]),
    ],
)
def test_config_errors(tmp_path: Path, files: dict[str, str], args: list[str], fragments: list[str]) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    before = snapshot(tmp_path)
    sys.path.insert(0, str(tmp_path))  # so that evil.py is importable, as on a server
    try:
        result = cli_in_process(*args, cwd=tmp_path)
    finally:
        sys.path.remove(str(tmp_path))
    assert_one_line_error(result, 2, *fragments)
    no_run_started(tmp_path)
    assert not (tmp_path / "pwned").exists()
    assert snapshot(tmp_path) == before


def test_settings_lightning_refuses_together(tmp_path: Path, tiny_idx: Path) -> None:
    """Lightning's own refusal (its device stats need a logger; ours stay idle without one) is one line too, and
    leaves no run behind."""
    result = cli_in_process("fit", "--data.data_dir", str(tiny_idx), *TINY, "--trainer.logger", "false",
                     "--trainer.callbacks", "pytorch_lightning.callbacks.DeviceStatsMonitor", cwd=tmp_path)
    assert_one_line_error(result, 2, "DeviceStatsMonitor", "logger=False")
    no_run_started(tmp_path)


# ---- data errors: exit 1, naming the file and what is wrong, no training started ----------------------------------

def _gz(path: Path, data: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(data)


DATA_FAULTS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "missing": (lambda d: (d / "train-images-idx3-ubyte.gz").unlink(), ["train-images-idx3-ubyte", "copy the four"]),
    "truncated gz": (
        lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes((d / "train-images-idx3-ubyte.gz").read_bytes()[:100]),
        ["train-images-idx3-ubyte.gz"],
    ),
    "corrupted gz": (lambda d: (d / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all"),
                     ["train-labels-idx1-ubyte.gz", "cannot be read"]),
    "wrong magic": (lambda d: _gz(d / "train-images-idx3-ubyte.gz", b"\x00\x00\x08\x01" + b"\x00" * 8),
                    ["train-images-idx3-ubyte.gz", "wrong magic number"]),
    "label count": (lambda d: write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(299, dtype=np.uint8)),
                    ["299 labels for 300 images"]),
    "label range": (lambda d: write_idx(d / "train-labels-idx1-ubyte.gz", np.full(300, 12, dtype=np.uint8)),
                    ["label 12 is out of range"]),
}


@pytest.mark.parametrize("fault", DATA_FAULTS)
def test_data_errors(tmp_path: Path, fault: str) -> None:
    data = make_idx_set(tmp_path / "data")
    make_fault, fragments = DATA_FAULTS[fault]
    make_fault(data)
    result = cli_in_process("fit", "--data.data_dir", str(data), *TINY, cwd=tmp_path)
    assert_one_line_error(result, 1, *fragments)
    no_run_started(tmp_path)


@pytest.mark.parametrize(
    ("make_fault", "fragments"),
    [
        (lambda root: (root / "train" / "3" / "notes.txt").write_text("hello"), ["notes.txt", "not a readable image"]),
        (lambda root: None, ["empty class folder"]),  # train/4 emptied (below)
        (lambda root: None, ["not a folder"]),  # data_dir is a file (below)
    ],
)
def test_png_data_errors(tmp_path: Path, make_fault: Callable[[Path], None], fragments: list[str]) -> None:
    root = make_png_tree(tmp_path / "pngs")
    data_dir = root
    if "not a folder" in fragments:
        data_dir = tmp_path / "a_file"
        data_dir.write_text("x")
    else:
        for p in (root / "train" / "4").iterdir() if "empty class folder" in fragments else []:
            p.unlink()
        make_fault(root)
    result = cli_in_process("fit", "--data.source", "png", "--data.data_dir", str(data_dir), *TINY, cwd=tmp_path)
    assert_one_line_error(result, 1, *fragments)
    no_run_started(tmp_path)


# ---- checkpoint errors: exit 2, one actionable line, never a hint to disable weights_only -------------------------

class Payload:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny binary-task run to point checkpoints at."""
    cwd = tmp_path_factory.mktemp("trained")
    data = make_idx_set(cwd / "data")
    result = cli_in_process("fit", "--data.data_dir", str(data), "--data.task", "binary", *TINY, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _payload(path: Path) -> Path:
    torch.save({"state_dict": Payload()}, path)
    return path


CKPT_FAULTS: dict[str, tuple[Callable[[Path, Path], list[str]], list[str]]] = {
    "missing": (lambda d, good: ["test", "--ckpt_path", str(d / "nope.ckpt")], ["no such checkpoint file"]),
    "empty": (lambda d, good: ["test", "--ckpt_path", str(_write(d / "e.ckpt", b""))], ["e.ckpt: empty file"]),
    "truncated": (lambda d, good: ["test", "--ckpt_path", str(_write(d / "t.ckpt", good.read_bytes()[:2000]))],
                  ["t.ckpt: truncated or corrupted checkpoint"]),
    "random bytes": (lambda d, good: ["test", "--ckpt_path", str(_write(d / "r.ckpt", os.urandom(5000)))],
                     ["r.ckpt: not a PyTorch checkpoint"]),
    "a folder": (lambda d, good: (d / "somedir").mkdir() or ["test", "--ckpt_path", str(d / "somedir")],
                 ["somedir: a folder holding no checkpoint"]),
    "pickle payload": (lambda d, good: ["test", "--ckpt_path", str(_payload(d / "p.ckpt"))],
                       ["p.ckpt", "refusing to load it"]),
    "another task": (lambda d, good: ["test", "--ckpt_path", str(good), "--data.task", "multiclass"],
                     ["does not fit this model", "another network or task"]),
    "another network": (lambda d, good: ["test", "--ckpt_path", str(good), "--model.network",
                                          "mnist_dlops.networks.MLP"], ["does not fit this model"]),
}


@pytest.mark.parametrize("fault", CKPT_FAULTS)
def test_checkpoint_errors(tmp_path: Path, trained: Path, fault: str) -> None:
    make, fragments = CKPT_FAULTS[fault]
    args = make(tmp_path, trained)
    run_before = snapshot(trained.parent.parent)
    result = cli_in_process(*args, cwd=tmp_path)
    line = assert_one_line_error(result, 2, *fragments)
    assert "weights_only=False" not in result.stderr and "weights_only" not in line
    assert not (tmp_path / "pwned").exists()
    if fault not in ("another task", "another network"):
        no_run_started(tmp_path)
    after = snapshot(trained.parent.parent)
    assert {k: v for k, v in after.items() if k in run_before} == run_before  # the trained run is untouched


def test_any_garbage_is_a_checkpoint_error(tmp_path: Path) -> None:
    """Random bytes make torch's unpickler fail in many ways (IndexError, KeyError, UnicodeDecodeError...): each one
    must be the one-line CheckpointError the CLI prints, never a traceback. 300 seeded garbage files, in-process."""
    from mnist_dlops.errors import CheckpointError
    from mnist_dlops.rundir.run import load_checkpoint

    rng = np.random.default_rng(0)
    for i in range(300):
        path = _write(tmp_path / f"g{i}.ckpt", rng.bytes(int(rng.integers(1, 5000))))
        with pytest.raises(CheckpointError, match=f"g{i}.ckpt"):
            load_checkpoint(path)


# ---- training and output errors ------------------------------------------------------------------------------------

def test_nan_loss_stops_within_a_step_and_saves_nothing(tmp_path: Path, tiny_idx: Path) -> None:
    result = cli_in_process("fit", "--data.data_dir", str(tiny_idx), *TINY, "--model.optimizer", "torch.optim.SGD",
                     "--model.optimizer.init_args.lr", "1e30", "--model.lr_scheduler", "null", cwd=tmp_path)
    assert_one_line_error(result, 1, "train/loss is nan at step 1", "training stopped")
    assert not (tmp_path / "lightning_logs/version_0/checkpoints").exists()


@pytest.mark.slow  # a long real run or a server: in `pytest -m slow` and CI, to keep the default run short
def test_disk_full_names_the_checkpoint_and_keeps_the_previous_one(tmp_path: Path, tiny_idx: Path) -> None:
    # No diagnostics: their images would fill the small disk before the checkpoint does.
    first = run_cli("fit", "--data.data_dir", str(tiny_idx), *TINY, "--model.lr_scheduler", "null",
                    "--model.optimizer.lr", "0.001", "--trainer.callbacks", "[]", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    before = snapshot(tmp_path / "lightning_logs")

    def small_disk() -> None:  # no file may grow past 300 kB: the checkpoint (about 0.5 MB) cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    resumed = subprocess.run(
        # Only last.ckpt is written (no best-by-metric file), so that it is the one that cannot be.
        [sys.executable, str(REPO / "cli.py"), "fit", "--ckpt_path", "last", "--trainer.max_epochs", "2",
         "--checkpoint.save_top_k", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, preexec_fn=small_disk,
    )
    assert_one_line_error(resumed, 1, str(last), "cannot write checkpoint", "the previous one is intact")
    assert torch.load(last, weights_only=True)["epoch"] == 0  # still the first run's, loadable
    after = snapshot(tmp_path / "lightning_logs")
    assert after[str(last.relative_to(tmp_path / "lightning_logs"))] == before[str(last.relative_to(tmp_path / "lightning_logs"))]
    assert not list(last.parent.glob("*.tmp"))


@pytest.mark.slow  # several runs: in `pytest -m slow` and CI, to keep the default run near 10 minutes
def test_resuming_a_one_cycle_run_with_another_length_is_one_line(tmp_path: Path, tiny_idx: Path) -> None:
    first = run_cli("fit", "--data.data_dir", str(tiny_idx), *TINY, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    result = run_cli("fit", "--ckpt_path", "last", "--trainer.max_epochs", "2", cwd=tmp_path)
    assert_one_line_error(result, 2, "one-cycle schedule spans 3 steps, this run 6")


def test_runs_dir_that_is_a_file(tmp_path: Path, tiny_idx: Path) -> None:
    (tmp_path / "lightning_logs").write_text("not a folder")
    result = run_cli("fit", "--data.data_dir", str(tiny_idx), *TINY, cwd=tmp_path)
    assert_one_line_error(result, 1, "lightning_logs")
    assert (tmp_path / "lightning_logs").read_text() == "not a folder"


@pytest.mark.slow  # real data or several processes: run by `pytest -m slow` and CI
def test_runs_started_at_the_same_instant_get_distinct_directories(tmp_path: Path, tiny_idx: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, str(REPO / "cli.py"), "fit", "--data.data_dir", str(tiny_idx), *TINY],
                         cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    runs = sorted(p.name for p in (tmp_path / "lightning_logs").iterdir())
    assert runs == ["version_0", "version_1", "version_2", "version_3"]
    for run in runs:  # each run has its own config and checkpoints, nothing shared or overwritten
        assert (tmp_path / "lightning_logs" / run / "config.yaml").is_file()
        assert (tmp_path / "lightning_logs" / run / "checkpoints" / "last.ckpt").is_file()
