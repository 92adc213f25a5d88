"""Which checkpoint a run means (last, best, the best of all runs, a sweep's best trial) and reading one as
untrusted data."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any, NamedTuple, Optional

import yaml

from mnist_dlops.errors import CheckpointError, ConfigError, invoked, reason
from mnist_dlops.files import write_atomic
from mnist_dlops.rundir.folders import training_runs
from mnist_dlops.trust import check_url, redact
from mnist_dlops.writeguard import allow_writes

SUMMARY = "best.json"  # in the run's checkpoints/ folder


class Best(NamedTuple):
    """A run's best checkpoint as its checkpoint callback recorded it."""

    monitor: Optional[str]
    mode: str  # "min" or "max"
    score: Optional[float]
    recorded: Optional[str]  # the name of the file the callback recorded (None: it never saved a best)
    path: Optional[Path]  # that file, if it still exists (looked up beside last.ckpt first, so a moved run finds it)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint as plain data (``weights_only=True``), with a one-line error for every kind of bad file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder holding no checkpoint (no checkpoints/last.ckpt); pass a run folder "
                              "or a .ckpt file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (an interrupted copy or save?); use another checkpoint")
    # torch.save writes a zip archive (data.pkl and the tensors): anything else is not a checkpoint at all.
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip's first entry, without the directory at its end: cut short
                raise CheckpointError(f"{path}: truncated or corrupted checkpoint (the archive ends early)")
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch saves checkpoints as zip archives)")
    import torch  # here, not at import: reading a run's summary needs no torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A well-formed archive whose pickle names a class or function: weights_only refuses to import it.
        raise CheckpointError(
            f"{path}: holds Python objects that would run code when loaded; refusing to load it "
            "(checkpoints of this project hold tensors and plain values only)"
        ) from None
    except Exception as err:  # noqa: BLE001 - garbage bytes make the unpickler fail in any way (IndexError, KeyError...)
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint ({reason(err, 200)})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict in it)")
    return checkpoint


def write_summary(folder: Path, monitor: Optional[str], mode: str, best: str, score: Any) -> None:
    """Record the run's best checkpoint in ``folder`` (its checkpoints/), for ``read_best``."""
    summary = {"monitor": monitor, "mode": mode, "best": Path(best).name if best else None,
               "score": None if score is None else float(score)}
    write_atomic(folder / SUMMARY, json.dumps(summary, indent=1) + "\n")


def _from_last_checkpoint(run: Path) -> Optional[Best]:
    """A run without a summary (written before it existed): what its last.ckpt's checkpoint callback recorded."""
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    states = [s for s in load_checkpoint(last).get("callbacks", {}).values() if isinstance(s, dict)]
    state = next((s for s in states if s.get("best_model_path")), {})
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    mode = ((config or {}).get("checkpoint") or {}).get("mode", "min")
    score = state.get("best_model_score")
    best = state.get("best_model_path")
    name = Path(best).name if best else None
    return Best(state.get("monitor"), mode, None if score is None else float(score), name, _existing(run, best))


def _existing(run: Path, recorded: Optional[str]) -> Optional[Path]:
    if not recorded:
        return None
    return next((c for c in (run / "checkpoints" / Path(recorded).name, Path(recorded)) if c.is_file()), None)


def read_best(run: Path) -> Optional[Best]:
    """The run's best checkpoint, from its summary (or, for an older run, its last.ckpt); None without either."""
    try:
        summary = json.loads((run / "checkpoints" / SUMMARY).read_text())
        return Best(summary["monitor"], summary["mode"], summary["score"], summary["best"],
                    _existing(run, summary["best"]))
    except (OSError, ValueError, KeyError, TypeError):  # none (an older run) or a damaged one: the checkpoint knows
        return _from_last_checkpoint(run)


def latest_run(runs_dir: Path) -> Path:
    """The newest training run (highest ``version_N`` with a ``config.yaml``) under ``runs_dir``."""
    runs = training_runs(runs_dir)
    if not runs:
        raise CheckpointError(f"{runs_dir}: no training run to take a checkpoint from (run `{invoked('fit')}` first)")
    return runs[-1]


