"""MNISTModule: one network, one loss, one step shared by train/val/test, and a metric collection per stage."""

from __future__ import annotations

import io
import math
import os
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import OptimizerCallable
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from mnist_dlops.data.images import normalize
from mnist_dlops.errors import DivergedError, one_line
from mnist_dlops.networks import FastCNN
from mnist_dlops.schedules import OneCycleLR

NetworkCallable = Callable[[int], nn.Module]  # num_classes -> network
ScheduleCallable = Callable[[Optimizer, int], LRScheduler]  # (optimizer, total_steps) -> per-step schedule

STAGES = ("train", "val", "test")


class NonFiniteLossError(DivergedError):
    """The training loss became NaN or infinite: training stops before that step updates the weights."""


def make_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy, precision, recall and F1 (macro over the digits; of the positive class when binary), + AUROC if binary."""
    if num_classes == 2:
        metrics = {
            "acc": BinaryAccuracy(),
            "precision": BinaryPrecision(),
            "recall": BinaryRecall(),
            "f1": BinaryF1Score(),
            "auroc": BinaryAUROC(),
        }
    else:
        kwargs = {"num_classes": num_classes, "average": "macro"}
        metrics = {
            # Accuracy is micro-averaged (the fraction of correct images), the others per-class then averaged.
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "precision": MulticlassPrecision(**kwargs),
            "recall": MulticlassRecall(**kwargs),
            "f1": MulticlassF1Score(**kwargs),
        }
    return MetricCollection(metrics, prefix=prefix)


class MNISTModule(pl.LightningModule):
    """Classifies MNIST digits with the configured network, optimizer and learning-rate schedule."""

    def __init__(
        self,
        network: NetworkCallable = FastCNN,
        class_names: Sequence[str] = tuple(str(d) for d in range(10)),
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[ScheduleCallable] = OneCycleLR,
    ) -> None:
        """
        Args:
            network: The network class (``class_path`` + ``init_args``); it is built with ``num_classes`` first.
            class_names: Names of the classes by label; set by the CLI from the data module, never by hand.
            optimizer: The optimizer class and its arguments (``lr`` etc.); built over the network's parameters.
            lr_scheduler: Schedule built as ``(optimizer, total_steps)`` and stepped after every step, e.g.
                ``mnist_dlops.schedules.OneCycleLR`` or ``torch.optim.lr_scheduler.CosineAnnealingLR``; null for none.
        """
        super().__init__()
        self.save_hyperparameters()
        self.class_names = list(class_names)
        self.network = network(len(self.class_names))
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.binary = len(self.class_names) == 2
        # One collection per stage (attributes, not a dict: nn.Module reserves the key "train").
        self.train_metrics = make_metrics(len(self.class_names), "train/")
        # Part of the checkpoint, so that a run resumed mid-epoch reports the same epoch metrics as an uninterrupted one.
        self.train_metrics.persistent(True)
        # An input of the right shape and type, for TensorBoard's graph (``log_graph: true``) and the model summary.
        self.example_input_array = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
        self.val_metrics = make_metrics(len(self.class_names), "val/")
        self.test_metrics = make_metrics(len(self.class_names), "test/")

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path: Any, map_location: Any = None, weights_only: Optional[bool] = None, **kwargs: Any
    ) -> MNISTModule:
        """Lightning's ``load_from_checkpoint`` for a checkpoint from anywhere: it is always loaded as plain data
        (``weights_only``, whatever is asked), and the classes its hyper-parameters name are checked
        (``mnist_dlops.trust``) before anything is built. Arguments given here override the checkpoint's."""
        from mnist_dlops.errors import CheckpointError, ConfigError
        from mnist_dlops.importguard import UntrustedImport, guarded_imports
        from mnist_dlops.rundir.run import load_checkpoint
        from mnist_dlops.trust import check_classes
        from mnist_dlops.writeguard import guarded_writes

        if kwargs.get("hparams_file"):
            raise CheckpointError("hparams_file: not supported; pass the arguments to override as keywords")
        checkpoint = load_checkpoint(checkpoint_path)
        # Lightning merges its legacy keys under ``hyper_parameters`` (saving.CHECKPOINT_PAST_HPARAMS_KEYS): check all.
        hparams: dict[str, Any] = {}
        for key in ("hparams", "module_arguments", "hyper_parameters"):
            hparams.update(checkpoint.get(key) or {})
        # A plain string naming a class is imported by the parser, not only class_path; building writes nothing.
        with guarded_imports(), guarded_writes():
            try:
                check_classes({"model": {**hparams, **kwargs}})
            except ConfigError as err:
                raise CheckpointError(f"{checkpoint_path}: {err}") from None
            # The dict just checked is what Lightning builds from, not the file read again (which could have changed).
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            buffer.seek(0)
            try:
                return super().load_from_checkpoint(buffer, map_location=map_location, weights_only=True, **kwargs)
            except (UntrustedImport, ArgumentError) as err:  # what the checkpoint names cannot be built
                raise CheckpointError(f"{checkpoint_path}: {one_line(str(err))}") from None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse weights of another network or task, compared by parameter names and shapes."""
        from mnist_dlops.errors import CheckpointError

        # Metric states may be lists (AUROC keeps its inputs): only tensors have a shape to compare.
        ours = {key: tuple(getattr(value, "shape", ())) for key, value in self.state_dict().items()}
        theirs = {key: tuple(getattr(value, "shape", ())) for key, value in checkpoint.get("state_dict", {}).items()}
        if ours != theirs:
            missing = sorted(ours.keys() - theirs.keys())[:3]
            extra = sorted(theirs.keys() - ours.keys())[:3]
            shapes = [f"{k} {theirs[k]} vs {ours[k]}" for k in sorted(ours.keys() & theirs.keys()) if ours[k] != theirs[k]]
            detail = "; ".join(
                part for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unexpected {', '.join(extra)}" if extra else "",
                    f"shape of {', '.join(shapes[:3])}" if shapes else "",
                ) if part
            )
            raise CheckpointError(
                f"the checkpoint does not fit this model ({detail}); was it trained for another network or task?"
            )

    def forward(self, images: Tensor) -> Tensor:
        """Logits for a batch of MNIST images: uint8 ``[N, 1, 28, 28]`` (0-255), as the data module serves them."""
        return self.network(normalize(images))

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        """Loss and logits of a batch, with the stage's loss and metrics logged."""
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        if stage != "train":
            # The epoch mean, weighted by batch size and averaged over processes under DDP (one reduction per epoch).
            self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(labels), sync_dist=True)
            self._update_metrics(getattr(self, f"{stage}_metrics"), logits.detach(), labels)
            return loss, logits
        # The steps at which Lightning writes step metrics to the loggers (every trainer.log_every_n_steps).
        log_now = (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        # Stop before backward: the weights stay finite, and no checkpoint of a diverged model is ever written.
        # Reading the loss costs nothing on a CPU, so every step is checked there; on a GPU it would make the host
        # wait for the device at every step, so the check runs at logging steps (checkpoints still refuse NaNs).
        if (log_now or loss.device.type == "cpu") and not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"train/loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}): training "
                "stopped before this step changed the weights; lower model.optimizer.init_args.lr (or the schedule's "
                "max_lr) and start again, or resume from the last checkpoint"
            )
        if log_now:
            # Lightning would drop step values logged between those steps anyway: log only when they are written.
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(labels))
            # The lr that drove this step (the schedule's, peaking at the optimizer's lr), as every tracker shows it.
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        # Metric states are computed, logged and reset once per epoch (below).
        self._update_metrics(self.train_metrics, logits.detach(), labels)
        return loss, logits

    def _update_metrics(self, metrics: MetricCollection, logits: Tensor, labels: Tensor) -> None:
        # Binary metrics want the positive class's probability; the multiclass ones take the logits.
        metrics.update(logits.softmax(-1)[:, 1] if self.binary else logits, labels)

    def _log_epoch_metrics(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        # compute() already gathers the states of every process under DDP. The progress bar shows the accuracy beside
        # the losses; precision, recall and F1 go to the trackers only (a terminal's width holds three numbers).
        for name, value in metrics.compute().items():
            self.log(name, value, prog_bar=stage != "train" and name.endswith("/acc"))
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Class probabilities of the batch, handed to callbacks (the diagnostics plot them)."""
        return self._step(batch, "val")[1].detach().softmax(-1)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Class probabilities of the batch, handed to callbacks (the diagnostics plot them)."""
        return self._step(batch, "test")[1].detach().softmax(-1)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Class probabilities ``[N, num_classes]`` of a batch."""
        return self(batch[0]).softmax(-1)

    def logged_metrics(self) -> list[str]:
        """Every metric name this module logs: what ``checkpoint.monitor`` or early stopping may watch."""
        names = ["train/loss", "train/lr", "val/loss", "test/loss"]
        for metrics in (self.train_metrics, self.val_metrics, self.test_metrics):
            names += list(metrics.keys(keep_base=False))
        return sorted(names)

    def setup(self, stage: str) -> None:
        """Before a fit starts: a checkpoint or early-stopping monitor must name a metric that is logged."""
        if stage != "fit":
            return
        from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

        from mnist_dlops.errors import ConfigError

        logged = self.logged_metrics()
        for callback in self.trainer.callbacks:
            monitor = callback.monitor if isinstance(callback, (ModelCheckpoint, EarlyStopping)) else None
            # Other names (device stats, a user's own metric) are not ours to know: only our stages are checked.
            if monitor and monitor.split("/")[0] in STAGES and monitor not in logged:
                key = "checkpoint.monitor" if isinstance(callback, ModelCheckpoint) else "EarlyStopping monitor"
                raise ConfigError(f"{key}={monitor}: not a metric this model logs ({', '.join(logged)})")

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        schedule = self.lr_scheduler(optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Probabilities(nn.Module):
    """The trained network as served: uint8 images in, class probabilities out (MNISTModule's normalization included).

    A plain ``nn.Module`` around the network: the LightningModule itself carries training machinery (trainer,
    metrics) that neither tracing nor ONNX should see.
    """

    def __init__(self, model: MNISTModule) -> None:
        super().__init__()
        self.network = model.network
        self.class_names = list(model.class_names)

    def forward(self, images: Tensor) -> Tensor:
        return self.network(normalize(images)).softmax(-1)


def rebuild(path: str | os.PathLike) -> MNISTModule:
    """The module a checkpoint was trained as, with its weights (``MNISTModule.load_from_checkpoint``'s checks)."""
    return MNISTModule.load_from_checkpoint(path, map_location="cpu").eval()
