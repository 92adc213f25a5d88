"""The run's record: which data, which code and which machine produced it, written beside its config."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import yaml
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.trainer.states import TrainerFn

from mnist_dlops.files import free_name, write_atomic
from mnist_dlops.rundir.checkpoints import STATE_KEY
from mnist_dlops.trackers.base import Tracker, tracker_keys


def _git(args: list[str], cwd: Path) -> Optional[str]:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version(code_dir: Path) -> tuple[dict[str, Any], Optional[str]]:
    """``({commit, dirty, repo} or {commit: "no git"}, diff or None)`` of the git work tree holding ``code_dir``."""
    top = _git(["rev-parse", "--show-toplevel"], code_dir)
    if top is None:
        return {"commit": "no git", "dirty": None, "repo": None}, None
    repo = Path(top.strip())
    commit = (_git(["rev-parse", "HEAD"], repo) or "no commit").strip()
    status = _git(["status", "--porcelain", "--untracked-files=no"], repo) or ""
    dirty = bool(status.strip())
    diff = _git(["diff", "HEAD"], repo) if dirty else None
    return {"commit": commit, "dirty": dirty, "repo": str(repo)}, diff


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_supported() -> bool:
    """Whether this machine computes bfloat16 natively: a CUDA GPU that does, or, without one, a CPU with
    AVX512-BF16 (AMX includes it); elsewhere bf16 is emulated, slower than fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    # private: torch has no public query for the CPU's bf16 instructions; this is the one its own CPU backends use.
    # A torch without it answers False (fp32), never an error.
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def default_precision() -> str:
    """The default ``trainer.precision``: bf16 autocast with fp32 weights where bf16 is native, else fp32."""
    return "bf16-mixed" if bf16_supported() else "32-true"


def environment() -> dict[str, Any]:
    """Command line, versions and hardware of this process."""
    import lightning_fabric
    import pytorch_lightning
    import torch
    import torchmetrics

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cwd": os.getcwd(),
        "host": platform.node(),
        "versions": {
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "pytorch_lightning": str(pytorch_lightning.__version__),
            "lightning_fabric": str(lightning_fabric.__version__),
            "torchmetrics": str(torchmetrics.__version__),
        },
        "hardware": {
            "cpu": cpu_model(),
            "cpu_cores": os.cpu_count(),
            "gpus": gpus,
            "bf16": bf16_supported(),  # why the default trainer.precision is bf16-mixed here, or 32-true
            "os": platform.platform(),
        },
    }


def run_data(run_dir: Path) -> dict[str, Any]:
    """The data a training run recorded in its ``provenance.yaml`` (fingerprint, DVC version...); {} if unreadable."""
    try:
        record = yaml.safe_load((run_dir / "provenance.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return ((record or {}).get("data") or {}) if isinstance(record, dict) else {}


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def _described(datamodule: Any) -> Any:
    """The data files a fingerprint covers: their names (IDX), or how many (a PNG tree)."""
    if not hasattr(datamodule, "data_files"):  # a data module of the user's own
        return None
    files = [p.relative_to(datamodule.read_dir).as_posix() for p in datamodule.data_files()]
    return files if len(files) <= 10 else f"{len(files)} files"


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
        code, diff = code_version(Path(__file__).resolve().parents[2])  # the checkout: mnist_dlops/rundir/ -> ..
        if diff:
            diff_file = self._provenance_file.with_suffix(".diff")
            write_atomic(diff_file, diff)
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
                # The DVC data version read (hash, the git commit of its pointer, tags); null: not tracked by DVC.
                "version": version.as_dict() if (version := getattr(datamodule, "data_version", None)) else None,
                "files": _described(datamodule),
                "data_dir": str(getattr(datamodule, "data_dir", "")),
                "source": getattr(datamodule, "source", None),
            },
            "code": code,
            **environment(),
            "started": _iso(self._started),
        }

    def _write_provenance(self) -> None:
        write_atomic(self._provenance_file, yaml.safe_dump(self.provenance, sort_keys=False))

    @cached_property
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
        # The same metrics alone, as JSON (metrics.json, metrics.test.json...): what DVC's metrics and plots read.
        metrics_file = self._provenance_file.with_name(self._provenance_file.name.replace("provenance", "metrics", 1))
        write_atomic(metrics_file.with_suffix(".json"), json.dumps(self.provenance["metrics"], indent=1) + "\n")
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
