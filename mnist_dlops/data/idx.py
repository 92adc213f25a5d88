"""MNIST's IDX files: their names, reading a file or a split with one-line errors, writing a set back."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the tensors are for training: `datasets` reads and writes IDX files without torch
    import torch

from mnist_dlops.errors import DataError
from mnist_dlops.files import replacing

# File stems of the official MNIST release, per split, in (images, labels) order.
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# The IDX magic numbers: 0x0000 0x08 (unsigned byte) then the number of dimensions.
MAGIC = {"images": 0x00000803, "labels": 0x00000801}


def find_idx(data_dir: Path, stem: str) -> Path | None:
    """Return the path of ``stem`` in ``data_dir``, gzipped or not, or None if neither exists."""
    for name in (f"{stem}.gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into a uint8 array shaped as its header says.

    Streamed against its header: a file holding more than the header promises (a small gzip that inflates to
    gigabytes) fails as soon as the promise is passed, in the header's memory and not the file's."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"{path}: too short to be an IDX file ({len(head)} bytes)")
            (magic,) = struct.unpack(">I", head)
            if magic != expected_magic:
                raise DataError(f"{path}: wrong magic number {magic:#010x}, expected {expected_magic:#010x}")
            dims = f.read(4 * (magic & 0xFF))
            if len(dims) < 4 * (magic & 0xFF):
                raise DataError(f"{path}: too short to be an IDX file (its header is cut)")
            shape = struct.unpack(f">{magic & 0xFF}I", dims)
            data, got = np.empty(int(np.prod(shape)), dtype=np.uint8), 0
            while got < data.size and (chunk := f.read(min(1 << 24, data.size - got))):
                data[got : got + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                got += len(chunk)
            if got < data.size:
                raise DataError(f"{path}: holds {got} data bytes, its header promises {data.size}")
            if f.read(1):
                raise DataError(f"{path}: holds more data bytes than the {data.size} its header promises")
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot be read ({err})") from err
    return data.reshape(shape)


def read_idx_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the images and labels of ``split`` (``train`` or ``test``) from the IDX files in ``data_dir``."""
    images_stem, labels_stem = IDX_FILES[split]
    images_path, labels_path = find_idx(data_dir, images_stem), find_idx(data_dir, labels_stem)
    if images_path is None or labels_path is None:
        missing = images_stem if images_path is None else labels_stem
        raise DataError(
            f"{data_dir / missing}[.gz]: missing; copy the four MNIST *-ubyte.gz files into {data_dir} "
            "(or let --data.download true fetch them on a connected machine)"
        )
    images = read_idx(images_path, MAGIC["images"])
    labels = read_idx(labels_path, MAGIC["labels"])
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} is out of range 0-9")
    import torch

    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def write_idx(path: Path, array: np.ndarray) -> None:
    """``array`` (uint8) as an IDX file, gzip-compressed when ``path`` ends in ``.gz`` (with no timestamp inside,
    so that the same data always makes the same bytes, hence the same DVC hash)."""
    kind = "images" if array.ndim == 3 else "labels"
    header = MAGIC[kind].to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="", compresslevel=6) as f:
            f.write(data)
    else:
        path.write_bytes(data)


def read_idx_set(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The train and test splits of an IDX folder as (images [N, 28, 28], labels [N])."""
    splits = {}
    for split, (images, labels) in IDX_FILES.items():
        files = [find_idx(folder, images), find_idx(folder, labels)]
        if None in files:
            raise DataError(f"{folder}: not an MNIST IDX folder (no {images}[.gz] / {labels}[.gz])")
        splits[split] = (read_idx(files[0], MAGIC["images"]), read_idx(files[1], MAGIC["labels"]))
    return splits


def write_idx_set(out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """The four gzipped IDX files of ``splits`` into ``out`` (replacing it whole)."""
    with replacing(out) as folder:
        for split, (images_stem, labels_stem) in IDX_FILES.items():
            images, labels = splits[split]
            write_idx(folder / f"{images_stem}.gz", images)
            write_idx(folder / f"{labels_stem}.gz", labels)
