"""MNISTDataModule: the MNIST splits for a task, held in memory as uint8 tensors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
from jsonargparse.typing import PositiveInt
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from mnist_dlops.data.batches import EpochOrder, TensorBatches
from mnist_dlops.data.download import DEFAULT_MIRRORS, ensure_mnist
from mnist_dlops.data.fingerprint import data_fingerprint
from mnist_dlops.data.idx import IDX_FILES, find_idx, read_idx_split
from mnist_dlops.data.images import read_png_folder, read_png_split
from mnist_dlops.data.versions import DataVersion, read_version, repo_root, workspace_version
from mnist_dlops.errors import DataError, invoked

Digit = Literal[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


class DataChangedWarning(UserWarning):
    """The data differs from the data a checkpoint was trained on."""


class MNISTDataModule(pl.LightningDataModule):
    """MNIST for the 10-digit task or one digit against the rest; validation is held out of train."""

    def __init__(
        self,
        data_dir: str = "data/mnist",
        source: Literal["idx", "png"] = "idx",
        task: Literal["multiclass", "binary"] = "multiclass",
        digit: Digit = 3,
        val_size: PositiveInt = 5000,
        seed: int = 42,
        batch_size: PositiveInt = 128,
        eval_batch_size: PositiveInt = 1000,
        download: bool = True,
        mirrors: Sequence[str] = DEFAULT_MIRRORS,
        predict_dir: Optional[str] = None,
        version: Optional[str] = None,
    ) -> None:
        """
        Args:
            data_dir: Folder with the four MNIST IDX files (``*-ubyte.gz`` or uncompressed), or with
                ``train/<class>/*.png`` and ``test/<class>/*.png`` when ``source`` is ``png``.
            source: ``idx`` for the official MNIST files; ``png`` for a folder of PNG digits, one sub-folder per class
                named by its digit (``0``..``9``), or for the binary task by the digit and ``no<digit>``.
            task: ``multiclass`` classifies the 10 digits; ``binary`` tells ``digit`` from the rest.
            digit: The positive class of the binary task.
            val_size: Number of training images held out for validation.
            seed: Seed of the train/validation split and of the per-epoch shuffle.
            batch_size: Training batch size (per process under DDP).
            eval_batch_size: Batch size for validation, test and predict (no gradients, so larger is faster).
            download: Download the IDX files into ``data_dir`` when they are missing.
            mirrors: Base URLs tried in order for the download; every file's MD5 is checked before use.
            predict_dir: Folder of PNG digits (any size; searched recursively) for ``predict``; without it, ``predict``
                runs on the MNIST test split. Files under a folder named by a class are scored against that class.
            version: A git revision (tag, branch, commit) of the DVC-tracked ``data_dir`` to train or evaluate on,
                read through DVC without checking it out (the working copy is untouched); null: ``data_dir`` as it
                is on disk. Either way the run records the data version it read.
        """
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.source, self.task, self.digit = source, task, digit
        self.val_size, self.seed = val_size, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.download, self.mirrors = download, list(mirrors)
        self.predict_dir = Path(predict_dir) if predict_dir else None
        self.version = version
        # Where the files are read from: data_dir, or the folder DVC fetched ``version`` into (see prepare_data).
        self._read_dir: Optional[Path] = None
        self._data_version: Optional[DataVersion] = None
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}
        # What each prediction is of, in order: a file path, or ``test[i]`` for the MNIST test split.
        self.predict_names: list[str] = []
        self._fingerprint: Optional[str] = None

    @property
    def class_names(self) -> list[str]:
        """Display names of the classes, indexed by label (for logs and plots)."""
        if self.task == "binary":
            return [f"no {self.digit}", f"{self.digit}"]
        return [str(d) for d in range(10)]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def fingerprint(self) -> str:
        """Content hash of the data files this module reads (IDX files or the PNG tree), computed once per run."""
        if self._fingerprint is None:
            files = self.data_files()  # resolves the data version first
            # No cache file inside a DVC repository: a file added to a tracked folder or a stage's output changes it.
            cache = self._data_version is None and repo_root(self.read_dir) is None
            self._fingerprint = data_fingerprint(self.read_dir, files, cache=cache)
        return self._fingerprint

    @property
    def read_dir(self) -> Path:
        """The folder the files are read from: ``data_dir``, or DVC's copy of ``version``."""
        if self._read_dir is None:
            self._resolve_version()
        return self._read_dir

    @property
    def data_version(self) -> Optional[DataVersion]:
        """The DVC data version read (its hash, the git commit of its pointer, tags); None: not tracked by DVC."""
        self.read_dir  # noqa: B018 - resolves the version once
        return self._data_version

    def _resolve_version(self) -> None:
        if self.version is not None:
            self._read_dir, self._data_version = read_version(self.data_dir, self.version)
            return
        self._read_dir = self.data_dir
        if self.data_dir.is_dir():
            self._data_version = workspace_version(self.data_dir)
            if self._data_version is None:
                rank_zero_info(f"data: {self.data_dir} is not tracked by DVC; the run records its fingerprint only "
                               f"({invoked('datasets add')} {self.data_dir} makes it a data version)")

    def data_files(self) -> list[Path]:
        """The files of the data set: the four IDX files, or every file of the PNG tree's train/ and test/.

        All of them, whatever the stage reads, so that fit and test fingerprint the same data set: a data set with
        a part missing is an error here, not a fingerprint of three files.
        """
        folder = self.read_dir
        if self.source == "png":
            missing = [split for split in ("train", "test") if not (folder / split).is_dir()]
            if missing:
                raise DataError(f"{folder / missing[0]}: no such folder (a PNG data set has train/ and test/)")
            return [p for split in ("train", "test") for p in (folder / split).rglob("*") if p.is_file()]
        stems = [stem for pair in IDX_FILES.values() for stem in pair]
        missing = [stem for stem in stems if find_idx(folder, stem) is None]
        if missing:
            raise DataError(
                f"{folder}: {', '.join(missing)} missing (an MNIST data set is four files: {', '.join(stems)})"
            )
        return [find_idx(folder, stem) for stem in stems]

    def state_dict(self) -> dict[str, Any]:
        """Kept in every checkpoint: the fingerprint of the data it was trained (or evaluated) on."""
        version = self.data_version
        return {"data_fingerprint": self.fingerprint, "data_dir": str(self.data_dir),
                "data_version": version.as_dict() if version else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Warn, clearly, when the data about to be used is not the data the checkpoint was trained on."""
        trained_on = state.get("data_fingerprint")
        if trained_on and trained_on != self.fingerprint:
            rank_zero_warn(
                f"the data in {self.data_dir} (fingerprint {self.fingerprint[:12]}) differs from the data this "
                f"checkpoint was trained on ({trained_on[:12]}, in {state.get('data_dir')}): results are not "
                "comparable with the run's",
                category=DataChangedWarning,
            )

    def prepare_data(self) -> None:
        """Download missing IDX files (runs once per machine, before ``setup``)."""
        if self.source == "idx" and self.download and self.version is None:
            ensure_mnist(self.data_dir, self.mirrors)

    def setup(self, stage: str) -> None:
        """Load the splits this stage needs into memory, once."""
        if stage in ("fit", "validate") and "train" not in self.splits:
            images, labels = self._read("train")
            if self.val_size >= len(images):
                raise DataError(f"data.val_size={self.val_size} leaves no training images out of {len(images)}")
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
            train_idx, val_idx = order[: -self.val_size], order[-self.val_size :]
            self.splits["train"] = (images[train_idx], labels[train_idx])
            self.splits["val"] = (images[val_idx], labels[val_idx])
        if stage == "test" or (stage == "predict" and self.predict_dir is None):
            if "test" not in self.splits:
                self.splits["test"] = self._read("test")
        if stage == "predict":
            self._setup_predict()

    def _setup_predict(self) -> None:
        """The images to predict: the PNG folder, labeled by class-named parent folders (-1: unknown), or test."""
        if self.predict_dir is None:
            self.splits["predict"] = self.splits["test"]
            self.predict_names = [f"test[{i}]" for i in range(len(self.splits["test"][1]))]
            return
        images, files = read_png_folder(self.predict_dir)
        class_of = {**self._png_classes(), **{name: i for i, name in enumerate(self.class_names)}}
        labels = torch.tensor([class_of.get(f.parent.name, -1) for f in files], dtype=torch.int64)
        self.splits["predict"] = (images.unsqueeze(1).contiguous(), labels)
        self.predict_names = [str(f) for f in files]

    def _read(self, split: str) -> tuple[Tensor, Tensor]:
        """Read one split as (uint8 [N, 1, 28, 28], int64 [N]) with the task's labels."""
        if not self.data_dir.is_dir() and self.version is None:
            raise DataError(
                f"{self.data_dir}: not a folder; put the four MNIST *-ubyte.gz files there "
                "or point --data.data_dir at a folder that holds them"
            )
        if self.source == "png":
            images, labels = read_png_split(self.read_dir, split, self._png_classes())
        else:
            images, labels = read_idx_split(self.read_dir, split)
        if self.task == "binary" and self.source == "idx":
            labels = (labels == self.digit).long()
        return images.unsqueeze(1).contiguous(), labels

    def _png_classes(self) -> dict[str, int]:
        """Map class-folder names to labels: digits for multiclass; the digit vs ``no<digit>`` for binary."""
        if self.task == "multiclass":
            return {str(d): d for d in range(10)}
        negatives = {str(d): 0 for d in range(10) if d != self.digit}
        negatives.update({f"no{self.digit}": 0, f"no {self.digit}": 0, f"no_{self.digit}": 0})
        return {**negatives, str(self.digit): 1}

    def _loader(self, split: str, train: bool) -> TensorBatches:
        images, labels = self.splits[split]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        order = EpochOrder(len(labels), shuffle=train, seed=self.seed, rank=rank, world_size=world, even=train)
        start = self._batches_done if train else None
        return TensorBatches(images, labels, self.batch_size if train else self.eval_batch_size, order, start)

    def _batches_done(self) -> int:
        """Training batches already done in the current epoch: 0, or more when resuming from a mid-epoch checkpoint."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def train_dataloader(self) -> TensorBatches:
        return self._loader("train", train=True)

    def val_dataloader(self) -> TensorBatches:
        return self._loader("val", train=False)

    def test_dataloader(self) -> TensorBatches:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> TensorBatches:
        return self._loader("predict", train=False)
