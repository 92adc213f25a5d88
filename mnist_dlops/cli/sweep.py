"""Hyperparameter sweeps on Optuna: search config values, prune hopeless trials, keep every trial as an ordinary run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional
from unittest.mock import patch  # patch.dict: set environment variables for a block, restored after

import yaml
from jsonargparse import Namespace
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from mnist_dlops.cli import argv as command_line
from mnist_dlops.errors import ConfigError, UserError, invoked, one_line, user_errors
from mnist_dlops.files import write_atomic
from mnist_dlops.rundir.run import short, study_storage
from mnist_dlops.trust import check_classes, check_url, engine_url, redact, resolve
from mnist_dlops.writeguard import allow_writes


@dataclass
class Distribution:
    """How one config key is searched.

    Args:
        type: ``float``, ``int`` or ``categorical``.
        low: Smallest value (``float``, ``int``).
        high: Largest value (``float``, ``int``), included.
        log: Sample on a log scale (``float``, ``int``).
        step: Spacing of the values (``int``; ``float`` without ``log``).
        choices: The values to choose from (``categorical``): any YAML value, class paths included.
    """

    type: Literal["float", "int", "categorical"]
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[list[Any]] = None

    def __post_init__(self) -> None:
        # The parser hands a choice such as {class_path, init_args} over as a Namespace: kept as the plain value
        # the YAML holds, so that it reaches a trial's flags, the study and best.yaml as written.
        self.choices = None if self.choices is None else [_plain(choice) for choice in self.choices]

    def check(self, key: str) -> None:
        """Optuna's own checks of the range (reversed, a log scale from 0, step with log...), as one line naming the
        key; low and high are asked for here, where Optuna would fail on None with a TypeError."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.type != "categorical" and (self.low is None or self.high is None):
            raise ConfigError(f"space.{key}: a {self.type} distribution needs low and high")
        try:
            if self.type == "categorical":  # chosen by index when not plain values (see suggest)
                CategoricalDistribution(list(range(len(self.choices or []))) if _needs_index(self) else self.choices)
            elif self.type == "int":
                IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
            else:
                FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"space.{key}: {one_line(str(err))}") from None

    def suggest(self, trial: Any, key: str) -> Any:
        if self.type == "categorical":
            # Optuna stores plain values only: lists and dicts (a channels pair, a class) are chosen by their index.
            index = trial.suggest_categorical(key, list(range(len(self.choices)))) if _needs_index(self) else None
            return self.choices[index] if index is not None else trial.suggest_categorical(key, self.choices)
        if self.type == "int":
            return trial.suggest_int(key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(key, self.low, self.high, step=self.step, log=self.log)

    def corners(self) -> list[Any]:
        """Values that span the distribution, to check before any trial that the config accepts them."""
        if self.type == "categorical":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.type == "int" else [self.low, self.high]


def _needs_index(dist: Distribution) -> bool:
    return any(not isinstance(c, (str, int, float, bool, type(None))) for c in dist.choices or [])


class OptunaPruning(Callback):
    """Reports the objective to the Optuna trial after each validation and stops the run cleanly when it is pruned.

    optuna-integration's ``PyTorchLightningPruningCallback`` imports the ``lightning.pytorch`` namespace; this
    project uses the ``pytorch_lightning`` package, and Lightning refuses a callback of the other namespace (optuna
    issue 4689), hence this small one on the public ``trial.report`` / ``trial.should_prune``.
    """

    def __init__(self, trial: Any, objective: str) -> None:
        self.trial, self.objective, self.pruned = trial, objective, False

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.objective)
        if value is None:
            logged = ", ".join(sorted(trainer.callback_metrics))
            raise ObjectiveMissing(f"objective={self.objective}: never logged; the runs log: {logged}")
        self.trial.report(float(value), step=trainer.global_step)
        if self.trial.should_prune():
            self.pruned = trainer.should_stop = True  # stops at the end of this epoch, checkpoints kept


class ObjectiveMissing(ConfigError):
    """The objective names a metric the runs do not log: the whole sweep stops, as for any bad config value."""


