"""Sweeps on real Optuna, a real SQLite (and PostgreSQL) study, and real training on a slice of MNIST."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO
from optuna.trial import TrialState

from mnist_dlops.cli.app import run
from mnist_dlops.cli.sweep import main, sweep
from mnist_dlops.commands.runs import runs

SLICE = ["--trainer.limit_train_batches", "12", "--trainer.limit_val_batches", "4", "--data.val_size", "2000",
         "--trainer.enable_model_summary", "false", "--trainer.callbacks", "[]"]


def data_args(mnist_dir: Path) -> list[str]:
    return ["--data.data_dir", str(mnist_dir), "--data.download", "false", *SLICE]


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def study_of(lab: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{lab}/lightning_logs/sweeps/{name}/study.db")


def grid(key: str, values: list) -> dict:
    """A sampler that tries exactly these values, once each (in a seeded order)."""
    return {"class_path": "optuna.samplers.GridSampler", "init_args": {"search_space": {key: values}, "seed": 0}}


LR = "model.optimizer.init_args.lr"


def test_trials_are_runs_with_the_lr_sampled(lab: Path, mnist_dir: Path, capsys: pytest.CaptureFixture) -> None:
    study = sweep(
        study_name="s", n_trials=3, objective="val/acc", direction="maximize",
        fixed={"trainer.max_epochs": 1}, trial_args=data_args(mnist_dir),
        space={LR: {"type": "float", "low": 0.001, "high": 0.03, "log": True},
               "data.batch_size": {"type": "categorical", "choices": [32, 64]}},
        sampler={"class_path": "optuna.samplers.RandomSampler", "init_args": {"seed": 1}},
    )
    out = capsys.readouterr().out
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 3 and "best: trial" in out and "3 complete" in out
    run_dirs = sorted(Path(t.user_attrs["run_dir"]) for t in trials)
    assert [d.name for d in run_dirs] == ["version_0", "version_1", "version_2"]
    for trial in trials:
        config = yaml.safe_load((Path(trial.user_attrs["run_dir"]) / "config.yaml").read_text())
        assert config["model"]["optimizer"]["init_args"]["lr"] == trial.params[LR]  # the lr sampled is the lr used
        assert config["data"]["batch_size"] == trial.params["data.batch_size"]
        assert {"s", f"trial-{trial.number}"} <= set(config["run"]["tags"])
    table = runs(where="sweep=s")
    assert sorted(table["trial"]) == [0, 1, 2] and set(table["state"]) == {"complete"}
    folder = lab / "lightning_logs/sweeps/s"
    assert {"best.yaml", "trials.csv", "optimization_history.png"} <= {p.name for p in folder.iterdir()}
    # best.yaml reruns the best trial alone, to the same value, bit for bit.
    rerun = run(["fit", "-c", str(folder / "best.yaml")])
    assert float(rerun.trainer.callback_metrics["val/acc"]) == study.best_value
    best = yaml.safe_load((folder / "best.yaml").read_text())["run"]  # a rerun, not the trial again
    assert f"trial-{study.best_trial.number}" not in best["tags"] and "s" not in best["tags"]
    assert best["note"] == f"rerun of sweep s, trial {study.best_trial.number}"


def test_a_bad_trial_is_pruned_and_a_diverged_one_fails(lab: Path, mnist_dir: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """lr 1e-9 learns nothing: the threshold pruner stops it after its first epoch, its run kept. lr 1e30 diverges:
    the trial fails with its reason, and the sweep finishes the others."""
    study = sweep(
        study_name="p", n_trials=3, objective="val/loss", fixed={"trainer.max_epochs": 3},
        # Without BatchNorm, whose running statistics 12 steps leave far from the batches': lr 0.01 must be good.
        trial_args=[*data_args(mnist_dir), "--model.lr_scheduler", "null", "--model.network.init_args.batch_norm",
                    "false"],
        space={LR: {"type": "categorical", "choices": [0.01, 1e-9, 1e30]}}, sampler=grid(LR, [0.01, 1e-9, 1e30]),
        pruner={"class_path": "optuna.pruners.ThresholdPruner", "init_args": {"upper": 1.5}},
    )
    by_lr = {t.params[LR]: t for t in study.trials}
    assert by_lr[0.01].state == TrialState.COMPLETE
    pruned = by_lr[1e-9]
    assert pruned.state == TrialState.PRUNED and len(pruned.intermediate_values) == 1
    run_dir = Path(pruned.user_attrs["run_dir"])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert yaml.safe_load((run_dir / "provenance.yaml").read_text())["sweep"]["state"] == "pruned"
    failed = by_lr[1e30]
    assert failed.state == TrialState.FAIL and "train/loss is nan" in failed.user_attrs["fail_reason"]
    out = capsys.readouterr().out
    assert "1 complete, 1 pruned, 1 fail" in out


SWEEP_YAML = """
study_name: w
n_trials: {n}
fixed: {{trainer.max_epochs: 1}}
space:
  model.optimizer.init_args.lr: {{type: float, low: 0.001, high: 0.03, log: true}}
