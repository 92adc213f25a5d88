"""Bad values, escaping paths, failed runs and a misread runs table, in-process and table-driven: each case is one
``error:`` line naming the key or file, the right exit status, no traceback, and every earlier file unchanged."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_idx_set, run_module

from mnist_dlops.cli.app import cli_main
from mnist_dlops.commands.export import export
from mnist_dlops.errors import ConfigError

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1",
        "--data.val_size", "20", "--trainer.enable_progress_bar", "false", "--data.download", "false",
        "--data.data_dir", "data"]


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(args: list[str], capsys: pytest.CaptureFixture, status: int, *fragments: str) -> str:
    """Run the CLI in-process: exit ``status``, a last line ``error: ...`` holding every fragment, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == status, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_idx_set(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


CONFIG_FAULTS = {
    "empty file": ({"c.yaml": ""}, ["-c", "c.yaml"], ["c.yaml: empty config file"]),
    "a list": ({"c.yaml": "- 1\n- 2\n"}, ["-c", "c.yaml"], ["c.yaml", "not a list"]),
    "no epochs": ({}, ["--trainer.max_epochs", "0"], ["trainer.max_epochs=0"]),
    "no batches": ({}, ["--trainer.limit_train_batches", "0"], ["trainer.limit_train_batches=0"]),
    "negative width": ({}, ["--model.network.init_args.hidden", "-4"], ["hidden", "-4"]),
    "escaping filename": ({}, ["--checkpoint.filename", "../../../escaped"], ["checkpoint.filename", "refused to"]),
    "another run's folder": ({}, ["--checkpoint.dirpath", "lightning_logs/version_7/checkpoints"],
                             ["checkpoint.dirpath"]),
    "empty runs_dir": ({}, ["--runs_dir", ""], ["runs_dir=''"]),
    "root dir": ({}, ["--trainer.default_root_dir", "elsewhere"], ["trainer.default_root_dir", "--runs_dir"]),
    "misspelled monitor": ({}, ["--checkpoint.monitor", "val/accc"], ["checkpoint.monitor=val/accc", "val/acc"]),
    "early stopping monitor": (
        {}, ["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor", "val/los"],
        ["EarlyStopping monitor=val/los"],
    ),
}


@pytest.mark.parametrize("fault", CONFIG_FAULTS)
def test_config_faults(lab: Path, capsys: pytest.CaptureFixture, fault: str) -> None:
    files, args, fragments = CONFIG_FAULTS[fault]
    for name, text in files.items():
        (lab / name).write_text(text)
    fails(["fit", *TINY, *args], capsys, 2, *fragments)
    assert not (lab / "lightning_logs").exists() or not any((lab / "lightning_logs").iterdir())
    assert not (lab / "escaped.ckpt").exists() and not list(lab.parent.glob("escaped*"))


def test_a_diverged_first_step_leaves_no_run(lab: Path, capsys: pytest.CaptureFixture) -> None:
    fails(["fit", *TINY, "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "1e30",
           "--model.lr_scheduler", "null"], capsys, 1, "train/loss is nan")
    assert not any((lab / "lightning_logs").iterdir())


@pytest.fixture
def trained(lab: Path) -> Path:
    cli_main(["fit", *TINY, "--trainer.callbacks", "[]"])
    return lab / "lightning_logs/version_0"


@pytest.mark.parametrize("command", ["test", "validate", "predict"])
def test_a_failed_evaluation_adds_nothing_to_the_run(trained: Path, capsys: pytest.CaptureFixture,
                                                      command: str) -> None:
    """Bad data found only once the evaluation starts: the trained run is left exactly as it was."""
    before = snapshot(trained)
    (trained.parent.parent / "empty").mkdir()
    fails([command, "--ckpt_path", str(trained), "--data.data_dir", "empty"], capsys, 1, "empty")
    assert snapshot(trained) == before


def test_export_never_replaces_an_earlier_one(trained: Path, capsys: pytest.CaptureFixture) -> None:
    export(str(trained), formats=["torchscript"])
    first = snapshot(trained / "export")
    export(str(trained / "checkpoints" / "last.ckpt"), formats=["torchscript"])
    assert snapshot(trained / "export") == first
    assert (trained / "export-1" / "model.pt").is_file()
    out = capsys.readouterr().out
    assert out.count("torchscript:") == 2 and len(out.strip().splitlines()) == 2, out
    with pytest.raises(Exception, match="already holds an export"):
        export(str(trained), formats=["torchscript"], out_dir=str(trained / "export"))
    assert snapshot(trained / "export") == first


def test_random_bytes_are_not_a_checkpoint(lab: Path, capsys: pytest.CaptureFixture) -> None:
    (lab / "r.ckpt").write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes())
    last = fails(["test", "--ckpt_path", "r.ckpt"], capsys, 2, "r.ckpt: not a PyTorch checkpoint")
    assert "run code" not in last


