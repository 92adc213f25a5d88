"""Inputs built to exhaust memory or to confuse a parser: each is refused in one line, in bounded memory, with the
right exit status and no usage dump, and whatever the command would have written stays as it was."""

from __future__ import annotations

import gzip
import os
import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_idx_set

from mnist_dlops.data.idx import MAGIC, read_idx
from mnist_dlops.errors import DataError

# Nine levels of nine aliases: 700 bytes of YAML standing for 9**9 (387 million) strings.
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n" for prev, name in zip("abcdefgh", "bcdefghi"))
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--data.val_size", "20", "--data.download", "false", "--trainer.enable_progress_bar", "false"]


def limited(*args: str, cwd: Path, memory_gb: float = 6) -> subprocess.CompletedProcess:
    """``python cli.py ARGS`` with its address space capped: a regression fails with MemoryError, not the machine."""
    cap = int(memory_gb * 2**30)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def one_line(result: subprocess.CompletedProcess, status: int, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith("error: ") and all(f in lines[-1] for f in fragments), lines[-1]


@pytest.mark.parametrize("text, fragment", [(BOMB + "trainer: *i\n", "aliases expand"),
                                            ("trainer: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply")],
                         ids=["alias bomb", "50,000 brackets"])
def test_a_config_built_to_exhaust_memory_is_one_line(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    (tmp_path / "outer.yaml").write_text("model: bad.yaml\n")  # the same file nested in another: jsonargparse reads it
    one_line(limited("fit", "-c", "bad.yaml", cwd=tmp_path), 2, "bad.yaml", fragment)
    one_line(limited("fit", "-c", "outer.yaml", cwd=tmp_path), 2, fragment)
    assert not (tmp_path / "lightning_logs").exists() or not any((tmp_path / "lightning_logs").iterdir())


def test_a_checkpoint_whose_stored_config_is_an_alias_bomb(tmp_path: Path) -> None:
    from mnist_dlops.cli.app import cli_main
    from mnist_dlops.rundir.checkpoints import STATE_KEY

    make_idx_set(tmp_path / "data")
    os.chdir(tmp_path)
    try:
        cli_main(["fit", "--data.data_dir", "data", *TINY, "--trainer.callbacks", "[]"])
    finally:
        os.chdir(REPO)
    checkpoint = torch.load(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    checkpoint[STATE_KEY]["config"] = BOMB + "trainer: *i\n"
    torch.save(checkpoint, tmp_path / "bomb.ckpt")
    one_line(limited("test", "--ckpt_path", "bomb.ckpt", "--data.data_dir", "data", cwd=tmp_path), 2,
             "bomb.ckpt", "aliases expand")


def test_a_gzip_bomb_is_refused_as_soon_as_it_passes_its_header(tmp_path: Path) -> None:
    """2 MB of gzip inflating to 2 GB behind a header promising 100 images: read against the header, it fails once
    the promise is passed, within the header's memory and not the file's."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    zeros = bytes(1 << 24)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(MAGIC["images"].to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (100, 28, 28)))
        for _ in range(128):  # 2 GiB of zeros
            f.write(zeros)
    assert path.stat().st_size < 4 * 2**20
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="holds more data bytes than the 78400 its header promises"):
            read_idx(path, MAGIC["images"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak


def test_a_runs_table_skips_a_run_with_a_malformed_config_and_lists_the_others(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    from mnist_dlops.commands.runs import runs

    for n, trainer in enumerate(("{max_epochs: 2}", "5", "{max_epochs: 3}")):
        (tmp_path / f"version_{n}").mkdir()
        (tmp_path / f"version_{n}" / "config.yaml").write_text(f"trainer: {trainer}\n")
    table = runs(runs_dir=str(tmp_path))
    assert list(table["run"]) == ["version_0", "version_2"]
    assert "skipping version_1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", [
    (["registry", "alias", "m@production", "1.5"], "version"),
    (["datasets", "png", "data"], "png.out"),
    (["fitt"], "did you mean fit?"),
    (["fit", "--trainer.max_epoch", "3"], "did you mean --trainer.max_epochs?"),
])
def test_a_mistyped_command_line_is_one_line_without_a_usage_dump(tmp_path: Path, argv: list[str],
                                                                  fragment: str) -> None:
    result = subprocess.run([sys.executable, "-m", "mnist_dlops", *argv], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    one_line(result, 2, fragment)


def test_python_m_imports_nothing_from_the_working_directory(tmp_path: Path) -> None:
    """A yaml.py or torch.py dropped where the user works never loads, before or after any gate is up."""
    for name in ("yaml", "torch", "jsonargparse", "pytorch_lightning"):
        (tmp_path / f"{name}.py").write_text(f"open({str(tmp_path / ('MARKER_' + name))!r}, 'w').close()\n")
    for argv in (["--help"], ["runs"], ["datasets", "--help"], ["fit", "--help"]):
        subprocess.run([sys.executable, "-m", "mnist_dlops", *argv], cwd=tmp_path, capture_output=True, timeout=300)
    assert not list(tmp_path.glob("MARKER_*"))
