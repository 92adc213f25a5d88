"""The model's input drift reference: seven image statistics, each binned at the training data's deciles."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

STATISTICS = ("ink", "mean_intensity", "bbox_width", "bbox_height", "center_x", "center_y", "confidence")
BINS = 10
REFERENCE_FILE = "reference.json"


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """The statistics of uint8 images ``[N, 28, 28]`` (white digit on black), confidence aside."""
    images = images.reshape(len(images), 28, 28).astype(np.float32) / 255.0
    ink = images > 0.5
    rows, cols = ink.any(axis=2), ink.any(axis=1)

    def extent(mask: np.ndarray) -> np.ndarray:
        first = np.where(mask.any(axis=1), mask.argmax(axis=1), 0)
        last = np.where(mask.any(axis=1), mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1), -1)
        return (last - first + 1).astype(np.float32)

    mass = images.sum(axis=(1, 2)) + 1e-6
    grid = np.arange(28, dtype=np.float32)
    return {
        "ink": ink.mean(axis=(1, 2)),
        "mean_intensity": images.mean(axis=(1, 2)),
        "bbox_width": extent(cols),
        "bbox_height": extent(rows),
        "center_x": (images.sum(axis=1) * grid).sum(axis=1) / mass,
        "center_y": (images.sum(axis=2) * grid).sum(axis=1) / mass,
    }


@dataclass
class Reference:
    """Per statistic: the inner bin edges (deciles on the training data) and the training share of each bin."""

    edges: dict[str, list[float]]
    shares: dict[str, list[float]]
    data_version: str = ""  # the training data's version (``v1:b6c29e96``), a label of the served model

    @classmethod
    def from_values(cls, values: dict[str, np.ndarray], data_version: str = "") -> Reference:
        edges, shares = {}, {}
        for name, column in values.items():
            cut = np.unique(np.quantile(column, np.linspace(0, 1, BINS + 1)[1:-1]))  # ties merge bins
            counts = np.bincount(np.searchsorted(cut, column, side="right"), minlength=len(cut) + 1)
            edges[name], shares[name] = cut.tolist(), (counts / counts.sum()).tolist()
        return cls(edges, shares, data_version)

    def bins(self, name: str, column: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.edges[name]), column, side="right")

    def psi(self, name: str, column: np.ndarray) -> float:
        """The population stability index of ``column`` against the training shares: what ``monitoring/rules.yml``
        computes in Prometheus (shares floored at 0.001), here for a plot or a test."""
        q = np.maximum(np.asarray(self.shares[name]), 0.001)
        counts = np.bincount(self.bins(name, column), minlength=len(q))
        p = np.maximum(counts / max(1, counts.sum()), 0.001)
        return float(((p - q) * np.log(p / q)).sum())

    def save(self, folder: Path) -> Path:
        file = folder / REFERENCE_FILE
        file.write_text(json.dumps({"edges": self.edges, "shares": self.shares, "data_version": self.data_version},
                                   indent=1))
        return file

    @classmethod
    def load(cls, folder: Path) -> Optional[Reference]:
        file = folder / REFERENCE_FILE
        if not file.is_file():
            return None
        data = json.loads(file.read_text())
        return cls(data["edges"], data["shares"], data.get("data_version", ""))


def reference_of(forward: Any, images: np.ndarray, data_version: str = "", batch: int = 1000) -> Reference:
    """The reference of a model on its training images (uint8 ``[N, 28, 28]``): image statistics and confidence."""
    import torch

    values = image_statistics(images)
    confidence = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))[:, None]
            confidence.append(forward(chunk).float().max(dim=1).values.numpy())
    values["confidence"] = np.concatenate(confidence)
    return Reference.from_values(values, data_version)


def training_reference(path: Path, model: Any, n: int = 10_000) -> Optional[Reference]:
    """The drift reference of the model on (a seeded sample of) the data it was trained on, read as its checkpoint's
    config says; None, said in one line, when that data cannot be read here."""
    import yaml

    from mnist_dlops.data import MNISTDataModule
    from mnist_dlops.data.versions import version_label
    from mnist_dlops.errors import UserError, reason
    from mnist_dlops.rundir.checkpoints import STATE_KEY
    from mnist_dlops.rundir.run import load_checkpoint

    config = yaml.safe_load(load_checkpoint(path).get(STATE_KEY, {}).get("config") or "{}") or {}
    try:
        data = MNISTDataModule(**{**(config.get("data") or {}), "download": False})
        data.setup("fit")
    except (UserError, OSError, TypeError) as err:
        print(f"drift reference: skipped, the training data cannot be read here ({reason(err)})")
        return None
    images = data.splits["train"][0][:, 0].numpy()
    sample = np.random.default_rng(0).permutation(len(images))[:n]
    version = data.data_version.as_dict() if data.data_version else None
    return reference_of(model, images[np.sort(sample)], version_label(version))
