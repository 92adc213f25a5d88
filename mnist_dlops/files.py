"""Writes that land whole or not at all (a file, a folder swapped in), and free file names."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mnist_dlops.errors import ConfigError
from mnist_dlops.writeguard import allow_writes


def _staging_name(path: Path) -> Path:
    """The temporary file ``write_atomic`` writes before renaming it to ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def allow_atomic_writes(path: Path, why: str) -> None:
    """Let ``write_atomic`` write ``path`` under the write gate: that file and its temporary file, nothing else."""
    for allowed in (path, _staging_name(path)):
        allow_writes(allowed, why)


def write_atomic(path: Path, data: str | bytes | memoryview, mode: int = 0o666, durable: bool = False) -> None:
    """``data`` into ``path`` through a temporary file beside it: a reader sees the old file or the new, never half.

    ``mode``: the new file's permissions (less the umask), set before it has any content; ``durable``: on disk,
    the rename included, before this returns (a checkpoint)."""
    tmp = _staging_name(path)
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):  # a full disk fails in the write, with no file name: name the file meant
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    if durable:  # the rename itself is durable only once the folder's entry is on disk
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


@contextmanager
def replacing(out: Path, key: str = "out") -> Iterator[Path]:
    """A fresh folder to write into, swapped in for ``out`` (an output the user named as ``key``) when the block
    succeeds, left as it was if not. ``out`` may be new, empty, or a data set (IDX files, or ``train/`` and
    ``test/``) to replace: never a folder of other files. The staging folders beside it have fixed names, so
    that what a kill left is removed by the next run."""
    out = Path(out).resolve()
    if out in (Path.cwd(), *Path.cwd().parents) or (
        out.is_dir() and any(out.iterdir()) and not _holds_data(out)
    ):
        raise ConfigError(f"{key}={out}: a folder of other files; write into a new folder or over a data set")
    staging, old = out.with_name(f".{out.name}.staging"), out.with_name(f".{out.name}.old")
    for path, why in ((out, key), (staging, f"{key}'s staging"), (old, f"{key}'s staging")):
        allow_writes(path, why)
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            old.mkdir()
            os.replace(out, old / "data")
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _holds_data(folder: Path) -> bool:
    """Whether ``folder`` is a data set: MNIST's IDX files, or a PNG tree's ``train/`` and ``test/``."""
    return any(folder.glob("*-ubyte*")) or {"train", "test"} <= {p.name for p in folder.iterdir() if p.is_dir()}


def free_name(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/stem.suffix``, or ``stem-1.suffix``, ``stem-2.suffix``... whichever does not exist yet."""
    path, n = folder / f"{stem}{suffix}", 0
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path