def run_checkpoint(run: Path, best: bool = False) -> Path:
    """A run folder's ``last.ckpt``, or the best checkpoint it records."""
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise CheckpointError(f"{run}: nothing to resume or evaluate, it has no checkpoints/last.ckpt yet")
    if not best:
        return last
    found = read_best(run)
    if found is None or not found.recorded:
        raise CheckpointError(f"{last}: records no best checkpoint (was it validated?); pass a .ckpt file instead")
    if found.path is None:
        raise CheckpointError(f"{last}: its best checkpoint {found.recorded} no longer exists")
    return found.path


def best_checkpoint(runs_dir: Path) -> tuple[Path, str]:
    """The best checkpoint of every training run under ``runs_dir``, by the metric their checkpoints monitor, and
    how it was chosen (``val/loss 0.0301, the best of 3 runs``).

    Runs that monitor different metrics, or the same one in opposite directions, cannot be ranked together: that
    is one line asking for a run folder or a file."""
    ranked = []
    for run in training_runs(runs_dir) or [latest_run(runs_dir)]:  # none: latest_run says so
        best = read_best(run)
        if best is not None and best.score is not None and best.path is not None:
            ranked.append(((best.monitor, best.mode), best.score, best.path))
    if not ranked:
        raise CheckpointError(f"{runs_dir}: no training run with a best checkpoint (run `{invoked('fit')}` first)")
    kinds = {kind for kind, _, _ in ranked}
    if len(kinds) > 1:
        metrics = ", ".join(sorted(f"{m} ({mode})" for m, mode in kinds))
        raise CheckpointError(f"best: the runs under {runs_dir} monitor different metrics ({metrics}); pass a run "
                              "folder or a .ckpt file")
    (monitor, mode), = kinds
    score, path = (min if mode == "min" else max)((s, p) for _, s, p in ranked)
    return path, f"{monitor} {score:.4f}, the best of {len(ranked)} run{'s' if len(ranked) > 1 else ''}"


def resolve_ckpt(value: str, runs_dir: Path) -> Path:
    """Turn ``best`` (the best checkpoint of all runs), ``last`` (the newest run's last.ckpt), a run folder or a
    file path into the checkpoint file it means."""
    if value == "best":
        return best_checkpoint(runs_dir)[0]
    if value == "last":
        run = latest_run(runs_dir)
    elif Path(value).is_dir() and (Path(value) / "checkpoints").is_dir():
        run = Path(value)
    else:
        return Path(value)
    return run_checkpoint(run)


def study_storage(runs_dir: str, study_name: str) -> str:
    """A study's default storage: its own SQLite file in its folder (the registry finds a sweep's best trial there)."""
    return f"sqlite:///{Path(runs_dir) / 'sweeps' / study_name / 'study.db'}"


def sweep_best(study: str, runs_dir: str, storage: Optional[str] = None) -> Path:
    """The run folder of a sweep's best trial, from its Optuna study."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    storage = check_url("sweep_storage", storage or study_storage(runs_dir, study))
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"sweep={study}: no study at {storage} (run the sweep first, or pass --sweep_storage)")
    if storage.startswith("sqlite:///"):  # Optuna opens a study's database to read it, and may update its schema
        allow_writes(storage.removeprefix("sqlite:///"), "the study's storage")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        best = optuna.load_study(study_name=study, storage=storage).best_trial
    except (KeyError, ValueError) as err:  # no such study in the storage / no complete trial yet
        raise ConfigError(f"sweep={study}: {err}") from None
    except SQLAlchemyError as err:  # not a study database (a corrupt or foreign file)
        raise ConfigError(f"sweep_storage={redact(storage)}: cannot be read as an Optuna study ({type(err).__name__})") from None
    if "run_dir" not in best.user_attrs:
        raise ConfigError(f"sweep={study}: its best trial records no run folder (not a study of this project's sweep)")
    return Path(best.user_attrs["run_dir"])


def short(value: Any) -> Optional[str]:
    """A value as the runs table and the sweep's report show it: a class path by its name, a float to 3 digits."""
    if value is None or value == "":
        return None
    if isinstance(value, float):
        return f"{value:.3g}"
    return value.rsplit(".", 1)[-1] if isinstance(value, str) and "." in value else str(value)
