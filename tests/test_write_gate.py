"""The write gate: whatever flag, config or checkpoint names a path, a command changes nothing outside its run, its
stores and the outputs the user names. Each case plants a sentinel tree beside the run and compares its checksums.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, forge, make_idx_set

from mnist_dlops.cli.app import cli_main
from mnist_dlops.errors import user_errors

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", "--trainer.limit_predict_batches", "1", "--data.val_size", "20",
        "--trainer.enable_progress_bar", "false", "--data.download", "false"]


def digest(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``, by md5 (folders by name)."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with tiny data, and a sentinel tree ``outside/`` that no command may change."""
    make_idx_set(tmp_path / "data")
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    for name in ("precious.ckpt", "on_exception.ckpt", "metrics.csv", "sub/victim.db", "fit-prof.txt"):
        (outside / name).write_text("precious\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(args: list[str], capsys: pytest.CaptureFixture, *fragments: str) -> str:
    """Run the CLI in-process; it must exit 2 with one ``error:`` line holding every fragment, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and all(fragment in last for fragment in fragments), last
    return last


# Classes that take a path, each pointed outside the run: Lightning's and ours, loggers, profilers, callbacks.
PATHS = {
    "tensorboard save_dir": ["--trainer.logger.init_args.save_dir=outside"],
    "csv tracker": ["--trainer.logger=mnist_dlops.trackers.csv.CSVLogger",
                    "--trainer.logger.init_args.save_dir=outside"],
    "lightning CSVLogger": ["--trainer.logger=pytorch_lightning.loggers.CSVLogger",
                            "--trainer.logger.init_args.save_dir=outside", "--trainer.logger.init_args.name=",
                            "--trainer.logger.init_args.version="],
    **{f"{name} tracker": ["-c", str(REPO / "configs" / f"{name}.yaml"), "--trainer.logger.init_args.save_dir=outside"]
       for name in ("wandb", "neptune", "mlflow")},
    **{profiler: [f"--trainer.profiler=pytorch_lightning.profilers.{profiler}",
                  "--trainer.profiler.init_args.dirpath=outside", "--trainer.profiler.init_args.filename=prof"]
       for profiler in ("SimpleProfiler", "AdvancedProfiler")},
    "OnExceptionCheckpoint": ["--trainer.callbacks+=pytorch_lightning.callbacks.OnExceptionCheckpoint",
                              "--trainer.callbacks.dirpath=outside"],
    "ModelCheckpoint": ["--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint",
                        "--trainer.callbacks.dirpath=outside", "--trainer.callbacks.filename=precious",
                        "--trainer.callbacks.enable_version_counter=false"],
}


# What Lightning says before the gate refuses: the sentinel folder is not empty on purpose (its CSV logger warns it
# would replace the files), and OnExceptionCheckpoint's planted file is what Lightning would resume from.
PLANTED = [pytest.mark.filterwarnings("ignore:Experiment logs directory .* exists and is not empty"),
           pytest.mark.filterwarnings("ignore:`.fit\\(ckpt_path=None\\)` was called without a model")]


@pytest.mark.parametrize("flags", PATHS.values(), ids=PATHS.keys())
@PLANTED[0]
@PLANTED[1]
def test_fit_never_writes_outside_the_run(lab: Path, capsys: pytest.CaptureFixture, flags: list[str]) -> None:
    before = digest(lab / "outside")
    refused(["fit", "--data.data_dir", "data", *TINY, *flags], capsys, "outside", "refused to")
    assert digest(lab / "outside") == before


@pytest.fixture
def trained(lab: Path) -> Path:
    cli_main(["fit", "--data.data_dir", "data", *TINY, "--trainer.callbacks", "[]"])
    return lab / "lightning_logs/version_0/checkpoints/last.ckpt"


STORED = {
    "OnExceptionCheckpoint": lambda c: c["trainer"].update(callbacks=[{
        "class_path": "pytorch_lightning.callbacks.OnExceptionCheckpoint",
        "init_args": {"dirpath": str(Path("outside").resolve()), "filename": "precious"}}]),
    "logger save_dir": lambda c: c["trainer"].update(logger={
        "class_path": "pytorch_lightning.loggers.CSVLogger",
        "init_args": {"save_dir": str(Path("outside").resolve()), "name": "", "version": ""}}),
}


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
@PLANTED[0]
@pytest.mark.parametrize("edit", STORED.values(), ids=STORED.keys())
def test_a_strangers_checkpoint_never_writes_outside(trained: Path, capsys: pytest.CaptureFixture, subcommand: str,
                                                     edit: callable) -> None:
    lab = trained.parents[3]
    ckpt = forge(trained, lab / "stranger.ckpt", edit)
    before = digest(lab / "outside")
    refused([subcommand, "--ckpt_path", str(ckpt), "--data.data_dir", "data", *TINY], capsys, "outside")
    assert digest(lab / "outside") == before


def test_a_checkpoint_does_not_choose_where_runs_go(trained: Path, capsys: pytest.CaptureFixture) -> None:
    lab = trained.parents[3]
    ckpt = forge(trained, lab / "stranger.ckpt", lambda c: c.update(runs_dir=str(lab / "outside" / "runs")))
    before = digest(lab / "outside")
    cli_main(["test", "--ckpt_path", str(ckpt), "--data.data_dir", "data", *TINY])
    assert digest(lab / "outside") == before
    assert (lab / "lightning_logs" / "version_1").is_dir()  # a new run under the default runs folder


def test_a_failed_fit_keeps_an_empty_run_dir_it_did_not_make(lab: Path, capsys: pytest.CaptureFixture) -> None:
    (lab / "empty").mkdir()
    with pytest.raises(SystemExit):
        cli_main(["fit", "--run_dir", "empty", "--data.data_dir", "missing", *TINY])
    assert (lab / "empty").is_dir() and not any((lab / "empty").iterdir())


def test_a_data_version_is_never_an_option(lab: Path, capsys: pytest.CaptureFixture) -> None:
    import subprocess

    for command in (["git", "init", "-q"], ["git", "tag", "--no-sign", "x"]):
        subprocess.run(command, cwd=lab, capture_output=True)
    (lab / ".dvc").mkdir()
    for version in ("--output=pwn.txt", ""):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", "--data.data_dir", "data", f"--data.version={version}", *TINY])
        assert exit_info.value.code != 0
        assert "data.version" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (lab / "pwn.txt").exists()


def test_a_sweep_files_journal_storage_is_refused(lab: Path, capsys: pytest.CaptureFixture) -> None:
    from mnist_dlops.cli.sweep import main as sweep_main

    before = digest(lab / "outside")
    (lab / "sweep.yaml").write_text(yaml.safe_dump({
        "study_name": "s", "n_trials": 1, "storage": f"journal:{lab / 'outside' / 'metrics.csv'}",
        "space": {"model.optimizer.init_args.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}}))
    with pytest.raises(SystemExit) as exit_info:
        sweep_main(["-c", "sweep.yaml", "--data.data_dir", "data", *TINY])
    assert exit_info.value.code == 2
    assert "refused to" in capsys.readouterr().err.strip().splitlines()[-1]
    assert digest(lab / "outside") == before


def test_feedback_labels_never_name_a_folder(lab: Path, capsys: pytest.CaptureFixture) -> None:
    from mnist_dlops.commands.datasets import main as datasets_main
    from mnist_dlops.feedback import FeedbackStore

    with user_errors():
        store = FeedbackStore(f"sqlite:///{lab / 'foreign.db'}")
        store.engine.dispose()
    for label in ("../../outside/trav", str(lab / "outside" / "abs"), "12"):
        with sqlite3.connect(lab / "foreign.db") as db:
            db.execute("DELETE FROM feedback")
            db.execute("INSERT INTO feedback (created, image, upload_sha256, predicted, label, model_name, "
                       "model_version, client) VALUES (0, ?, '', '1', ?, 'm', '1', '')",
                       (np.zeros((28, 28), np.uint8).tobytes(), label))
        before = digest(lab / "outside")
        with pytest.raises(SystemExit) as exit_info:
            datasets_main(["feedback", "--url", f"sqlite:///{lab / 'foreign.db'}", "--out", "fb"])
        assert exit_info.value.code == 1
        assert "not a digit" in capsys.readouterr().err
        assert digest(lab / "outside") == before and not (lab / "fb").exists()


@pytest.mark.parametrize("out", ["outside", "."])
def test_a_data_command_never_replaces_a_folder_of_other_files(lab: Path, capsys: pytest.CaptureFixture,
                                                              out: str) -> None:
    from mnist_dlops.commands.datasets import main as datasets_main

    (lab / "extra" / "3").mkdir(parents=True)
    before = digest(lab / "outside")
    for command in (["merge", "data", "extra", "--out", out], ["png", "data", out]):
        with pytest.raises(SystemExit) as exit_info:
            datasets_main(command)
        assert exit_info.value.code == 2
        assert "out=" in capsys.readouterr().err
    assert digest(lab / "outside") == before


def test_a_kill_during_a_data_command_leaves_nothing_the_next_run_keeps(lab: Path) -> None:
    from mnist_dlops.commands.datasets import main as datasets_main

    (lab / ".png-out.staging" / "half").mkdir(parents=True)  # what a kill -9 during `datasets png` leaves
    datasets_main(["png", "data", "png-out"])
    assert not (lab / ".png-out.staging").exists() and (lab / "png-out" / "train").is_dir()


def test_prometheus_folder_keeps_files_that_are_not_its_own(lab: Path) -> None:
    from mnist_dlops.serve.command import metrics_folder

    folder = lab / "outside" / "sub"
    (folder / "counter_123.db").write_bytes(b"stale")
    before = digest(folder)
    with user_errors(), pytest.MonkeyPatch.context() as env:
        env.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
        with metrics_folder():
            pass
    assert digest(folder) == {k: v for k, v in before.items() if k != "counter_123.db"}  # victim.db stays