sampler: {{class_path: optuna.samplers.RandomSampler, init_args: {{seed: 0}}}}
"""


def sweep_command(mnist_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mnist_dlops", "sweep", "-c", "w.yaml", *data_args(mnist_dir), *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.slow  # several processes: in `pytest -m slow` and CI
def test_two_workers_share_one_study(lab: Path, mnist_dir: Path) -> None:
    (lab / "w.yaml").write_text(SWEEP_YAML.format(n=4))
    result = subprocess.run(sweep_command(mnist_dir, "--workers", "2"), cwd=lab, env=env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = study_of(lab, "w").get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) >= 4  # both workers may start a last trial at once
    assert len({t.user_attrs["run_dir"] for t in trials}) == len(trials)
    assert len({t.params[LR] for t in trials}) == len(trials)


@pytest.mark.slow  # several processes: in `pytest -m slow` and CI
def test_a_killed_sweep_continues_without_rerunning_a_finished_trial(lab: Path, mnist_dir: Path) -> None:
    (lab / "w.yaml").write_text(SWEEP_YAML.format(n=4))
    process = subprocess.Popen(sweep_command(mnist_dir), cwd=lab, env=env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    for line in process.stdout:  # trial 1's progress line: trial 0 is stored as complete; then SIGKILL
        if line.startswith("trial 1: complete") or time.time() > deadline:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {t.number: (t.params, t.value) for t in study_of(lab, "w").get_trials(states=(TrialState.COMPLETE,))}
    assert len(before) >= 1
    result = subprocess.run(sweep_command(mnist_dir), cwd=lab, env=env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    complete = study_of(lab, "w").get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    assert {t.number: (t.params, t.value) for t in complete if t.number in before} == before
    assert len({t.user_attrs["run_dir"] for t in complete}) == 4


BAD = {
    "not a config key": ({"model.nosuch": {"type": "float", "low": 0.1, "high": 0.2}}, {}, "space.model.nosuch"),
    "reversed range": ({LR: {"type": "float", "low": 0.1, "high": 0.01}}, {},
                       "`low <= high` must hold, but got (low=0.1, high=0.01)"),
    "empty choices": ({LR: {"type": "categorical", "choices": []}}, {}, "`choices` must contain one or more elements"),
    "unknown distribution": ({LR: {"type": "gaussian", "low": 0.1, "high": 0.2}}, {}, "gaussian"),
    "objective never logged": ({LR: {"type": "float", "low": 0.01, "high": 0.02}}, {"objective": "val/accc"},
                               "objective=val/accc"),
    "storage": ({LR: {"type": "float", "low": 0.01, "high": 0.02}},
                {"storage": "postgresql://nobody@127.0.0.1:9/none"}, "storage=postgresql://"),
    "sampler": ({LR: {"type": "float", "low": 0.01, "high": 0.02}},
                {"sampler": {"class_path": "os.system"}}, "sampler"),
    "sampler's argument": ({LR: {"type": "float", "low": 0.01, "high": 0.02}},
                           {"sampler": {"class_path": "optuna.samplers.TPESampler", "init_args": {"nosuch": 1}}},
                           "sampler.init_args"),
    "pruner's value": ({LR: {"type": "float", "low": 0.01, "high": 0.02}},
                       {"pruner": {"class_path": "optuna.pruners.PercentilePruner", "init_args": {"percentile": 900}}},
                       "pruner.init_args"),
    "no trials": ({LR: {"type": "float", "low": 0.01, "high": 0.02}}, {"n_trials": -1}, "n_trials=-1"),
    "negative timeout": ({LR: {"type": "float", "low": 0.01, "high": 0.02}}, {"timeout": -5}, "timeout=-5"),
    "empty study name": ({LR: {"type": "float", "low": 0.01, "high": 0.02}}, {"study_name": ""}, "study_name=''"),
    "in-memory storage": ({LR: {"type": "float", "low": 0.01, "high": 0.02}}, {"storage": "sqlite:///"},
                          "keeps nothing"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_sweeps_fail_before_any_trial(lab: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    space, options, fragment = BAD[case]
    (lab / "bad.yaml").write_text(yaml.safe_dump({"study_name": "bad", "n_trials": 1, "space": space, **options}))
    with pytest.raises(SystemExit) as exit_info:
        main(["-c", "bad.yaml", "--data.download", "false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: ") and fragment in err, err
    assert not list(lab.glob("lightning_logs/version_*"))


def test_a_categorical_choice_of_classes_with_arguments(lab: Path, mnist_dir: Path) -> None:
    """The README's example: choices that are classes with init_args reach the trial as written."""
    choices = [{"class_path": "mnist_dlops.networks.FastCNN", "init_args": {"hidden": 32}},
               {"class_path": "mnist_dlops.networks.FastCNN", "init_args": {"hidden": 64}}]
    study = sweep("classes", {"model.network": {"type": "categorical", "choices": choices}}, n_trials=1,
                  trial_args=[*data_args(mnist_dir), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                              "--trainer.limit_val_batches", "1"])
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE
    config = yaml.safe_load((Path(trial.user_attrs["run_dir"]) / "config.yaml").read_text())
    network = config["model"]["network"]
    assert network["class_path"] == "mnist_dlops.networks.FastCNN" and network["init_args"]["hidden"] in (32, 64)