class TrialFailed(Exception):
    """A trial ended with a user error (a diverged training, say): recorded as failed, and the sweep goes on."""


def _plain(value: Any) -> Any:
    """A parsed value as plain YAML data: jsonargparse Namespaces as dicts, recursively."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _flag(key: str, value: Any) -> str:
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def _storage(url: str) -> Any:
    """An Optuna storage with a heartbeat, so that a killed trial is marked failed and the study goes on."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    check_url("storage", url)  # before SQLAlchemy imports the URL's driver by name
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat is "experimental"
            return optuna.storages.RDBStorage(engine_url(url), heartbeat_interval=5, grace_period=20)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy and drivers raise many kinds for a URL that cannot open
        raise ConfigError(f"storage={redact(url)}: cannot be opened ({redact(one_line(str(err), limit=160))})") from None


@dataclass
class SweepOptions:
    """A sweep, as a sweep config file or the command line gives it (jsonargparse parses these fields).

    Args:
        study_name: The study's name: its folder is ``<runs_dir>/sweeps/<study_name>`` and its runs are tagged with it.
        space: Config key (``model.optimizer.init_args.lr``) -> its distribution.
        base: Experiment configs the trials stack on, in order (``configs/binary.yaml``...).
        fixed: Config key -> value for every trial (``trainer.max_epochs: 1``).
        objective: The logged metric to optimize; reported to the pruner after each validation.
        direction: ``minimize`` (a loss) or ``maximize`` (an accuracy).
        n_trials: Finished trials the study should hold (complete, pruned or failed); null: until ``timeout``.
        timeout: Stop starting trials after this many seconds (this command's, not the study's).
        sampler: An Optuna sampler as ``{class_path: optuna.samplers.TPESampler, init_args: {seed: 0}}``; default TPE.
        pruner: An Optuna pruner, the same way; default ``optuna.pruners.MedianPruner``.
        storage: Optuna storage URL; default ``sqlite:///<runs_dir>/sweeps/<study_name>/study.db``. A PostgreSQL URL
            (``postgresql://user@host/db``) or ``journal:/shared/path/study.log`` lets several machines share it.
        workers: Trial processes to run at once on this machine (each gets its share of the CPU threads).
        runs_dir: Folder of the runs (as ``cli.py --runs_dir``).
        write_results: Write ``best.yaml``, ``trials.csv`` and the plots at the end (workers leave it to their parent).
    """

    study_name: str
    space: dict[str, Distribution]
    base: list[str] = field(default_factory=list)
    fixed: dict[str, Any] = field(default_factory=dict)
    objective: str = "val/loss"
    direction: Literal["minimize", "maximize"] = "minimize"
    n_trials: Optional[int] = 10
    timeout: Optional[float] = None
    sampler: Optional[dict[str, Any]] = None
    pruner: Optional[dict[str, Any]] = None
    storage: Optional[str] = None
    workers: int = 1
    runs_dir: str = "lightning_logs"
    write_results: bool = True

    # Checked here, not by jsonargparse.typing: sweep() is called from Python too, where no parser runs.
    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers}: must be >= 1")
        # The study's folder is <runs_dir>/sweeps/<study_name>: one plain path component, never a way out of it.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.study_name) or ".." in self.study_name:
            raise ConfigError(f"study_name={self.study_name!r}: use letters, digits, '_', '-' and '.' (it names a folder)")
        if self.n_trials is not None and self.n_trials < 1:
            raise ConfigError(f"n_trials={self.n_trials}: must be >= 1 (or null, to run until timeout)")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"timeout={self.timeout}: must be > 0 seconds (or null)")
        if self.n_trials is None and self.timeout is None:
            raise ConfigError("n_trials=null and timeout=null: the sweep would never stop; give one of them")
        self.space = {k: v if isinstance(v, Distribution) else Distribution(**v) for k, v in self.space.items()}
        self.base, self.fixed = self.base or [], self.fixed or {}
        self.storage = self.storage or study_storage(self.runs_dir, self.study_name)


