"""MNISTDataModule and its loaders: shapes, splits, binary labels, PNG source, no dropped evaluation sample."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_png_tree

from mnist_dlops import MNISTDataModule
from mnist_dlops.data.batches import EpochOrder
from mnist_dlops.errors import DataError


def _all(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.fixture(scope="module")
def mnist(mnist_dir: Path) -> MNISTDataModule:
    dm = MNISTDataModule(data_dir=str(mnist_dir), download=False)
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_real_splits_have_mnist_sizes_and_no_sample_dropped(mnist: MNISTDataModule) -> None:
    train_x, train_y = _all(mnist.train_dataloader())
    val_x, val_y = _all(mnist.val_dataloader())
    test_x, test_y = _all(mnist.test_dataloader())
    assert train_x.shape == (55_000, 1, 28, 28) and train_x.dtype == torch.uint8
    assert len(val_y) == 5_000 and len(test_y) == 10_000
    first = next(iter(mnist.train_dataloader()))
    assert first[0].shape == (128, 1, 28, 28) and first[1].shape == (128,)
    assert len(mnist.test_dataloader()) == 10 and len(mnist.train_dataloader()) == 430  # ceil(55000 / 128)


def test_validation_is_held_out_of_train_reproducibly(mnist: MNISTDataModule, mnist_dir: Path) -> None:
    train_x, _ = mnist.splits["train"]
    val_x, _ = mnist.splits["val"]
    train_rows = {row.numpy().tobytes() for row in train_x.flatten(1)}
    overlap = sum(row.numpy().tobytes() in train_rows for row in val_x.flatten(1))
    assert overlap <= 5  # MNIST holds a few duplicate images; a leaked split would share thousands
    same = MNISTDataModule(data_dir=str(mnist_dir), download=False)
    same.setup("fit")
    assert torch.equal(same.splits["val"][1], mnist.splits["val"][1])
    other = MNISTDataModule(data_dir=str(mnist_dir), download=False, seed=7)
    other.setup("fit")
    assert not torch.equal(other.splits["val"][0], val_x)


def test_train_order_changes_per_epoch_and_is_reproducible(mnist: MNISTDataModule) -> None:
    loader = mnist.train_dataloader()
    epoch0 = next(iter(loader))[1]
    assert torch.equal(next(iter(loader))[1], epoch0)
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))[1], epoch0)
    assert torch.equal(next(iter(mnist.val_dataloader()))[1], mnist.splits["val"][1][:1000])  # eval: in order


def test_binary_task_labels_the_digit(mnist_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_dir), task="binary", digit=3, download=False)
    dm.setup("test")
    _, labels = _all(dm.test_dataloader())
    assert dm.class_names == ["no 3", "3"] and dm.num_classes == 2
    assert set(labels.tolist()) == {0, 1} and int(labels.sum()) == 1010  # the test set's count of 3s


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_each_epoch_without_overlap(world_size: int) -> None:
    size = 1001
    train = [EpochOrder(size, True, seed=0, rank=r, world_size=world_size, even=True) for r in range(world_size)]
    parts = [o.indices() for o in train]
    assert len({len(p) for p in parts}) == 1 and all(len(p) == len(o) for p, o in zip(parts, train))
    seen = torch.cat(parts)
    assert len(set(seen.tolist())) == len(seen) == size - size % world_size
    evaluation = [EpochOrder(size, False, seed=0, rank=r, world_size=world_size) for r in range(world_size)]
    assert sorted(torch.cat([o.indices() for o in evaluation]).tolist()) == list(range(size))


def test_png_tree_source(tmp_path: Path) -> None:
    root = make_png_tree(tmp_path / "pngs", per_class=12)
    dm = MNISTDataModule(data_dir=str(root), source="png", val_size=20, batch_size=16)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.splits["train"][1]) == 100 and len(dm.splits["val"][1]) == 20
    assert dm.splits["test"][0].shape == (120, 1, 28, 28)


def test_png_tree_in_the_seeds_binary_layout(tmp_path: Path) -> None:
    names = {d: ("3" if d == 3 else "no3") for d in range(10)}
    root = make_png_tree(tmp_path / "pngs", per_class=2, names=names)
    dm = MNISTDataModule(data_dir=str(root), source="png", task="binary", digit=3, val_size=2)
    dm.setup("test")
    assert sorted(dm.splits["test"][1].tolist()) == [0] * 18 + [1] * 2
    multiclass = MNISTDataModule(data_dir=str(root), source="png")
    with pytest.raises(DataError, match="no3: class folder name not understood"):
        multiclass.setup("test")


def test_val_size_must_leave_training_data(tiny_idx: Path) -> None:
    dm = MNISTDataModule(data_dir=str(tiny_idx), val_size=300)
    with pytest.raises(DataError, match="data.val_size=300"):
        dm.setup("fit")
