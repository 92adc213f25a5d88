"""The data: the data module a config names (``mnist_dlops.data.MNISTDataModule``), IDX files, images, downloads,
in-memory batches, the fingerprint and DVC data versions."""

from mnist_dlops.data.datamodule import DataChangedWarning, MNISTDataModule

__all__ = ["DataChangedWarning", "MNISTDataModule"]