class Sweep:
    """One study: its trials' arguments, its objective, and its results."""

    def __init__(self, options: SweepOptions, trial_args: list[str]) -> None:
        self.options = options
        self.study_name, self.objective, self.space = options.study_name, options.objective, options.space
        self.n_trials, self.timeout, self.runs_dir = options.n_trials, options.timeout, options.runs_dir
        self.folder = Path(options.runs_dir) / "sweeps" / options.study_name
        allow_writes(self.folder, "the study's folder")  # its default storage, results and plots; runs are the CLI's
        self.storage_url = options.storage
        flags = [_flag(key, value) for key, value in options.fixed.items()]
        quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # a line per trial
        self.args = [a for path in options.base for a in ("-c", path)] + [*quiet, *flags, *trial_args,
                                                                          "--runs_dir", options.runs_dir]
        clash = [key for key in self.space
                 if key in options.fixed or any(o.name == key for o in command_line.options(trial_args))]
        if clash:
            raise ConfigError(f"space.{clash[0]}: also given a fixed value; search it or fix it, not both")
        self.direction = options.direction
        self.sampler = _optuna_object(options.sampler, "sampler", "optuna.samplers.TPESampler")
        self.pruner = _optuna_object(options.pruner, "pruner", "optuna.pruners.MedianPruner")

    def trial_args(self, params: dict[str, Any], number: int) -> list[str]:
        tags = [_flag("run.tags+", self.study_name), _flag("run.tags+", f"trial-{number}")]
        return ["fit", *self.args, *[_flag(k, v) for k, v in params.items()], *tags]

    def check_space(self) -> None:
        """Before any trial: every distribution is sound, and the config takes each key at its extremes."""
        from mnist_dlops.cli.app import run
        from mnist_dlops.module import MNISTModule

        if not self.space:
            raise ConfigError("space: empty; name at least one config key to search")
        known = set(MNISTModule().logged_metrics()) | set(MNISTModule(class_names=["0", "1"]).logged_metrics())
        if self.objective.split("/")[0] in ("train", "val", "test") and self.objective not in known:
            raise ObjectiveMissing(f"objective={self.objective}: not a metric the runs log ({', '.join(sorted(known))})")
        for key, dist in self.space.items():
            dist.check(key)
        for key, dist in self.space.items():
            for value in dist.corners():
                params = {k: (value if k == key else d.corners()[0]) for k, d in self.space.items()}
                try:
                    run(self.trial_args(params, 0)[1:], check=True)  # the trial's fit command line, less "fit"
                except UserError as error:
                    raise ConfigError(f"space.{key}={value!r}: {error}") from None

    def objective_fn(self, trial: Any) -> float:
        import optuna

        from mnist_dlops.cli.app import run

        params = {key: dist.suggest(trial, key) for key, dist in self.space.items()}
        pruning = OptunaPruning(trial, self.objective)
        started = time.time()
        # W&B groups the study's trials (unless the user named a group).
        group = {"WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP") or self.study_name}
        try:
            with patch.dict(os.environ, group):
                cli = run(self.trial_args(params, trial.number), callbacks=[pruning])
        except ObjectiveMissing:
            raise
        except (UserError, MisconfigurationException) as err:
            reason = one_line(str(err), limit=300)
            trial.set_user_attr("fail_reason", reason)
            self._report(trial.number, "failed", None, params, started, reason)
            raise TrialFailed(reason) from None
        trial.set_user_attr("run_dir", str(cli.run_dir))
        # A prune asked at the last validation stopped nothing: the trial ran to its end, so it is complete.
        stopped_early = pruning.pruned and cli.trainer.global_step < cli.trainer.estimated_stepping_batches
        state = "pruned" if stopped_early else "complete"
        value = float(cli.trainer.callback_metrics[self.objective])
        _record(cli.run_dir, {"study": self.study_name, "trial": trial.number, "state": state,
                              "storage": self.storage_url, "objective": self.objective, "value": value})
        self._report(trial.number, state, value, params, started, str(cli.run_dir))
        if stopped_early:
            raise optuna.TrialPruned()
        return value

    def _report(self, number: int, state: str, value: Optional[float], params: dict[str, Any], started: float,
                where: str) -> None:
        shown = ", ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in params.items())
        score = f" {self.objective}={value:.4f}" if value is not None else ""
        print(f"trial {number}: {state}{score} [{shown}] {time.time() - started:.1f}s  {where}", flush=True)

    def done(self, study: Any) -> int:
        """Trials finished: complete, pruned, or failed by the run itself (not those a kill interrupted)."""
        from optuna.trial import TrialState

        return sum(
            t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and "fail_reason" in t.user_attrs)
            for t in study.get_trials(deepcopy=False)
        )

    def open(self) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial, failures included, is ours
        return optuna.create_study(storage=_storage(self.storage_url), study_name=self.study_name,
                                   direction=self.direction, sampler=self.sampler, pruner=self.pruner,
                                   load_if_exists=True)

    def optimize(self) -> Any:
        study = self.open()

        # Not Optuna's MaxTrialsCallback: it counts by state, and a trial a kill interrupted (failed by the heartbeat)
        # must not count as done, unlike one that failed by itself.
        def stop_when_done(study: Any, trial: Any) -> None:
            if self.n_trials is not None and self.done(study) >= self.n_trials:
                study.stop()

        if self.n_trials is None or self.done(study) < self.n_trials:
            study.optimize(self.objective_fn, timeout=self.timeout, catch=(TrialFailed,), callbacks=[stop_when_done])
        return study


