"""A Lightning logger over the neptune 1.x client: offline by default, flushed as it goes."""

from __future__ import annotations

import os
import time
import uuid
from argparse import Namespace
from pathlib import Path
from typing import Any, Literal, Optional, Union
from unittest.mock import patch  # patch.dict: set environment variables for a block, restored after

from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.loggers.logger import Logger, rank_zero_experiment
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from mnist_dlops.quiet import show
from mnist_dlops.trackers.base import Tracker, flatten


class NeptuneLogger(Logger, Tracker):
    """Logs hyperparameters, metrics, tags, images and the best and last checkpoints to a Neptune run."""

    def __init__(
        self,
        save_dir: Optional[str] = None,
        project: Optional[str] = None,
        api_token: Optional[str] = None,
        mode: Literal["offline", "async", "sync", "debug"] = "offline",
        name: Optional[str] = None,
        tags: Optional[list[str]] = None,
        flush_interval: float = 10.0,
        upload_checkpoints: bool = True,
    ) -> None:
        """
        Args:
            save_dir: Folder for the offline data (``.neptune/`` inside it); null: the run's directory (the
                working directory outside the CLI).
            project: ``workspace/project`` on a Neptune server (needed by the online modes).
            api_token: Token for that server; read from ``NEPTUNE_API_TOKEN`` when null.
            mode: ``offline`` writes to disk only (send later with ``neptune sync``); ``async``/``sync`` talk to
                the server; ``debug`` keeps everything in memory.
            name: Display name of the run.
            tags: Tags of the run.
            flush_interval: At most this many seconds of logged data sit in memory before being written out.
            upload_checkpoints: Upload the best and the last checkpoint when the run ends.
        """
        super().__init__()
        self._save_dir, self._project, self._api_token, self._mode = save_dir or ".", project, api_token, mode
        self._name, self._tags = name, tags or []
        self._flush_interval, self._upload_checkpoints = flush_interval, upload_checkpoints
        self._run = None
        self._run_id: Optional[str] = None
        self._last_flush = time.monotonic()
        self._checkpoint_callback: Optional[Checkpoint] = None

    @property
    def name(self) -> str:
        return "neptune"

    @property
    def version(self) -> str:
        return self._custom_run_id()

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def log_dir(self) -> str:
        return self._save_dir

    def _custom_run_id(self) -> str:
        """A stable id for this run directory, so that a later ``test`` or resume continues the same Neptune run."""
        if self._run_id is None:  # read (or created) once: Lightning asks for ``version`` repeatedly
            id_file = Path(self._save_dir, ".neptune", "custom_run_id")
            if not id_file.is_file():
                id_file.parent.mkdir(parents=True, exist_ok=True)
                id_file.write_text(f"mnist-dlops-{uuid.uuid4().hex[:16]}")
            self._run_id = id_file.read_text().strip()
        return self._run_id

    @property
    @rank_zero_experiment
    def experiment(self):
        """The ``neptune.Run``."""
        if self._run is None:
            import neptune

            show()  # Neptune sets its logger's level when imported: back to the command's

            # The client's on-disk queue goes where the variable says when a run opens.
            with patch.dict(os.environ, {"NEPTUNE_DATA_DIRECTORY": str(Path(self._save_dir, ".neptune"))}):
                self._run = neptune.init_run(
                    project=self._project,
                    api_token=self._api_token,
                    mode=self._mode,
                    name=self._name,
                    tags=self._tags,
                    custom_run_id=self._custom_run_id(),
                    source_files=[],  # no source snapshot: the resolved config is logged as parameters
                    capture_hardware_metrics=False,
                    capture_stdout=False,
                    capture_stderr=False,
                    git_ref=False,
                )
            # The offline client keeps the custom id to itself, and ``neptune sync`` makes a new Neptune run of each
            # offline container (fit, a later test...): the run's id as a field is what groups them once synced.
            self._run["mnist_dlops/run_id"] = self._custom_run_id()
            self._run["mnist_dlops/run_dir"] = str(Path(self._save_dir).resolve())
        return self._run

    @rank_zero_only
    def log_hyperparams(self, params: Union[dict[str, Any], Namespace]) -> None:
        params = vars(params) if isinstance(params, Namespace) else params
        for key, value in flatten(params).items():  # values Neptune cannot store (None, lists) as strings
            self.experiment[f"parameters/{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        for key, value in metrics.items():
            self.experiment[key].append(float(value), step=step)

    @rank_zero_only
    def log_image(self, key: str, images: list[Any], step: Optional[int] = None) -> None:
        """Append images (PIL images, matplotlib figures or ``[H, W, 3]`` arrays) to the file series ``key``."""
        import numpy as np
        from neptune.types import File
        from PIL import Image

        for image in images:
            # Neptune reads arrays as floats in [0, 1]; a PIL image keeps uint8 pixels as they are.
            image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
            self.experiment[key].append(File.as_image(image), step=step)

    @rank_zero_only
    def tag_run(self, tags: list[str], note: Optional[str]) -> None:
        """Add ``--run.tags`` to the run's tags and ``--run.note`` as its description."""
        if tags:
            self.experiment["sys/tags"].add(tags)
        if note:
            self.experiment["sys/description"] = note

    @rank_zero_only
    def log_run_end(self, end: dict[str, Any]) -> None:
        """How the stage ended, under ``provenance/``."""
        for key, value in end.items():
            self.experiment[f"provenance/{key}"] = value

    def after_save_checkpoint(self, checkpoint_callback: Checkpoint) -> None:
        self._checkpoint_callback = checkpoint_callback

    @rank_zero_only
    def save(self) -> None:
        """Write what is queued to disk (or the server) at most every ``flush_interval`` seconds."""
        if self._run is not None and time.monotonic() - self._last_flush >= self._flush_interval:
            self._run.wait()
            self._last_flush = time.monotonic()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._run is None:
            return
        callback = self._checkpoint_callback
        if self._upload_checkpoints and callback is not None:
            for label, path in (("best", callback.best_model_path), ("last", getattr(callback, "last_model_path", ""))):
                if path and Path(path).is_file():
                    self._run[f"checkpoints/{label}"].upload(path, wait=True)
        self._run["status"] = status
        self._run.stop()
        self._run = None