def test_a_data_set_with_a_file_missing_is_refused(lab: Path, capsys: pytest.CaptureFixture) -> None:
    """Fit reads only the training files, but the data set it fingerprints is all four."""
    (lab / "data" / "t10k-labels-idx1-ubyte.gz").rename(lab / "aside.gz")
    fails(["fit", *TINY], capsys, 1, "t10k-labels-idx1-ubyte missing")
    assert not any((lab / "lightning_logs").iterdir())
    (lab / "aside.gz").rename(lab / "data" / "t10k-labels-idx1-ubyte.gz")
    cli_main(["fit", *TINY, "--trainer.callbacks", "[]"])
    provenance = yaml.safe_load((lab / "lightning_logs/version_0/provenance.yaml").read_text())
    assert sorted(provenance["data"]["files"]) == sorted(
        f"{stem}-idx{n}-ubyte.gz" for stem, n in (("train-images", 3), ("train-labels", 1), ("t10k-images", 3),
                                                  ("t10k-labels", 1))
    )


@pytest.fixture
def read_only_mount(tmp_path: Path):
    """A small tmpfs that can be remounted read-only (as root, where mounting is allowed); unmounted afterwards."""
    import os
    import subprocess

    mount = tmp_path / "mnt"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("needs root and permission to mount a tmpfs, to make a read-only file system")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("command", [["test"], ["predict"], ["fit", "--trainer.max_epochs", "2"]])
def test_a_run_on_a_read_only_file_system(read_only_mount: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    import subprocess

    make_idx_set(read_only_mount / "data")
    monkeypatch.chdir(read_only_mount)
    cli_main(["fit", *TINY, "--trainer.callbacks", "[]"])
    before = snapshot(read_only_mount / "lightning_logs")
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_mount)], check=True)
    fails([command[0], "--ckpt_path", "last", *command[1:], "--data.data_dir", "data"], capsys, 1,
          "lightning_logs/version_0: cannot write into the run (Read-only file system)")
    assert snapshot(read_only_mount / "lightning_logs") == before


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"),
                                 ConnectionRefusedError(111, "Connection refused"),
                                 OSError(9, "Bad file descriptor")], ids=["ZeroDivisionError", "socket", "EBADF"])
def test_a_programming_error_stays_a_traceback(lab: Path, monkeypatch: pytest.MonkeyPatch, bug: Exception) -> None:
    """Only the user's mistakes become one line: a bug in a training step, or an OSError that names no user path,
    propagates out of ``cli_main`` as it was raised (``python cli.py`` then prints its traceback)."""
    from mnist_dlops.module import MNISTModule

    def broken_step(self, batch, batch_idx):
        raise bug

    monkeypatch.setattr(MNISTModule, "training_step", broken_step)
    with pytest.raises(type(bug)) as raised:
        cli_main(["fit", *TINY])
    assert raised.value is bug