def _record(run_dir: Path, sweep: dict[str, Any]) -> None:
    """Mark the run as a trial of the study in its provenance (the runs table reads it from there)."""
    allow_writes(run_dir, "the trial's run")  # its own run, which the trial's fit has just finished
    path = Path(run_dir) / "provenance.yaml"
    record = yaml.safe_load(path.read_text()) if path.is_file() else {}
    record["sweep"] = sweep
    write_atomic(path, yaml.safe_dump(record, sort_keys=False))


def _write_results(sweep: Sweep, study: Any, started: float) -> None:
    """``best.yaml``, ``trials.csv`` and Optuna's plots in the study's folder, and a one-screen summary."""
    from optuna.trial import TrialState

    folder = sweep.folder
    folder.mkdir(parents=True, exist_ok=True)
    trials = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    trials.to_csv(folder / "trials.csv", index=False)
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    lines = [f"study {sweep.study_name} ({sweep.storage_url}): " + ", ".join(f"{n} {s}" for s, n in counts.items()),
             f"wall time {time.time() - started:.0f} s"]
    if counts["complete"]:
        best = study.best_trial
        run_dir = Path(best.user_attrs["run_dir"])
        # The trial's config, less the tags that made its run a trial of the study: a rerun is not trial N again.
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        run = config.setdefault("run", {})
        run["tags"] = [t for t in run.get("tags") or [] if t not in (sweep.study_name, f"trial-{best.number}")]
        run["note"] = run.get("note") or f"rerun of sweep {sweep.study_name}, trial {best.number}"
        write_atomic(folder / "best.yaml", yaml.safe_dump(config, sort_keys=False))
        lines += [f"best: trial {best.number}, {sweep.objective}={best.value:.4f}  ({run_dir})",
                  "  " + ", ".join(f"{k}={short(v)}" for k, v in best.params.items()),
                  f"rerun it: {invoked('fit')} -c {folder / 'best.yaml'}"]
        lines.append(f"plots: {', '.join(_plots(study, folder))}")
    lines.append(f"trials: {folder / 'trials.csv'};  runs: {invoked('runs')} --where sweep={sweep.study_name}")
    print("\n".join(lines))


