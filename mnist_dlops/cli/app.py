"""MNISTCLI: LightningCLI with the project's defaults, one directory per run, and one-line errors."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional
from unittest.mock import patch  # patch.dict: set environment variables for a block, restored after

from jsonargparse import Namespace
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.callbacks import ProgressBar as LightningProgressBar
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import Logger
from pytorch_lightning.plugins import CheckpointIO
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from mnist_dlops.callbacks import PredictionCSV, ProgressBar
from mnist_dlops.cli.parser import OneLineParser, check_config_files, check_values
from mnist_dlops.cli.restore import restore_from_checkpoint
from mnist_dlops.data import MNISTDataModule
from mnist_dlops.errors import USER_ERRNOS, ConfigError, invoked, one_line, user_errors
from mnist_dlops.importguard import guarded_imports
from mnist_dlops.module import MNISTModule
from mnist_dlops.quiet import quiet, show
from mnist_dlops.rundir.checkpoints import AtomicCheckpointIO, ResumeState, RunCheckpoint
from mnist_dlops.rundir.folders import claim_run_dir, run_dir_of
from mnist_dlops.rundir.record import RunConfigSaver, default_precision
from mnist_dlops.rundir.run import load_checkpoint
from mnist_dlops.trackers.mlflow_store import allow_store_writes, runs_store
from mnist_dlops.trust import check_classes
from mnist_dlops.writeguard import GATE as WRITES
from mnist_dlops.writeguard import allow_writes, guarded_writes

# lr is the peak of the default one-cycle schedule. Adam's fused kernel: one pass over each parameter instead of a
# dozen element-wise ops (CPU and GPU).
DEFAULT_OPTIMIZER = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01, "fused": True}}

# Lightning's DDP launcher re-runs this script once per extra process; they inherit the run directory through it.
RUN_DIR_ENV = "MNIST_DLOPS_RUN_DIR"


class _NoAdverts(logging.Filter):
    """Drops Lightning's "Tip: try installing litlogger" line: an advert printed on every run, not the user's news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoAdverts())  # once: at import