@pytest.mark.slow  # several processes: in `pytest -m slow` and CI
def test_two_workers_on_a_postgresql_study(lab: Path, mnist_dir: Path, postgres: str) -> None:
    (lab / "w.yaml").write_text(SWEEP_YAML.format(n=2))
    result = subprocess.run(sweep_command(mnist_dir, "--workers", "2", "--storage", postgres), cwd=lab, env=env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # Read back with Optuna through SQLAlchemy, naming the driver the project ships (its default is psycopg 3).
    storage = postgres.replace("postgresql://", "postgresql+psycopg2://")
    trials = optuna.load_study(study_name="w", storage=storage).get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) >= 2 and len({t.user_attrs["run_dir"] for t in trials}) == len(trials)


def test_trials_are_grouped_and_tagged_in_wandb(lab: Path, mnist_dir: Path) -> None:
    """A trial's W&B run (offline) is in the study's group; read with W&B's own record schema."""
    from test_trackers import wandb_records

    study = sweep(study_name="g", n_trials=1, fixed={"trainer.max_epochs": 1},
                  trial_args=[*data_args(mnist_dir), "--trainer.logger", "mnist_dlops.trackers.wandb.WandbLogger"],
                  space={LR: {"type": "float", "low": 0.001, "high": 0.03, "log": True}})
    run_dir = Path(study.trials[0].user_attrs["run_dir"])
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    record = next(r.run for r in wandb_records(wandb_file) if r.WhichOneof("record_type") == "run")
    assert record.run_group == "g"
    assert "WANDB_RUN_GROUP" not in os.environ
