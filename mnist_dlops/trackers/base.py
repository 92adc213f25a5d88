"""What a tracker offers beyond Lightning's ``Logger``: one declared interface, every method a no-op by default."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from torch import Tensor


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``a/b/c`` keys, for trackers that store flat parameters; an empty dict stays a value."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Tracker:
    """Optional tracker features used by the diagnostics, the run record and resume."""

    def log_image(self, key: str, images: list[np.ndarray], step: Optional[int] = None) -> None:
        """Show ``[H, W, 3]`` uint8 images (the diagnostics' plots) under ``key`` at ``step``."""

    def log_histograms(self, tensors: dict[str, Tensor], step: Optional[int] = None) -> None:
        """Show one histogram per tensor (the weights, each epoch)."""

    def log_classification(
        self, stage: str, labels: np.ndarray, predicted: np.ndarray, roc: list[Any], pr: list[Any],
        class_names: list[str], step: Optional[int] = None,
    ) -> None:
        """Show the tracker's own interactive confusion matrix and ROC/PR curves, where it has them."""

    def tag_run(self, tags: list[str], note: Optional[str]) -> None:
        """Label the run with ``--run.tags`` and ``--run.note``."""

    def log_run_end(self, end: dict[str, Any]) -> None:
        """Record how the stage ended (end time, wall time, status)."""

    def state_dict(self) -> dict[str, Any]:
        """What the tracker needs in a checkpoint to continue the run on resume (plain values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: ``state`` is ``state_dict()``'s, plus the checkpoint's ``global_step``."""


def tracker_keys(loggers: list[Any]) -> dict[str, Tracker]:
    """The run's trackers by a key that survives reordering the loggers: the class name, ``#2`` for a second one."""
    keys: dict[str, Tracker] = {}
    for logger in loggers:
        if isinstance(logger, Tracker):
            name, n = type(logger).__qualname__, 1
            while (key := name if n == 1 else f"{name}#{n}") in keys:
                n += 1
            keys[key] = logger
    return keys
