"""Fetch the four MNIST files from a list of mirrors, verify their MD5, and write them atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from mnist_dlops.data.idx import IDX_FILES, find_idx
from mnist_dlops.errors import DataError
from mnist_dlops.writeguard import allow_writes

# The official files' MD5 sums (the same values as torchvision's and ../shared/data/mnist/MD5SUMS).
MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
DEFAULT_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


def md5sum(path: Path) -> str:
    """Return the hex MD5 of a file, read in chunks."""
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def missing_files(data_dir: Path) -> list[str]:
    """Names of the official ``.gz`` files for which ``data_dir`` holds neither the gz nor the raw file."""
    stems = [stem for pair in IDX_FILES.values() for stem in pair]
    return [f"{stem}.gz" for stem in stems if find_idx(data_dir, stem) is None]


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` into ``dest`` with a progress bar."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (https mirrors from config)
        total = int(response.headers.get("Content-Length") or 0) or None
        with dest.open("wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name[:-4]) as bar:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                out.write(chunk)
                bar.update(len(chunk))


def download_file(name: str, data_dir: Path, mirrors: list[str], timeout: float = 30.0) -> Path:
    """Download ``name`` into ``data_dir`` from the first mirror that serves it with the right MD5.

    The file is written to a temporary name in ``data_dir`` and renamed into place only once verified, so an
    interrupted or corrupted download never leaves a file that a later run would trust.
    """
    errors = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=data_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _fetch(url, tmp, timeout)
            digest = md5sum(tmp)
            if digest != MD5[name]:
                errors.append(f"{url}: MD5 {digest} != {MD5[name]}")
                continue
            os.replace(tmp, data_dir / name)
            return data_dir / name
        except (urllib.error.URLError, OSError, ValueError) as err:
            errors.append(f"{url}: {getattr(err, 'reason', err)}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(
        f"{data_dir / name}: missing, and no mirror gave a verified copy ({'; '.join(errors)}); "
        f"copy the four MNIST *-ubyte.gz files into {data_dir} or point --data.data_dir at a folder that holds them"
    )


def ensure_mnist(data_dir: Path, mirrors: list[str]) -> None:
    """Make sure ``data_dir`` holds the four MNIST files, downloading the missing ones."""
    missing = missing_files(data_dir)
    if not missing:
        return
    if not mirrors:
        raise DataError(
            f"{data_dir}: missing {', '.join(missing)} and no download mirrors are configured; copy the files "
            "there or point --data.data_dir at a folder that holds them"
        )
    allow_writes(data_dir, "data.data_dir (a download)")
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in missing:
        download_file(name, data_dir, mirrors)
