"""Diagnostics: confusion matrices, ROC/PR curves and a gallery of mistakes, in every tracker and ``<run>/plots/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from jsonargparse.typing import NonNegativeInt, PositiveInt
from PIL import Image
from pytorch_lightning import Callback
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
    binary_roc,
    multiclass_auroc,
    multiclass_average_precision,
    multiclass_confusion_matrix,
    multiclass_precision_recall_curve,
    multiclass_roc,
)

from mnist_dlops.callbacks.plots import Curve, confusion_figure, curves_figure, gallery_figure, to_rgb
from mnist_dlops.files import free_name
from mnist_dlops.trackers.base import tracker_keys


def confusion(probs: Tensor, labels: Tensor) -> Tensor:
    """Counts ``[true, predicted]`` of the most probable class."""
    return multiclass_confusion_matrix(probs.argmax(1), labels, num_classes=probs.shape[1])


def roc_curves(probs: Tensor, labels: Tensor, class_names: list[str]) -> list[Curve]:
    """Binary: one ROC curve of the positive class. Multiclass: one-vs-rest per class. Areas from torchmetrics."""
    if probs.shape[1] == 2:
        fpr, tpr, _ = binary_roc(probs[:, 1], labels)
        return [Curve(class_names[1], fpr.numpy(), tpr.numpy(), float(binary_auroc(probs[:, 1], labels)))]
    fprs, tprs, _ = multiclass_roc(probs, labels, num_classes=probs.shape[1])
    aucs = multiclass_auroc(probs, labels, num_classes=probs.shape[1], average=None)
    return [Curve(n, f.numpy(), t.numpy(), float(a)) for n, f, t, a in zip(class_names, fprs, tprs, aucs)]


def pr_curves(probs: Tensor, labels: Tensor, class_names: list[str]) -> list[Curve]:
    """Precision over recall, like ``roc_curves``; the area is the average precision."""
    if probs.shape[1] == 2:
        precision, recall, _ = binary_precision_recall_curve(probs[:, 1], labels)
        ap = float(binary_average_precision(probs[:, 1], labels))
        return [Curve(class_names[1], recall.numpy(), precision.numpy(), ap)]
    precisions, recalls, _ = multiclass_precision_recall_curve(probs, labels, num_classes=probs.shape[1])
    aps = multiclass_average_precision(probs, labels, num_classes=probs.shape[1], average=None)
    return [Curve(n, r.numpy(), p.numpy(), float(a)) for n, p, r, a in zip(class_names, precisions, recalls, aps)]


class _Collected:
    """Probabilities and labels of one evaluation pass, plus its misclassified images (for the gallery)."""

    def __init__(self) -> None:
        self.probs: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.wrong: list[tuple[Tensor, Tensor, Tensor]] = []  # images, labels, probs

    def add(self, images: Tensor, labels: Tensor, probs: Tensor) -> None:
        probs, labels = probs.detach().float().cpu(), labels.cpu()
        self.probs.append(probs)
        self.labels.append(labels)
        wrong = probs.argmax(1) != labels
        if wrong.any():
            self.wrong.append((images[wrong].cpu(), labels[wrong], probs[wrong]))

    def gathered(self) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
        """(probs, labels, wrong images, their labels, their probs) over all processes; None when nothing was seen."""
        parts = [(self.probs, self.labels, self.wrong)]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (self.probs, self.labels, self.wrong))
        probs = [p for part in parts for p in part[0]]
        if not probs:
            return None
        labels = [y for part in parts for y in part[1]]
        wrong = [w for part in parts for w in part[2]]
        images = torch.cat([w[0] for w in wrong]) if wrong else torch.zeros(0, 1, 28, 28, dtype=torch.uint8)
        wrong_labels = torch.cat([w[1] for w in wrong]) if wrong else torch.zeros(0, dtype=torch.long)
        wrong_probs = torch.cat([w[2] for w in wrong]) if wrong else torch.zeros(0, probs[0].shape[1])
        return torch.cat(probs), torch.cat(labels), images, wrong_labels, wrong_probs


class Diagnostics(Callback):
    """Confusion matrix, ROC/PR curves and a gallery of mistakes after a fit, validate and test, for every tracker."""

    def __init__(
        self, every_n_epochs: Optional[PositiveInt] = None, gallery_size: NonNegativeInt = 24,
        weight_histograms: bool = True,
    ) -> None:
        """
        Args:
            every_n_epochs: Plot validation results every this many epochs; null: once, from the fit's last
                validation, whenever it ends (drawing costs about as much as a validation pass). ``test`` and
                ``validate`` are always plotted.
            gallery_size: How many of the most confidently misclassified digits to show.
            weight_histograms: Also log a histogram of every parameter tensor at each training epoch's end, to the
                trackers that show histograms (TensorBoard, W&B).
        """
        self.every_n_epochs, self.gallery_size, self.weight_histograms = every_n_epochs, gallery_size, weight_histograms
        self._collected = _Collected()
        self._last: Optional[tuple[_Collected, int, int]] = None  # the fit's last validation, not yet drawn

    def _due(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        return self.every_n_epochs is None or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collected = _Collected()

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if isinstance(outputs, Tensor) and (trainer.testing or self._due(trainer)):
            self._collected.add(batch[0], batch[1], outputs)

    on_test_batch_end = on_validation_batch_end

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        if self.every_n_epochs is None and trainer.state.fn == TrainerFn.FITTING:
            self._last = (self._collected, trainer.current_epoch, trainer.global_step)  # drawn at on_train_end
        else:
            self._report(trainer, pl_module, "val", self._collected, trainer.current_epoch, trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last is not None:
            self._report(trainer, pl_module, "val", *self._last)
            self._last = None

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module, "test", self._collected, trainer.current_epoch, trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.weight_histograms or not trainer.is_global_zero:
            return
        weights = {f"weights/{name}": p.detach().float().cpu() for name, p in pl_module.named_parameters()}
        for tracker in tracker_keys(trainer.loggers).values():
            tracker.log_histograms(weights, step=trainer.global_step)

    def _report(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, collected: _Collected, epoch: int,
        step: int,
    ) -> None:
        gathered = collected.gathered()
        self._collected = _Collected()
        if gathered is None or not trainer.is_global_zero:
            return
        probs, labels, wrong_images, wrong_labels, wrong_probs = gathered
        class_names = list(pl_module.class_names)
        confidence, predicted = wrong_probs.max(1) if len(wrong_probs) else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
        top = confidence.argsort(descending=True)[: self.gallery_size]
        roc, pr = roc_curves(probs, labels, class_names), pr_curves(probs, labels, class_names)
        figures = {
            "confusion_matrix": confusion_figure(confusion(probs, labels).numpy(), class_names),
            "roc": curves_figure(roc, "roc"),
            "pr": curves_figure(pr, "pr"),
            "mistakes": gallery_figure(
                wrong_images[top, 0].numpy(), wrong_labels[top].tolist(), predicted[top].tolist(),
                confidence[top].tolist(), class_names,
            ),
        }
        folder = Path(trainer.default_root_dir) / "plots" / stage
        folder.mkdir(parents=True, exist_ok=True)
        prefix = f"epoch{epoch:02d}-" if stage == "val" else ""
        for name, fig in figures.items():
            # Drawn once: the trackers and the PNG file get the same pixels (a savefig would draw it all again).
            image = to_rgb(fig)
            Image.fromarray(image).save(free_name(folder, f"{prefix}{name}", ".png"))
            for tracker in tracker_keys(trainer.loggers).values():
                tracker.log_image(key=f"{stage}/{name}", images=[image], step=step)
        for tracker in tracker_keys(trainer.loggers).values():
            tracker.log_classification(stage, labels.numpy(), probs.argmax(1).numpy(), roc, pr, class_names, step=step)
