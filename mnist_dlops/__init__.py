"""mnist-dlops: config-driven, tracked and reproducible MNIST experiments on LightningCLI."""

from mnist_dlops.data import MNISTDataModule
from mnist_dlops.module import MNISTModule

__all__ = ["MNISTDataModule", "MNISTModule"]