def test_a_full_disk_is_the_users_one_line(lab: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    """The same place failing with ENOSPC (and a file name) is the user's: one line naming the file, exit 1."""
    from mnist_dlops.module import MNISTModule

    def full_disk(self, batch, batch_idx):
        raise OSError(28, "No space left on device", "lightning_logs/version_0/metrics.csv")

    monkeypatch.setattr(MNISTModule, "training_step", full_disk)
    fails(["fit", *TINY], capsys, 1, "lightning_logs/version_0/metrics.csv: No space left on device")


def test_a_bad_export_writes_nothing(trained: Path, capsys: pytest.CaptureFixture) -> None:
    """Bad arguments and a missing optional package are found before anything is written; the next export then
    takes the name the README gives (export/), not export-1/."""
    for kwargs in ({"tolerance": -1.0}, {"formats": []}, {"formats": ["torchscript", "torchscript"]}):
        with pytest.raises(ConfigError):
            export(str(trained), **kwargs)
        assert not list(trained.glob("export*")) and not list(trained.glob(".export*"))
    # Without ONNX's packages (None in sys.modules: Python's own way to make an import fail), the default export is
    # TorchScript alone, said so; asking for ONNX is one line and nothing written.
    code = ("import sys; sys.modules['onnxruntime'] = None; from mnist_dlops.commands.export import main; main()")
    result = subprocess.run([sys.executable, "-c", code, "--ckpt_path", str(trained), "--formats", "[onnx]"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "onnxruntime" in result.stderr.strip().splitlines()[-1], result.stderr
    assert not list(trained.glob("export*"))
    result = subprocess.run([sys.executable, "-c", code, "--ckpt_path", str(trained)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "onnx: skipped" in result.stdout and (trained / "export" / "model.pt").is_file()
    assert not (trained / "export" / "model.onnx").exists()


def test_resuming_a_finished_run_says_so_and_how_to_train_longer(trained: Path, capsys: pytest.CaptureFixture
                                                                      ) -> None:
    before = snapshot(trained)
    fails(["fit", "--ckpt_path", str(trained)], capsys, 2, "finished its 1 epochs", "config.yaml --trainer.max_epochs 2")
    assert snapshot(trained) == before
    cli_main(["fit", "-c", str(trained / "config.yaml"), "--trainer.max_epochs", "2"])  # the command it gives
    last = torch.load(trained.parent / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 2


def fill(mount: Path, leave: int) -> Path:
    """Fill the file system at ``mount`` but ``leave`` bytes, so that the next writes run out of space."""
    import os

    stat = os.statvfs(mount)
    filler = mount / "filler"
    filler.write_bytes(b"\0" * max(stat.f_bavail * stat.f_frsize - leave, 0))
    return filler


def test_a_full_disk_during_test_names_the_file(read_only_mount: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard's writer thread fails too: no thread traceback, one line naming a file of the run, checkpoints
    intact."""
    make_idx_set(read_only_mount / "data")
    monkeypatch.chdir(read_only_mount)
    cli_main(["fit", *TINY])  # the default tracker: TensorBoard, whose events a writer thread writes
    checkpoints = snapshot(read_only_mount / "lightning_logs/version_0/checkpoints")
    capsys.readouterr()
    fill(read_only_mount, 16_000)
    last = fails(["test", "--ckpt_path", "last", "--data.data_dir", "data"], capsys, 1, "No space left on device")
    assert last.startswith(f"error: {read_only_mount}/lightning_logs/version_0/"), last
    assert snapshot(read_only_mount / "lightning_logs/version_0/checkpoints") == checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_a_registry_that_cannot_be_written_is_one_line(read_only_mount: Path, monkeypatch: pytest.MonkeyPatch,
                                                       fault: str) -> None:
    """A read-only or full mlflow.db during ``register``: MLflow's 90-line log is not printed; the one line says what
    was being done and the database's reason; nothing is half-registered. (In processes of their own: the
    database must be closed for the file system to be remounted read-only.)"""
    make_idx_set(read_only_mount / "data")
    monkeypatch.chdir(read_only_mount)
    cli_main(["fit", *TINY, "--trainer.callbacks", "[]"])
    register = ["register", "--ckpt_path", "last", "--name", "m"]
    assert run_module("mnist_dlops", "registry", *register, cwd=read_only_mount).returncode == 0
    if fault == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", str(read_only_mount)], check=True)
    else:
        filler = fill(read_only_mount, 8_000)
    result = run_module("mnist_dlops", "registry", *register, cwd=read_only_mount)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "ERROR mlflow" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: registering ") and last.endswith(
        ("attempt to write a readonly database",) if fault == "read-only"
        else ("database or disk is full", "No space left on device")), last
    if fault == "read-only":
        subprocess.run(["mount", "-o", "remount,rw", str(read_only_mount)], check=True)
    else:
        filler.unlink()
    listed = run_module("mnist_dlops", "registry", "list", "--name", "m", cwd=read_only_mount)
    assert listed.returncode == 0 and "m" in listed.stdout
    assert [line.split()[1] for line in listed.stdout.splitlines()[1:] if line.split()[:1] == ["m"]] == ["1"], \
        listed.stdout


@pytest.mark.slow
def test_a_full_disk_during_a_sweep_names_the_file(read_only_mount: Path) -> None:
    """A trial that runs out of space stops the sweep with one line naming the file (no trial or thread traceback)."""
    make_idx_set(read_only_mount / "data")
    (read_only_mount / "sweep.yaml").write_text(yaml.safe_dump({
        "study_name": "full", "n_trials": 2,
        "space": {"model.optimizer.init_args.lr": {"type": "float", "low": 0.001, "high": 0.01}}}))
    fill(read_only_mount, 400_000)  # room for the study's database, not for a trial's run
    result = run_module("mnist_dlops", "sweep", "-c", "sweep.yaml", *TINY, cwd=read_only_mount)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {read_only_mount}/") or last.startswith("error: lightning_logs/"), last
    assert "No space left on device" in last, last  # a checkpoint adds that the previous one is intact
