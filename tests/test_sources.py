"""Reading IDX files and PNG trees: right tensors for good files, one naming line for bad ones."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTOS, digit_photo, fake_digits, make_idx_set, make_png_tree, write_idx
from PIL import Image

from mnist_dlops.data.idx import IDX_FILES, find_idx, read_idx, read_idx_split
from mnist_dlops.data.images import read_png_split
from mnist_dlops.errors import DataError

DIGITS = {str(d): d for d in range(10)}


def test_gz_and_raw_idx_read_the_same(tmp_path: Path) -> None:
    gz = make_idx_set(tmp_path / "gz", gz=True)
    raw = make_idx_set(tmp_path / "raw", gz=False)
    images_gz, labels_gz = read_idx_split(gz, "train")
    images_raw, labels_raw = read_idx_split(raw, "train")
    expected_images, expected_labels = fake_digits(300, 0)
    assert images_gz.dtype == torch.uint8 and images_gz.shape == (300, 28, 28)
    assert labels_gz.dtype == torch.int64
    assert torch.equal(images_gz, images_raw) and torch.equal(labels_gz, labels_raw)
    assert np.array_equal(images_gz.numpy(), expected_images)
    assert np.array_equal(labels_gz.numpy(), expected_labels)


def test_real_mnist_reads_with_known_sizes(mnist_dir: Path) -> None:
    images, labels = read_idx_split(mnist_dir, "test")
    assert images.shape == (10_000, 28, 28)
    assert torch.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _corrupt(folder: Path, name: str, data: bytes) -> None:
    with gzip.open(folder / name, "wb") as f:
        f.write(data)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("train-images-idx3-ubyte.gz", b"\x00\x00\x08\x01" + b"\x00" * 8, "wrong magic number"),
        ("train-images-idx3-ubyte.gz", b"\x00\x00", "too short"),
        ("train-labels-idx1-ubyte.gz", b"\x00\x00\x08\x01\x00\x00\x01\x2c" + b"\x01" * 10, "header promises 300"),
    ],
)
def test_bad_idx_names_file_and_fault(tmp_path: Path, name: str, data: bytes, message: str) -> None:
    folder = make_idx_set(tmp_path)
    _corrupt(folder, name, data)
    with pytest.raises(DataError, match=message) as err:
        read_idx_split(folder, "train")
    assert name in str(err.value)


def test_truncated_gzip_names_file(tmp_path: Path) -> None:
    folder = make_idx_set(tmp_path)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="cannot be read") as err:
        read_idx_split(folder, "train")
    assert str(path) in str(err.value)


def test_label_count_and_range_are_checked(tmp_path: Path) -> None:
    folder = make_idx_set(tmp_path)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(299, dtype=np.uint8))
    with pytest.raises(DataError, match="299 labels for 300 images"):
        read_idx_split(folder, "train")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.full(300, 12, dtype=np.uint8))
    with pytest.raises(DataError, match="label 12 is out of range"):
        read_idx_split(folder, "train")


def test_missing_file_is_named(tmp_path: Path) -> None:
    folder = make_idx_set(tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*missing"):
        read_idx_split(folder, "test")


def test_png_tree_reads_digits_by_folder(tmp_path: Path) -> None:
    root = make_png_tree(tmp_path / "pngs")
    images, labels = read_png_split(root, "train", DIGITS)
    expected_images, expected_labels = fake_digits(30, 0)
    order = np.lexsort((np.arange(30), expected_labels))  # read back class by class, files in name order
    assert images.shape == (30, 28, 28) and images.dtype == torch.uint8
    assert np.array_equal(labels.numpy(), expected_labels[order])
    assert np.array_equal(images.numpy(), expected_images[order])


def test_png_of_any_size_and_mode_becomes_an_mnist_digit(tmp_path: Path) -> None:
    """A dark stroke on white paper, off-center in a 56x40 RGB image, becomes MNIST-like: white on black, centered."""
    from PIL import ImageDraw

    folder = tmp_path / "pngs" / "train" / "7"
    folder.mkdir(parents=True)
    img = Image.new("RGB", (56, 40), (255, 255, 255))
    ImageDraw.Draw(img).rectangle((4, 2, 11, 37), fill=(0, 0, 0))  # a "1" near the left edge
    img.save(folder / "big.png")
    images, labels = read_png_split(tmp_path / "pngs", "train", DIGITS)
    assert images.shape == (1, 28, 28) and labels.tolist() == [7]
    digit = images[0].double()
    assert digit.max() > 200 and digit[0].sum() == digit[-1].sum() == 0  # inverted; the border is black
    rows, cols = torch.nonzero(digit > 32, as_tuple=True)
    assert int(rows.max() - rows.min()) + 1 <= 20  # fitted into MNIST's 20x20 box
    cy = (digit.sum(1) * torch.arange(28)).sum() / digit.sum()
    cx = (digit.sum(0) * torch.arange(28)).sum() / digit.sum()
    assert abs(cy - 13.5) < 1 and abs(cx - 13.5) < 1  # centered by its center of mass


def test_28x28_mnist_digits_written_as_png_read_back_unchanged(tmp_path: Path, mnist_dir: Path) -> None:
    images, labels = read_idx_split(mnist_dir, "test")
    for i in range(20):
        folder = tmp_path / "pngs" / "test" / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].numpy()).save(folder / f"{i:05d}.png")
    from mnist_dlops.data.images import read_png_folder

    read, files = read_png_folder(tmp_path / "pngs")
    by_name = {int(f.stem): img for f, img in zip(files, read)}
    assert all(torch.equal(by_name[i], images[i]) for i in range(20))


@pytest.mark.parametrize(
    ("make_fault", "message"),
    [
        (lambda root: (root / "train" / "3" / "notes.txt").write_text("hello"), "notes.txt: not a readable image"),
        (lambda root: (root / "train" / "4").mkdir() or None, "empty class folder"),
        (lambda root: (root / "train" / "cats").mkdir(), "class folder name not understood"),
    ],
)
def test_bad_png_tree_names_the_fault(tmp_path: Path, make_fault, message: str) -> None:
    root = make_png_tree(tmp_path / "pngs", names={4: "5"})  # no folder "4" yet
    make_fault(root)
    with pytest.raises(DataError, match=message):
        read_png_split(root, "train", DIGITS)


@pytest.mark.parametrize("paper", sorted(PHOTOS))
def test_a_digit_is_found_on_any_paper(paper: str, mnist_dir: Path) -> None:
    """Photos of real MNIST digits (grey, noisy, unevenly lit paper; small and off-centre) come out as MNIST made
    them: the digit, not the page, fitted into 20x20 and centred, close to the original 28x28 image."""
    from mnist_dlops.data.images import decode_image

    originals = read_idx(find_idx(mnist_dir, IDX_FILES["test"][0]), 0x00000803)[:30]
    similarity = []
    for i, original in enumerate(originals):
        digit = decode_image(digit_photo(original, seed=i, **PHOTOS[paper])).astype(np.float64)
        rows, cols = np.nonzero(digit > 32)
        assert rows.max() - rows.min() < 22 and cols.max() - cols.min() < 22  # the digit, not the page
        similarity.append(np.corrcoef(digit.ravel(), original.astype(np.float64).ravel())[0, 1])
    assert np.mean(similarity) > 0.7, similarity