class MNISTCLI(LightningCLI):
    """``fit``/``validate``/``test``/``predict`` over MNISTModule and MNISTDataModule, configured from YAML."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The --ckpt_path checkpoint already loaded and checked while parsing the command line, if any, and its contents.
        self.checked_ckpt: Optional[Path] = None
        self.checkpoint: Optional[dict[str, Any]] = None
        # The run directory this call created, if any; else the files of the existing run it works in.
        self.claimed: Optional[Path] = None
        self.run_dir: Optional[Path] = None
        self._files_before: set[Path] = set()
        try:
            super().__init__(*args, **kwargs)
        except BaseException as err:
            self._remove_debris()
            if isinstance(err, SIGTERMException) and self.run_dir is not None:
                last = self.run_dir / "checkpoints" / "last.ckpt"
                if last.is_file():
                    print(f"stopped by SIGTERM; resume with: {invoked('fit')} --ckpt_path {last}", file=sys.stderr)
                else:  # in the sanity check or the first validation: the new run had nothing worth keeping
                    print("stopped by SIGTERM before the run's first checkpoint: nothing to resume", file=sys.stderr)
            if isinstance(err, OSError) and err.errno in USER_ERRNOS and not err.filename and self.run_dir:
                # A full or read-only disk fails inside a library's write (a plot, an event file) with no file
                # named: the run's folder is where it was writing.
                raise OSError(err.errno, err.strerror, str(self.run_dir)) from err
            raise

    def _remove_debris(self) -> None:
        """After a failure, leave no trace that is of no use: a new run with no checkpoint goes (bad data, a wrong
        monitor, a diverged first epoch); an evaluation that failed takes back what it had added to its run."""
        if self.claimed is not None:
            if not any(self.claimed.glob("checkpoints/*.ckpt")):
                shutil.rmtree(self.claimed, ignore_errors=True)
        elif self.run_dir is not None and (
            self.subcommand != "fit" or not any(self.run_dir.glob("checkpoints/*.ckpt"))
        ):
            for path in sorted(set(self.run_dir.rglob("*")) - self._files_before, reverse=True):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--runs_dir", type=str, default="lightning_logs", help="Folder holding one version_N directory per run."
        )
        parser.add_argument(
            "--run.tags", type=list[str], default=[], help="Labels of this run, for the trackers and the runs table."
        )
        parser.add_argument("--run.note", type=Optional[str], default=None, help="A free-text note on this run.")
        parser.add_argument(
            "--log_level", type=Literal["debug", "info", "warning", "error"], default="warning",
            help="The libraries' lines to print: info adds Lightning's seed, devices and model summary, and W&B's and "
            "Neptune's own lines.",
        )
        parser.add_argument(
            "--run_dir", type=Optional[str], default=None,
            help="This run's own folder, at a fixed path (a pipeline stage's output; it must not exist or be empty); "
            "default: a new version_N under --runs_dir (for an evaluation: the checkpoint's run).",
        )
        # The network's output size and the plots' labels follow the data module's task: set once, there.
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        # Checkpointing is always on and configurable as `checkpoint.*`: the best by val/loss, plus last.ckpt.
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                # Metric names hold a '/', which Lightning would turn into a sub-folder: name the parts by hand.
                "checkpoint.filename": "epoch{epoch:02d}-val_loss{val/loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "trainer.max_epochs": 2,
                # bf16 autocast (weights, optimizer and checkpoints stay fp32) where the hardware computes bf16 natively,
                # fp32 elsewhere; the run's provenance records which (hardware.bf16). benchmarks/throughput.py measures
                # the ratio.
                "trainer.precision": default_precision(),
                "model.optimizer": DEFAULT_OPTIMIZER,
                # Confusion matrix, ROC/PR curves and a gallery of mistakes for every tracker, and hardware utilization
                # (CPU, memory; GPU when present) logged like any metric. Replaced by a config's
                # own `trainer.callbacks` list (use `callbacks+:` to add to it instead).
                "trainer.callbacks": [
                    {"class_path": "mnist_dlops.callbacks.Diagnostics"},
                    {"class_path": "mnist_dlops.callbacks.DeviceStatsMonitor", "init_args": {"cpu_stats": True}},
                ],
                # The run config saver logs the whole config to every tracker, the model's arguments included.
                "trainer.enable_autolog_hparams": False,
                # The same as configs/tensorboard.yaml: one default.
                "trainer.logger": {
                    "class_path": "mnist_dlops.trackers.tensorboard.TensorBoardLogger",
                    "init_args": {"log_graph": True},
                },
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, starting from the configuration stored in the ``--ckpt_path`` checkpoint when one is given."""
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            args = list(sys.argv[1:] if args is None else args)
            check_config_files(args)
            args, self.checked_ckpt, self.checkpoint = restore_from_checkpoint(args)
            self.config = parser.parse_args(args)

    # private: LightningCLI restores a checkpoint's hyper-parameters here, after parsing, over the user's flags.
    def _parse_ckpt_path(self) -> None:
        """Done before parsing by ``parse_arguments``; Lightning's version would override the user's flags."""

    def before_instantiate_classes(self) -> None:
        """Check the config, then give this run its directory before any logger or checkpoint callback exists."""
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        show(config.log_level)  # inside quiet(), which puts the levels back when the command ends
        check_classes(config)
        check_values(config)
        ckpt = config.get("ckpt_path")
        if ckpt and Path(ckpt) != self.checked_ckpt:  # named in a YAML file: checked here, before anything starts
            self.checkpoint = load_checkpoint(ckpt)
        if ckpt and self.subcommand == "fit":  # a resume must have something left to train
            check_resumable(self.checkpoint, config)
        self.checkpoint = None  # read once, checked; Lightning loads its own copy to restore from
        # A refused write names the key that asked for it (the checkpoint callback's is ours, not a class path).
        WRITES.note_sources(config, built={f"{RunCheckpoint.__module__}.RunCheckpoint": "checkpoint"})
        run_dir = os.environ.get(RUN_DIR_ENV) or config.get("run_dir") or run_dir_of(config.get("ckpt_path"))
        run_dir = Path(run_dir) if run_dir else None
        if run_dir is None:
            runs_dir = Path(config.runs_dir)
            with WRITES.allowing(runs_dir, "the runs folder"):  # for the new version_N only
                run_dir = self.claimed = claim_run_dir(runs_dir)
        allow_writes(run_dir, "the run")
        allow_store_writes(runs_store(run_dir.resolve().parent))  # the runs folder's store, for MLflow's tracker
        if config.get("run_dir") and not os.environ.get(RUN_DIR_ENV):
            if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
                raise ConfigError(f"run_dir={run_dir}: exists and is not empty; a run gets a folder of its own "
                                  "(rerunning a pipeline run's config.yaml? add --run_dir null)")
            if not run_dir.exists():  # a folder that was there, empty, stays when the run fails
                run_dir.mkdir(parents=True)
                self.claimed = run_dir
        self.run_dir = run_dir
        self._files_before = set(run_dir.rglob("*"))
        try:  # before any tracker starts a writer thread that would fail later, with a traceback of its own
            with tempfile.TemporaryFile(dir=run_dir):
                pass
        except OSError as err:
            raise OSError(err.errno, f"cannot write into the run ({err.strerror})", str(run_dir)) from None

    def instantiate_classes(self) -> None:
        """Lightning's, with the run directory given at instantiation: the trainer's ``default_root_dir``, and the
        ``save_dir`` of every logger whose own is null (our trackers' default). The config itself is never changed,
        so config.yaml and the checkpoints keep it as given, portable: rerun, it starts a new run of its own."""
        if self.run_dir is None:  # no subcommand: nothing runs
            return super().instantiate_classes()
        self.config_init = self.parser.instantiate(self.config, instantiators=[(self._into_run, Logger, True)])
        self.datamodule = self.config_init[self.subcommand].data
        self.model = self.config_init[self.subcommand].model
        self.trainer = self.instantiate_trainer(default_root_dir=str(self.run_dir))
        if self.trainer.world_size > 1:  # Lightning's launcher starts the other processes with this environment
            os.environ[RUN_DIR_ENV] = str(self.run_dir)  # run() removes it again

    def _into_run(self, logger_class: type[Logger], *args: Any, **kwargs: Any) -> Logger:
        """Build a logger named in the config; a ``save_dir`` left null means this run's directory."""
        if "save_dir" in kwargs and kwargs["save_dir"] is None:
            kwargs["save_dir"] = str(self.run_dir)
        return logger_class(*args, **kwargs)

    # private: LightningCLI's one place that holds the callbacks list before the Trainer exists; its public
    # instantiate_trainer(**kwargs) can add callbacks but not drop ours (guarded by tests/test_private_members.py).
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Lightning's, with our progress bar as the default one (Lightning adds its Rich bar when none is listed),
        without our checkpoint callback when ``trainer.enable_checkpointing`` is false, and with checkpoints
        written atomically (``Trainer(plugins=...)``) unless the config names its own checkpoint IO."""
        if config.get("enable_model_summary") is None:  # Lightning's table: news at --log_level info, unless asked
            level = (self.config[self.subcommand] if self.subcommand else self.config).get("log_level")
            config = {**config, "enable_model_summary": level in ("debug", "info")}
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            config = {**config, "plugins": [*plugins, AtomicCheckpointIO()]}
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, RunCheckpoint)]
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        # Same rule as Lightning's own default: only when the bar is on and the config names no progress bar.
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, LightningProgressBar) for c in [*listed, *callbacks]
        ):
            callbacks = [*callbacks, ProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        """One closing line: where the run is and how to evaluate it."""
        if self.trainer.is_global_zero and self.run_dir is not None:
            best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
            target = os.path.relpath(best) if best else self.run_dir
            print(f"run: {self.run_dir}  (evaluate: {invoked('test')} --ckpt_path {target})")


def check_resumable(checkpoint: dict[str, Any], config: Namespace) -> None:
    """A finished run has nothing to resume: one line saying how to train it longer, rather than a silent exit 0."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    # "processed": the epoch's batches all ran (last.ckpt is saved at the epoch's end, before "completed" counts it).
    done, epochs = max(progress.get("completed", 0), progress.get("processed", 0)), config.get("trainer.max_epochs")
    if epochs is not None and epochs != -1 and done >= epochs and config.get("trainer.max_steps", -1) == -1:
        run = Path(config.ckpt_path).resolve().parent.parent
        raise ConfigError(f"ckpt_path={config.ckpt_path}: the run has finished its {done} epochs, nothing to resume "
                          f"(its learning-rate schedule ended with them); for more epochs, rerun its config: "
                          f"{invoked('fit')} -c {os.path.relpath(run / 'config.yaml')} --trainer.max_epochs {done + 1}")


