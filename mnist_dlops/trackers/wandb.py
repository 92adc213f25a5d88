"""Weights & Biases, offline-first: online only when W&B is configured and its server answers; never a long wait."""

from __future__ import annotations

import http.client
import logging
import netrc
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal, Optional
from urllib.parse import urlparse

import numpy as np
from pytorch_lightning.loggers import WandbLogger as LightningWandbLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities.rank_zero import rank_zero_only, rank_zero_warn
from torch import Tensor

from mnist_dlops.trackers.base import Tracker

DEFAULT_BASE_URL = "https://api.wandb.ai"


def wandb_configured() -> bool:
    """Whether the user set W&B up: ``WANDB_MODE``, ``WANDB_API_KEY``, or a ``wandb login`` entry in ~/.netrc."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)).hostname
    try:
        return netrc.netrc().authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def server_reachable(timeout: float) -> bool:
    """Whether the W&B server answers an HTTP request within ``timeout`` seconds: a server that accepts the
    connection and then stays silent counts as unreachable."""
    request = urllib.request.Request(os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL), method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:  # an answer (404, 401...): the server is there
        return True
    except (OSError, ValueError, http.client.HTTPException):  # refused, timed out, TLS failed, not HTTP, a bad URL
        return False
    return True


# W&B's folders outside the run (its docs: WANDB_DATA_DIR stages artifacts such as the plots' tables,
# WANDB_CACHE_DIR holds the artifact cache and wandb-core's logs), kept inside the run's wandb/ folder instead.
RUN_LOCAL_DIRS = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache"}


def previous_run_id(save_dir: str) -> Optional[str]:
    """The id of the W&B run already in this run directory (``wandb/*run-<id>/``), to continue it."""
    runs = sorted(Path(save_dir, "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


class WandbLogger(LightningWandbLogger, Tracker):
    """Lightning's W&B logger, writing into the run directory, offline unless W&B is configured and reachable.

    Offline runs live in ``<run>/wandb/offline-run-*``; upload one later with ``wandb sync <that folder>``.
    A ``test``/resume of the same run continues the same W&B run id.
    """

    def __init__(
        self,
        project: str = "mnist-dlops",
        name: Optional[str] = None,
        tags: Optional[list[str]] = None,
        notes: Optional[str] = None,
        save_dir: Optional[str] = None,
        mode: Literal["auto", "online", "offline"] = "auto",
        connect_timeout: float = 5.0,
        log_model: bool = False,
    ) -> None:
        """
        Args:
            project: W&B project the run belongs to.
            name: Display name of the run (W&B picks one when null).
            tags: Tags shown and filterable in W&B.
            notes: A free-text description of the run.
            save_dir: Folder for W&B's files; null: the run's directory (the working directory outside the CLI).
            mode: ``auto`` is online when W&B is configured (API key, ``wandb login`` or ``WANDB_MODE``) and its
                server answers within ``connect_timeout``, offline otherwise; ``online``/``offline`` force it.
            connect_timeout: Seconds to wait for the W&B server's answer before falling back to offline.
            log_model: Upload checkpoints as W&B artifacts (online only).
        """
        super().__init__(
            name=name,
            project=project,
            save_dir=save_dir or ".",
            tags=tags,
            notes=notes,
            log_model=log_model,
            settings={"init_timeout": 30.0},
        )
        self._mode, self._connect_timeout = mode, connect_timeout
        self._environ_set: list[str] = []

    def _resolve_mode(self) -> str:
        """The mode to start W&B in, falling back to offline (with a one-line warning) when it cannot be reached."""
        if self._mode == "offline" or (self._mode == "auto" and not wandb_configured()):
            return "offline"
        if os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
            return os.environ["WANDB_MODE"]
        if not server_reachable(self._connect_timeout):
            rank_zero_warn("W&B server not reachable: logging offline (upload later with `wandb sync`).")
            return "offline"
        return "online"

    # private: Lightning's W&B logger keeps the run's arguments (_wandb_init) and the run (_experiment) to itself;
    # the mode and id must be set after __init__, when the run starts, to fall back offline.
    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            for name, folder in RUN_LOCAL_DIRS.items():
                if name not in os.environ:  # a user's own setting stays theirs
                    os.environ[name] = str(Path(self._save_dir, "wandb", folder).resolve())
                    self._environ_set.append(name)
            self._wandb_init["mode"] = self._resolve_mode()
            # W&B prints its own banner and a 30-line summary: shown only at --log_level info (mnist_dlops.quiet).
            self._wandb_init["settings"] = {**self._wandb_init.get("settings", {}),
                                            "silent": not logging.getLogger("wandb").isEnabledFor(logging.INFO)}
            self._wandb_init.pop("anonymous", None)  # Lightning still passes it; W&B warns that it does nothing
            self._wandb_init["id"] = self._wandb_init.get("id") or previous_run_id(self._save_dir)
            if self._wandb_init["mode"] == "online":
                try:
                    return super().experiment
                except Exception as err:  # a bad key or a server error: keep the run going offline
                    rank_zero_warn(f"W&B online start failed ({err.__class__.__name__}): logging offline instead.")
                    self._wandb_init["mode"] = "offline"
        return super().experiment

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """End the W&B run with the stage: a later run in the same process (a sweep's next trial, a test after a
        fit) would otherwise be logged into this one, or into its folder, which wandb keeps for the process."""
        super().finalize(status)
        if self._experiment is not None:
            import wandb

            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None
            wandb.teardown()  # and its process-wide settings (the files' folder among them) go with it
        while self._environ_set:
            os.environ.pop(self._environ_set.pop(), None)

    @rank_zero_only
    def log_histograms(self, tensors: dict[str, Tensor], step: Optional[int] = None) -> None:
        """One W&B histogram per tensor."""
        import wandb

        self.log_metrics({name: wandb.Histogram(values.numpy()) for name, values in tensors.items()}, step)

    @rank_zero_only
    def log_classification(
        self, stage: str, labels: np.ndarray, predicted: np.ndarray, roc: list[Any], pr: list[Any],
        class_names: list[str], step: Optional[int] = None,
    ) -> None:
        """W&B's own interactive plots: its confusion matrix, and the diagnostics' ROC and PR curves as line series."""
        import wandb

        def series(curves, title: str, xname: str) -> Any:
            # At most 200 points a curve: W&B stores each plot as a table, and the curves' shape survives it.
            picks = [np.linspace(0, len(c.x) - 1, min(len(c.x), 200)).astype(int) for c in curves]
            return wandb.plot.line_series(
                xs=[c.x[i].tolist() for c, i in zip(curves, picks)], ys=[c.y[i].tolist() for c, i in zip(curves, picks)],
                keys=[f"{c.name} ({c.area:.4f})" for c in curves], title=title, xname=xname,
            )

        plots = {
            f"{stage}/wandb_confusion_matrix": wandb.plot.confusion_matrix(
                y_true=labels.tolist(), preds=predicted.tolist(), class_names=class_names
            ),
            f"{stage}/wandb_roc": series(roc, "ROC", "false positive rate"),
            f"{stage}/wandb_pr": series(pr, "Precision-recall", "recall"),
        }
        self.log_metrics(plots, step)  # type: ignore[arg-type]

    @rank_zero_only
    def tag_run(self, tags: list[str], note: Optional[str]) -> None:
        """Add ``--run.tags`` to the W&B run's tags and ``--run.note`` to its notes."""
        run = self.experiment
        run.tags = tuple(dict.fromkeys([*(run.tags or ()), *tags]))
        if note:
            run.notes = f"{run.notes}\n{note}" if run.notes else note

    @rank_zero_only
    def log_run_end(self, end: dict[str, Any]) -> None:
        """How the stage ended, in the run's summary."""
        self.experiment.summary.update({f"provenance/{k}": v for k, v in end.items()})
