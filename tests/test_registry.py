"""The model registry on the real MLflow client and store: register, alias, list, load by alias without this project."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from conftest import REPO, mlflow_ui
from mlflow import MlflowClient

from mnist_dlops.cli.app import cli_main
from mnist_dlops.commands.registry import main, register, versions
from mnist_dlops.data.idx import IDX_FILES, find_idx, read_idx
from mnist_dlops.module import rebuild

FIT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "40", "--trainer.limit_val_batches", "4",
       "--data.val_size", "1000", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
       "--trainer.callbacks", "[]", "--data.download", "false", "-c", str(REPO / "configs/mlflow.yaml")]


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist_dir: Path) -> Path:
    """A folder with one short real-MNIST run tracked in MLflow (lightning_logs/mlflow.db)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cli_main(["fit", *FIT, "--data.data_dir", str(mnist_dir)])
    return tmp_path


def store(lab: Path) -> MlflowClient:
    uri = f"sqlite:///{lab}/lightning_logs/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def mnist_test_images(mnist_dir: Path, n: int = 64) -> np.ndarray:
    """The first ``n`` images of MNIST's test split, as the registered model takes them: uint8 [n, 1, 28, 28]."""
    images = read_idx(find_idx(mnist_dir, IDX_FILES["test"][0]), 0x00000803)
    return np.ascontiguousarray(images[:n, None])


