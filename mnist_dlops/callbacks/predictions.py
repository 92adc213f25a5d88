"""``predict`` writes a CSV of what the model sees in each image, into the run directory, and prints a summary."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from mnist_dlops.files import free_name


class PredictionCSV(BasePredictionWriter):
    """After ``predict``, writes ``predictions.csv`` (file, predicted class, probability, true class when known).

    The true class is known for images under a folder named by a class (``3/``, ``no3/``...) and for MNIST's test
    split; the summary then includes the accuracy. Single-process: under DDP each rank holds a shard of the rows.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any], batch_indices: Any
    ) -> None:
        if not trainer.is_global_zero or not predictions:
            return
        probs = torch.cat(list(predictions))
        datamodule = trainer.datamodule
        names: list[str] = list(datamodule.predict_names)
        labels = datamodule.splits["predict"][1][: len(probs)].tolist()
        class_names = list(pl_module.class_names)
        confidence, predicted = probs.max(dim=1)
        path = free_name(Path(trainer.default_root_dir), "predictions", ".csv")
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "predicted", "probability", "true"])
            for name, p, c, y in zip(names, predicted.tolist(), confidence.tolist(), labels):
                writer.writerow([name, class_names[p], f"{c:.6f}", class_names[y] if y >= 0 else ""])
        print(summary(path, predicted.tolist(), labels, class_names))


def summary(path: Path, predicted: list[int], labels: list[int], class_names: list[str]) -> str:
    """A few lines: where the CSV is, how many images per predicted class, and the accuracy where labels are known."""
    counts = Counter(predicted)
    lines = [f"wrote {len(predicted)} predictions to {path}"]
    lines.append("predicted: " + ", ".join(f"{class_names[c]}: {counts[c]}" for c in sorted(counts)))
    known = [(p, y) for p, y in zip(predicted, labels) if y >= 0]
    if known:
        accuracy = sum(p == y for p, y in known) / len(known)
        lines.append(f"accuracy on the {len(known)} images of known class: {accuracy:.4f}")
    return "\n".join(lines)
