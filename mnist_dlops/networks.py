"""The networks a config can choose: plain ``nn.Module``s from normalized ``[N, 1, 28, 28]`` images to logits."""

from __future__ import annotations

import torch
from jsonargparse.typing import PositiveInt
from torch import Tensor, nn


def _conv_block(c_in: int, c_out: int, batch_norm: bool = False) -> nn.Sequential:
    """3x3 conv (same padding) [-> BatchNorm] -> 2x2 max-pool -> ReLU: halves the image side.

    Pooling before the ReLU gives the same output as after it (both are monotonic), with the ReLU and its gradient
    on a quarter of the values.
    """
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)  # BatchNorm's shift makes a bias redundant
    norm = [nn.BatchNorm2d(c_out)] if batch_norm else []
    return nn.Sequential(conv, *norm, nn.MaxPool2d(2), nn.ReLU())


class _ChannelsLast(nn.Module):
    """A network whose weights and inputs are channels-last (see the module's docstring)."""

    def _channels_last(self) -> None:
        self.to(memory_format=torch.channels_last)

    def _features(self, x: Tensor) -> Tensor:
        return self.features(x.contiguous(memory_format=torch.channels_last))


class MLP(nn.Module):
    """The seeds' multilayer perceptron: 784 -> hidden -> num_classes."""

    def __init__(self, num_classes: int, hidden: PositiveInt = 100) -> None:
        """
        Args:
            num_classes: Number of output logits (set by the CLI from the data module's task).
            hidden: Width of the hidden layer.
        """
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class SeedCNN(_ChannelsLast):
    """The seeds' CNN: conv 64 -> conv 128 (each 3x3, ReLU, 2x2 max-pool) -> linear."""

    def __init__(self, num_classes: int, channels: tuple[PositiveInt, PositiveInt] = (64, 128)) -> None:
        """
        Args:
            num_classes: Number of output logits (set by the CLI from the data module's task).
            channels: Output channels of the two conv blocks.
        """
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(_conv_block(1, c1), _conv_block(c1, c2), nn.Flatten())
        self.head = nn.Linear(c2 * 7 * 7, num_classes)
        self._channels_last()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self._features(x))


class FastCNN(_ChannelsLast):
    """A small CNN for a laptop CPU (the default): conv 16 -> conv 32 (each with BatchNorm) -> fc 128 -> num_classes.

    About 207k parameters; with BatchNorm it reaches ~99% in two epochs (three without).
    """

    def __init__(
        self,
        num_classes: int,
        channels: tuple[PositiveInt, PositiveInt] = (16, 32),
        hidden: PositiveInt = 128,
        batch_norm: bool = True,
    ) -> None:
        """
        Args:
            num_classes: Number of output logits (set by the CLI from the data module's task).
            channels: Output channels of the two conv blocks.
            hidden: Width of the fully connected layer.
            batch_norm: Normalize each conv's output over the batch; false builds the network of earlier runs, without it.
        """
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(_conv_block(1, c1, batch_norm), _conv_block(c1, c2, batch_norm), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c2 * 7 * 7, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        self._channels_last()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self._features(x))