def _plots(study: Any, folder: Path) -> list[str]:
    """Optuna's matplotlib views of the study; one that cannot be drawn yet (too few trials) is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as views

    written = []
    for name in ("optimization_history", "param_importances", "parallel_coordinate", "slice"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)  # Optuna marks its matplotlib views so
                axes = getattr(views, f"plot_{name}")(study)
        except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances need two complete trials
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        figure.savefig(folder / f"{name}.png", dpi=90, bbox_inches="tight")
        plt.close(figure)
        written.append(f"{name}.png")
    return written


def sweep(*args: Any, trial_args: Optional[list[str]] = None, **kwargs: Any) -> Any:
    """Run the sweep ``SweepOptions(*args, **kwargs)`` describes, each trial a ``cli.py fit`` run with
    ``trial_args`` as further flags (on the command line: any flag that is not a sweep option). Returns the study."""
    options = SweepOptions(*args, **kwargs)
    the_sweep = Sweep(options, trial_args or [])
    the_sweep.check_space()
    the_sweep.open()  # a storage that cannot be opened fails here, before any trial
    started = time.time()
    if options.workers == 1:
        study = the_sweep.optimize()
    else:
        study = _run_workers(the_sweep, trial_args or [])
    if options.write_results:
        _write_results(the_sweep, study, started)
    return study


def _optuna_object(value: Optional[dict[str, Any]], kind: str, default: str) -> Any:
    """An Optuna sampler or pruner from ``{class_path, init_args}``, checked as every class a config names is."""
    import optuna

    value = value or {"class_path": default}
    base = optuna.samplers.BaseSampler if kind == "sampler" else optuna.pruners.BasePruner
    check_classes({kind: value}, kinds={kind: (base,), "nested": ()})
    path = str(value["class_path"])
    try:
        return resolve(kind, path)(**(value.get("init_args") or {}))
    except (TypeError, ValueError) as err:  # an argument the class does not take, or a value it refuses
        raise ConfigError(f"{kind}.init_args: {path} refuses them ({one_line(str(err), limit=160)})") from None


def parse(args: list[str]) -> dict[str, Any]:
    """``sweep``'s arguments from a command line: its own options, and every other flag as ``trial_args``."""
    from jsonargparse import ActionConfigFile

    from mnist_dlops.cli.parser import OneLineParser

    # The sweep's own options are SweepOptions' fields; every other flag is a fixed override for the trials.
    own, rest = command_line.split(args, {f.name for f in fields(SweepOptions)} | {"config", "print_config", "help"})
    parser = OneLineParser(prog=invoked("sweep"), description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="A sweep config (configs/sweeps/*.yaml).")
    parser.add_class_arguments(SweepOptions, as_positional=False, instantiate=False)
    options = parser.instantiate_classes(parser.parse_args(own)).as_dict()
    options.pop("config", None)
    return {**options, "trial_args": rest}


def main(argv: Optional[list[str]] = None) -> None:
    """``mnist-dlops sweep``: one-line errors; exit 2 for a bad sweep, before any trial starts."""
    import logging

    from pytorch_lightning.utilities.exceptions import SIGTERMException

    argv = list(sys.argv[1:] if argv is None else argv)
    # Lightning's start-up lines for every trial (devices, seed) would bury the sweep's one line per trial.
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with user_errors():
            sweep(**parse(argv))
    except (SIGTERMException, KeyboardInterrupt) as err:
        print("stopped; run the same command again to continue the study", file=sys.stderr)
        sys.exit(143 if isinstance(err, SIGTERMException) else 130)


def _run_workers(the_sweep: Sweep, trial_args: list[str]) -> Any:
    """The sweep's workers, each a process on the same study with its share of the CPU threads; the study once
    they are done."""
    options = the_sweep.options
    the_sweep.folder.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // options.workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    processes = []
    for worker in range(options.workers):
        # A seeded sampler gets a seed per worker: the same seed everywhere would draw the same trials.
        sampler = json.loads(json.dumps(options.sampler or {}))
        if "seed" in (sampler.get("init_args") or {}):
            sampler["init_args"]["seed"] += worker
        config = {**asdict(options), "sampler": sampler or None, "workers": 1, "write_results": False}
        worker_file = the_sweep.folder / f"worker-{worker}.yaml"
        worker_file.write_text(yaml.safe_dump(config, sort_keys=False))
        command = [sys.executable, "-m", "mnist_dlops", "sweep", "-c", str(worker_file), *trial_args]
        processes.append(subprocess.Popen(command, env=env))
    codes = [p.wait() for p in processes]
    if any(codes):
        raise UserError(f"a worker failed (exit codes {codes}); the study keeps what finished: rerun to continue")
    return the_sweep.open()