def checkpoint_probs(path: Path, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return rebuild(path)(torch.from_numpy(np.array(images))).softmax(-1).numpy()


def count_versions(lab: Path) -> int:
    return sum(len(store(lab).search_model_versions(f"name='{m.name}'")) for m in store(lab).search_registered_models())


def test_register_alias_list_and_load_by_alias_without_this_project(lab: Path, mnist_dir: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    assert register(ckpt_path="best", name="mnist-digits", alias="staging") == 1
    assert register(ckpt_path="last", name="mnist-digits") == 2
    main(["alias", "mnist-digits@production", "1"])
    main(["list", "--name", "mnist-digits"])
    out = capsys.readouterr().out
    assert "mnist-digits@production -> version 1" in out
    listed = out.splitlines()[-3:]
    assert "aliases" in listed[0] and "val/acc" in listed[0] and "data" in listed[0]
    assert listed[2].split()[:3] == ["mnist-digits", "1", "production,staging"]

    # The version is linked to the MLflow run the training logged, and carries its metrics and data fingerprint.
    run_dir = lab / "lightning_logs/version_0"
    version = store(lab).get_model_version_by_alias("mnist-digits", "production")
    assert version.run_id == (run_dir / ".mlflow_run_id").read_text().strip()
    provenance = __import__("yaml").safe_load((run_dir / "provenance.yaml").read_text())
    assert version.tags["data_fingerprint"] == provenance["data"]["fingerprint"]
    assert float(version.tags["val/acc"]) == pytest.approx(provenance["metrics"]["val/acc"], rel=1e-5)
    best = Path(version.tags["checkpoint"])
    assert best.parent == run_dir / "checkpoints" and best.name != "last.ckpt"
    (row,) = [r for r in versions("mnist-digits") if r["version"] == 1]
    assert row["run"] == "version_0" and row["format"] == "torchscript"

    # Loaded by alias in a fresh process that never imports this project: the checkpoint's probabilities.
    images = mnist_test_images(mnist_dir)
    np.save(lab / "images.npy", images)
    script = (
        "import sys, numpy as np, mlflow\n"
        "model = mlflow.pyfunc.load_model('models:/mnist-digits@production')\n"
        "np.save('probs.npy', np.asarray(model.predict(np.load('images.npy'))))\n"
        "meta = model.metadata\n"
        "print(meta.metadata['class_names'], meta.signature.inputs.to_dict())\n"
        "assert not [m for m in sys.modules if m.startswith('mnist_dlops')], 'imported the project'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{lab}/lightning_logs/mlflow.db"
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=lab, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "['0', '1', '2'" in done.stdout and "uint8" in done.stdout and "(-1, 1, 28, 28)" in done.stdout
    probs = np.load(lab / "probs.npy")
    expected = checkpoint_probs(best, images)
    assert probs.shape == (64, 10) and np.abs(probs - expected).max() <= 1e-5
    assert (expected.argmax(1) == read_idx(find_idx(mnist_dir, IDX_FILES["test"][1]), 0x00000801)[:64]).mean() > 0.8


@pytest.mark.slow  # a second registration path: in `pytest -m slow` and CI, to keep the default run short
def test_an_onnx_version_gives_the_same_probabilities(lab: Path, mnist_dir: Path) -> None:
    import mlflow

    version = register(ckpt_path="best", name="digits-onnx", format="onnx")
    mlflow.set_tracking_uri(f"sqlite:///{lab}/lightning_logs/mlflow.db")
    model = mlflow.pyfunc.load_model(f"models:/digits-onnx/{version}")
    images = mnist_test_images(mnist_dir, 16)
    probs = model.predict(images)["probs"]
    best = Path(store(lab).get_model_version("digits-onnx", str(version)).tags["checkpoint"])
    assert np.abs(probs - checkpoint_probs(best, images)).max() <= 1e-5


@pytest.mark.slow  # a sweep of two trials: in `pytest -m slow` and CI
def test_a_sweeps_best_trial_in_one_command(lab: Path, mnist_dir: Path) -> None:
    from mnist_dlops.cli.sweep import sweep

    study = sweep(study_name="s", n_trials=2, objective="val/acc", direction="maximize",
                  fixed={"trainer.max_epochs": 1}, trial_args=["--data.data_dir", str(mnist_dir), *FIT],
                  space={"model.optimizer.init_args.lr": {"type": "categorical", "choices": [0.0001, 0.01]}})
    main(["register", "--sweep", "s", "--name", "sweep-best"])
    version = store(lab).get_model_version("sweep-best", "1")
    assert Path(version.tags["run_dir"]).resolve() == Path(study.best_trial.user_attrs["run_dir"]).resolve()


def fails(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return exit_.value.code, err


def test_bad_input_is_one_line_and_registers_nothing(lab: Path, capsys: pytest.CaptureFixture) -> None:
    register(name="mnist-digits")
    torch.save({"weights": torch.zeros(3)}, lab / "not_ours.ckpt")
    cases = [
        (("register", "--ckpt_path", "not_ours.ckpt"), 2, "not a Lightning checkpoint"),
        (("register", "--name", "a/b"), 2, "name='a/b'"),
        (("alias", "mnist-digits@production", "7"), 2, "version=7"),
        (("alias", "nobody@production", "1"), 2, "no registered model named 'nobody'"),
        (("alias", "mnist-digits", "1"), 2, "expected <name>@<alias>"),
        (("register", "--sweep", "never-ran"), 2, "sweep=never-ran"),
        (("register", "--name", "o'brien"), 2, "name=\"o'brien\""),
        (("register", "--sweep", "corrupt"), 2, "cannot be read as an Optuna study"),
        (("register", "--sweep", "foreign"), 2, "records no run folder"),
        (("list", "--tracking_uri", "mysql://me:s3cret@127.0.0.1/x"), 2, "tracking_uri=mysql://me:***@"),
    ]
    (lab / "lightning_logs/sweeps/corrupt").mkdir(parents=True)
    (lab / "lightning_logs/sweeps/corrupt/study.db").write_bytes(os.urandom(4096))
    foreign = optuna.create_study(study_name="foreign", storage=f"sqlite:///{lab}/lightning_logs/sweeps/foreign.db")
    foreign.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    (lab / "lightning_logs/sweeps/foreign").mkdir()
    (lab / "lightning_logs/sweeps/foreign.db").rename(lab / "lightning_logs/sweeps/foreign/study.db")
    for argv, code, message in cases:
        status, err = fails(capsys, *argv)
        assert status == code and message in err and err.startswith("error: "), (argv, err)
    assert count_versions(lab) == 1 and [m.name for m in store(lab).search_registered_models()] == ["mnist-digits"]


@pytest.mark.slow  # a long real run or a server: in `pytest -m slow` and CI, to keep the default run short
def test_a_locked_database_is_one_line_and_leaves_nothing(lab: Path, capsys: pytest.CaptureFixture) -> None:
    db = lab / "lightning_logs/mlflow.db"
    holder = sqlite3.connect(db, isolation_level=None, timeout=1)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing, as far as SQLite can tell
    try:
        status, err = fails(capsys, "register", "--name", "mnist-digits")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert status == 1 and "database is locked" in err
    assert count_versions(lab) == 0


@pytest.mark.slow  # a second process and a server: in `pytest -m slow` and CI
def test_mlflow_ui_lists_the_registered_model(lab: Path) -> None:
    register(name="mnist-digits", alias="production")
    with mlflow_ui(lab) as url:
        answer = urllib.request.urlopen(f"{url}/api/2.0/mlflow/registered-models/search?max_results=10", timeout=10)
        (model,) = json.load(answer)["registered_models"]
    assert model["name"] == "mnist-digits" and model["aliases"] == [{"alias": "production", "version": "1"}]
    assert model["latest_versions"][0]["run_id"] == (lab / "lightning_logs/version_0/.mlflow_run_id").read_text()


@pytest.mark.slow  # a PostgreSQL server: in `pytest -m slow` and CI
def test_runs_and_registry_on_a_postgresql_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist_dir: Path,
                                                  postgres: str) -> None:
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the driver we ship is psycopg2.
    uri = postgres.replace("postgresql://", "postgresql+psycopg2://")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cli_main(["fit", *FIT, "--data.data_dir", str(mnist_dir)])
    assert register(name="mnist-digits", alias="production") == 1
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("mnist-digits", "production")
    run = client.get_run(version.run_id)
    assert run.info.run_name == "version_0" and "val/acc" in run.data.metrics
    assert not (tmp_path / "lightning_logs/mlflow.db").exists()
