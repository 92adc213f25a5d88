"""A loader that serves whole batches sliced from in-memory tensors, shuffled per epoch and sharded across ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from torch import Tensor

from mnist_dlops.errors import ConfigError


class EpochOrder:
    """The sample order of one rank: a fresh permutation per epoch, derived from (seed, epoch) alone.

    Lightning calls ``set_epoch`` on a loader's ``sampler`` at every epoch start, as it does for a
    ``DistributedSampler``; deriving the order from the epoch number (not from the global RNG) makes it
    reproducible, identical on every rank, and independent of anything else that draws random numbers.
    """

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, even: bool = False):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.even = rank, world_size, even
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> Tensor:
        """This rank's sample indices for the current epoch."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=gen)
        else:
            order = torch.arange(self.size)
        if self.even:
            # Training: every rank must run the same number of steps, so the last (size % world) samples of this
            # epoch's permutation wait for the next epoch. Evaluation (even=False) keeps every sample.
            order = order[: self.size - self.size % self.world_size]
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        if self.even:
            return self.size // self.world_size
        return len(range(self.rank, self.size, self.world_size))


class TensorBatches:
    """Iterates ``(images, labels)`` batches of one split held in memory; the last batch may be short.

    Resumable mid-epoch: the order of an epoch is a function of (seed, epoch), so continuing one only needs to know
    how many of its batches were done. ``start_batch`` tells that when an epoch's iteration begins (the training
    loop's own count, which Lightning restores from the checkpoint; prefetching makes the loader's count wrong).
    """

    batch_sampler = None  # DataLoader's attribute, read by Lightning; batches here are slices, not sampled lists

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        order: EpochOrder,
        start_batch: Optional[Callable[[], int]] = None,
    ) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.sampler = order  # named like DataLoader's attribute so that Lightning calls set_epoch on it
        self.start_batch = start_batch

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        indices = self.sampler.indices()
        first = self.start_batch() if self.start_batch else 0
        for start in range(first * self.batch_size, len(indices), self.batch_size):
            idx = indices[start : start + self.batch_size]
            yield self.images[idx], self.labels[idx]

    def state_dict(self) -> dict[str, Any]:
        """What fixes the order: a resumed run must shuffle the same data with the same seed."""
        return {"seed": self.sampler.seed, "size": self.sampler.size, "world_size": self.sampler.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse to continue an epoch whose order would differ from the one the checkpoint was taken in."""
        mine = self.state_dict()
        changed = {k: (v, mine[k]) for k, v in state.items() if k in mine and mine[k] != v}
        if changed:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise ConfigError(f"cannot resume mid-epoch: the training data order changed ({what}); resume with the run's "
                              "own data settings, or start a new run")
