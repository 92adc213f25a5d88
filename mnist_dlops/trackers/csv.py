"""A CSV logger that continues a run's ``metrics.csv`` instead of deleting it, and rolls back with a resumed run."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Optional

from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from mnist_dlops.trackers.base import Tracker


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing ``metrics.csv``; this one keeps it and appends under its header.

    When a new metric adds a column, the file is rewritten through a temporary file and a rename, so a kill in the
    middle never loses the rows already written.
    """

    # private: Lightning's writer deletes an existing metrics.csv here; the only place to keep it instead.
    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])

    def _read_rows(self) -> list[dict[str, str]]:
        if not os.path.isfile(self.metrics_file_path):
            return []
        with open(self.metrics_file_path, newline="") as f:
            return list(csv.DictReader(f))

    def _write_rows(self, fieldnames: list[str], rows: list[dict[str, str]]) -> None:
        tmp = f"{self.metrics_file_path}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)

    # private: Lightning rewrites the file in place here when a column appears; through a temporary file instead.
    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        self._write_rows(fieldnames, self._read_rows())

    def row_count(self) -> int:
        """Rows on disk, after writing what is still buffered."""
        self.save()
        return len(self._read_rows())

    def keep_rows(self, n: int, before_step: int) -> None:
        """Keep the first ``n`` rows, and of the later ones those of a step before ``before_step``."""
        rows = self._read_rows()
        kept = rows[:n] + [row for row in rows[n:] if int(float(row.get("step") or 0)) < before_step]
        if len(kept) < len(rows):
            self._write_rows(self.metrics_keys, kept)


class CSVLogger(LightningCSVLogger, Tracker):
    """Lightning's CSV logger (``metrics.csv`` + ``hparams.yaml``), continuing the run's file when it exists.

    ``python cli.py test --ckpt_path`` and resumed runs add their rows to the run's ``metrics.csv``; a run resumed
    from a checkpoint first drops the rows its killed predecessor wrote after that checkpoint.
    """

    def __init__(
        self, save_dir: Optional[str] = None, name: Optional[str] = "", version: Optional[str] = "",
        flush_logs_every_n_steps: int = 1, **kwargs: Any,
    ) -> None:
        """
        Args:
            save_dir: Folder of ``metrics.csv``; null: the run's directory (``lightning_logs`` outside the CLI).
            name: Sub-folder below ``save_dir`` (none by default: the run directory is the experiment's).
            version: Sub-folder below ``name`` (none by default).
            flush_logs_every_n_steps: Append the buffered rows to the file every this many logged steps. Every one
                by default: the step's ``last.ckpt`` is written at the next batch, so rows still buffered then
                would be lost to a kill, and the resumed run never logs that step again.
        """
        super().__init__(save_dir if save_dir is not None else "lightning_logs", name=name, version=version,
                         flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:  # private: Lightning's own property builds its writer class, not ours
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def state_dict(self) -> dict[str, Any]:
        """How many rows ``metrics.csv`` holds now."""
        return {"rows": self.experiment.row_count()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Drop the rows logged after the checkpoint (``state["global_step"]``) by the run that was killed.

        The rows on disk when the checkpoint was written stay; so do rows of earlier steps written just after it
        (Lightning logs a step's metrics after it has taken the step's checkpoint).
        """
        if Path(self.experiment.metrics_file_path).is_file():
            self.experiment.keep_rows(int(state.get("rows", 0)), int(state["global_step"]))

    def log_run_end(self, end: dict[str, Any]) -> None:
        """How the stage ended, added to ``hparams.yaml`` (never as a metrics row)."""
        self.log_hyperparams({"provenance_end": end})
        self.save()
