"""Callbacks the CLI always adds: the run's record (config and provenance: saved, logged, kept in checkpoints) and
its resumable state."""

from __future__ import annotations

import functools
import random
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning import Callback
from pytorch_lightning.accelerators.cpu import get_cpu_stats
from pytorch_lightning.callbacks import DeviceStatsMonitor as LightningDeviceStatsMonitor
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.trainer.states import TrainerFn

from mnist_dlops.provenance import code_version, environment
from mnist_dlops.trackers.base import Tracker, tracker_keys


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def _described(datamodule: Any) -> Any:
    """The data files a fingerprint covers: their names (IDX), or how many (a PNG tree)."""
    if not hasattr(datamodule, "data_files"):  # a data module of the user's own
        return None
    files = [p.relative_to(datamodule.data_dir).as_posix() for p in datamodule.data_files()]
    return files if len(files) <= 10 else f"{len(files)} files"


def free_name(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/stem.suffix``, or ``stem-1.suffix``, ``stem-2.suffix``... whichever does not exist yet."""
    path, n = folder / f"{stem}{suffix}", 0
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path


class RunConfigSaver(SaveConfigCallback):
    """Writes the run's record into its directory and sends it to every tracker: the config and the provenance.

    ``fit`` writes ``config.yaml`` and ``provenance.yaml`` (a resumed fit ``config-1.yaml``...); an evaluation of
    the run's checkpoint (``validate``/``test``/``predict``) lands in the same directory and writes
    ``config.<stage>.yaml`` and ``provenance.<stage>.yaml`` beside them (``-1``, ``-2``... if repeated), so nothing
    of the training run is overwritten. The provenance (data fingerprint, git commit, environment, hardware, times)
    is completed with the end time and wall time when the stage ends.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            run_dir = Path(trainer.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            stem = "config" if stage == TrainerFn.FITTING else f"config.{TrainerFn(stage).value}"
            name = free_name(run_dir, stem, ".yaml")
            self.parser.save(self.config, name, skip_none=False, overwrite=False, multifile=False)
            self._provenance_file = name.with_name(name.name.replace("config", "provenance", 1))
            self.provenance = self._gather_provenance(trainer, run_dir, stage)
            self._write_provenance()
            # A resumed fit continues a run whose trackers hold its config already: logging it again would add a
            # second copy to each (TensorBoard's hparams at step 0, for one). Its own files are written above.
            if not (stage == TrainerFn.FITTING and self.config.get("ckpt_path")):
                self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)

    def _gather_provenance(self, trainer: pl.Trainer, run_dir: Path, stage: str) -> dict[str, Any]:
        code, diff = code_version(Path(__file__).resolve().parents[1])
        if diff:
            diff_file = self._provenance_file.with_suffix(".diff")
            diff_file.write_text(diff)
            code["diff_file"] = diff_file.name
        datamodule = trainer.datamodule
        run = self.config.get("run") or {}
        self._started = time.time()
        return {
            "run_dir": str(run_dir),
            "stage": TrainerFn(stage).value,
            "ckpt_path": self.config.get("ckpt_path"),
            "tags": list(run.get("tags") or []),
            "note": run.get("note"),
            "data": {
                "fingerprint": getattr(datamodule, "fingerprint", None),
                "files": _described(datamodule),
                "data_dir": str(getattr(datamodule, "data_dir", "")),
                "source": getattr(datamodule, "source", None),
            },
            "code": code,
            **environment(),
            "started": _iso(self._started),
        }

    def _write_provenance(self) -> None:
        tmp = self._provenance_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.provenance, sort_keys=False))
        tmp.replace(self._provenance_file)

    @functools.cached_property
    def config_yaml(self) -> str:
        """The run's whole config as YAML, dumped once: it is fixed for the run, and every checkpoint keeps it."""
        return self.parser.dump(self.config, skip_none=False)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Log the full config (trainer, model, data, checkpoint) and the provenance to every tracker."""
        # Round-trip through the YAML dump: plain values only (no Path objects), exactly what config.yaml holds.
        config = yaml.safe_load(self.config_yaml)
        for logger in trainer.loggers:
            logger.log_hyperparams({**config, "provenance": self.provenance})
            if isinstance(logger, Tracker) and (self.provenance["tags"] or self.provenance["note"]):
                logger.tag_run(self.provenance["tags"], self.provenance["note"])

    def _finish(self, trainer: pl.Trainer, status: str) -> None:
        """Complete the provenance with the end: time, wall time and how the stage ended; tell the trackers."""
        if not trainer.is_global_zero or getattr(self, "provenance", None) is None or "ended" in self.provenance:
            return
        ended = time.time()
        end = {"ended": _iso(ended), "wall_time_s": round(ended - self._started, 3), "status": status}
        # The stage's last value of every metric, whatever the trackers: the runs table reads them from here.
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self.provenance.update(end, metrics=dict(sorted(metrics.items())))
        self._write_provenance()
        for tracker in tracker_keys(trainer.loggers).values():
            tracker.log_run_end(end)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._finish(trainer, "finished")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish(trainer, f"stopped: {type(exception).__name__}")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the model graph where a tracker is set to (TensorBoard's ``log_graph``), as autologging would have.

        Here, not in ``setup``: the model must be on its device first.
        """
        if trainer.is_global_zero and not trainer.ckpt_path:
            for logger in trainer.loggers:
                logger.log_graph(pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Keep the run's whole config in each checkpoint (as YAML text), so that ``fit --ckpt_path`` can resume it."""
        checkpoint.setdefault(STATE_KEY, {})["config"] = self.config_yaml


class DeviceStatsMonitor(LightningDeviceStatsMonitor):
    """Lightning's ``DeviceStatsMonitor`` (CPU and memory use; GPU when present), logged like any metric as
    ``train/system/<stat>``, once per logging step.

    Lightning's logs every stat twice a step (at the batch's start and end) under two groups of its own, which
    TensorBoard lists before the model's metrics; named so, they come after the model's train metrics. Idle in a run
    without a logger (``trainer.logger: false``) instead of refusing to start, so that one switch turns tracking off.
    """

    def __init__(self, cpu_stats: Optional[bool] = None) -> None:
        """
        Args:
            cpu_stats: Log CPU and memory use (psutil) too when training on an accelerator; false turns the stats
                off when training on the CPU; null: Lightning's default (on for the CPU, off beside an accelerator).
        """
        super().__init__(cpu_stats=cpu_stats)
        self.cpu_stats = cpu_stats
        self._logged_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.loggers:
            super().setup(trainer, pl_module, stage)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        """Nothing: the stats are read once per logging step, at its end."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        # The optimizer has stepped: this batch's metrics are logged at the step before (as Lightning logs them).
        step = trainer.global_step - 1
        every = trainer.log_every_n_steps
        if not trainer.loggers or not every or step == self._logged_step or (step + 1) % every != 0:
            return
        device = trainer.strategy.root_device
        if device.type == "cpu" and self.cpu_stats is False:
            return
        stats = trainer.accelerator.get_device_stats(device)
        if self.cpu_stats and device.type != "cpu":
            stats.update(get_cpu_stats())
        self._logged_step = step
        for logger in trainer.loggers:
            logger.log_metrics({f"train/system/{name}": value for name, value in stats.items()}, step=step)


# Top-level key of this project's own entries in a checkpoint; every value under it is plain (weights_only-safe).
STATE_KEY = "mnist_dlops"


class ResumeState(Callback):
    """Saves what Lightning leaves out of a checkpoint and a resumed run needs to continue exactly as if uninterrupted.

    - the random number generators (torch, CUDA, Python), for anything stochastic in the model;
    - each tracker's state (loggers with ``state_dict``/``load_state_dict``, such as ours for CSV and TensorBoard),
      with the checkpoint's step: resuming drops what a killed run logged after it, so no step shows twice.
    """

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.setdefault(STATE_KEY, {})
        state["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # Python's state is (version, tuple of ints, gauss): stored as lists, plain values only.
            "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        }
        if trainer.is_global_zero:
            state["trackers"] = {
                key: {**tracker.state_dict(), "global_step": trainer.global_step}
                for key, tracker in tracker_keys(trainer.loggers).items()
            }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get(STATE_KEY, {})
        if trainer.state.fn != "fit":
            # An evaluation is logged at the checkpoint's step and epoch, after the run's curves: logged at step 0,
            # TensorBoard would take it for a restart and drop every later point. Nothing else of the fit loop runs.
            if "loops" in checkpoint:
                trainer.fit_loop.load_state_dict(checkpoint["loops"]["fit_loop"])
            return  # and it neither draws random numbers nor rewrites the run's history
        if "rng" in state:
            rng = state["rng"]
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            version, internal, gauss = rng["python"]
            random.setstate((version, tuple(internal), gauss))
        if trainer.is_global_zero:
            saved: dict[str, Any] = state.get("trackers", {})
            for key, tracker in tracker_keys(trainer.loggers).items():
                if key in saved:
                    tracker.load_state_dict(saved[key])