class ConfigCheck(MNISTCLI):
    """A ``fit`` command line (less its ``fit``) parsed and its values checked, with nothing built or written: the
    sweep's check of its search space (LightningCLI's ``run=False`` parses, then instantiates: here it only checks)."""

    def instantiate_classes(self) -> None:
        check_classes(self.config)
        check_values(self.config)


def run(args: ArgsType = None, callbacks: Sequence[Callback] = (), check: bool = False) -> MNISTCLI:
    """One run from Python: parse ``args`` (default: the command line), run the subcommand, return the CLI (its
    ``trainer``, ``model``, ``run_dir``). The user's mistakes are raised (``UserError``, Lightning's
    ``MisconfigurationException``), not printed; ``callbacks`` join the trainer's for this run only (a sweep's pruner).
    ``check``: only parse and check ``args``, a ``fit`` command line without the ``fit`` (see ``ConfigCheck``).

    Re-entrant: each call is one run in its own directory, and leaves the process environment as it found it
    (our run directory variable for DDP's children, Lightning's ``PL_GLOBAL_SEED``...), so a sweep or a test can call
    it many times in one process.
    """
    # patch.dict with no values: the whole environment as it was, restored on the way out.
    with patch.dict(os.environ):
        # Whatever the config, checkpoint or URL names, nothing untrusted is imported; libraries' noise is not printed.
        with guarded_imports(), guarded_writes(), quiet():
            return (ConfigCheck if check else MNISTCLI)(
                MNISTModule,
                MNISTDataModule,
                args=args,
                seed_everything_default=42,
                save_config_callback=RunConfigSaver,
                trainer_defaults={"callbacks": [ResumeState(), PredictionCSV(), *callbacks]},
                auto_configure_optimizers=False,
                parser_class=OneLineParser,
                run=not check,
            )


def cli_main(args: ArgsType = None) -> None:
    """``python cli.py``: ``run`` with the user's mistakes as one ``error:`` line and an exit status, no traceback.

    2: a bad config value or checkpoint argument. 1: bad data, a training that diverged, a path that cannot be
    written (disk full, read-only). 143: stopped by SIGTERM (preemption), after saving ``last.ckpt``, so that a
    scheduler can tell it from success. A programming error stays a traceback.
    """
    with user_errors():
        try:
            run(args)
        except MisconfigurationException as err:  # Lightning's word for settings that cannot go together
            raise ConfigError(one_line(str(err))) from None
        except SIGTERMException:  # the CLI has printed how to resume
            sys.exit(143)
