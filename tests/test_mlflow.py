"""MLflow as a tracker, read back with MLflow's own client from the real embedded SQLite store and a real server."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_idx_set, mlflow_ui

from mnist_dlops.cli.app import cli_main

TINY = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6", "--trainer.limit_val_batches", "2",
        "--data.val_size", "40", "--data.batch_size", "16", "--trainer.enable_progress_bar", "false",
        "--data.download", "false", "--data.data_dir", "data", "--trainer.log_every_n_steps", "2",
        "-c", str(REPO / "configs/mlflow.yaml")]


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_idx_set(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def client(lab: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{lab}/lightning_logs/mlflow.db")


def only_run(lab: Path):
    (experiment,) = [e for e in client(lab).search_experiments() if e.name == "mnist-dlops"]
    return client(lab).search_runs([experiment.experiment_id])


def test_a_run_and_its_evaluation_in_mlflow(lab: Path) -> None:
    cli_main(["fit", *TINY, "--run.tags", "[baseline]", "--run.note", "first try"])
    (run,) = only_run(lab)
    mlflow = client(lab)
    assert run.info.run_name == "version_0" and run.info.status == "FINISHED"
    assert run.data.params["model/network/class_path"] == "mnist_dlops.networks.FastCNN"
    assert run.data.params["data/task"] == "multiclass" and "provenance/data/fingerprint" in run.data.params
    assert run.data.tags["tag.baseline"] == "true" and run.data.tags["mlflow.note.content"] == "first try"
    assert len(mlflow.get_metric_history(run.info.run_id, "val/loss")) == 2
    assert {"train/loss", "train/lr", "val/acc"} <= set(run.data.metrics)
    artifacts = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "plots", "run"} <= artifacts
    assert any(a.path.endswith("last.ckpt") for a in mlflow.list_artifacts(run.info.run_id, "checkpoints"))
    # The evaluation continues the same MLflow run, at the checkpoint's step.
    cli_main(["test", "--ckpt_path", "last", "--trainer.enable_progress_bar", "false", "--data.data_dir", "data"])
    (after,) = only_run(lab)
    assert after.info.run_id == run.info.run_id and "test/acc" in after.data.metrics
    step = torch.load(lab / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)["global_step"]
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "test/acc")] == [step]


@pytest.mark.slow  # a long real run or a server: in `pytest -m slow` and CI, to keep the default run short
def test_a_long_config_value_is_cut_not_refused(lab: Path) -> None:
    note = "x" * 7000  # over MLflow's 6000-character limit for a param value
    cli_main(["fit", *TINY, "--run.note", note])
    (run,) = only_run(lab)
    assert run.data.params["run/note"].endswith("...[cut]") and len(run.data.params["run/note"]) == 6000


@pytest.mark.slow  # several runs or processes: in `pytest -m slow` and CI, to keep the default run short
def test_two_runs_started_at_once_both_land(lab: Path) -> None:
    processes = [subprocess.Popen([sys.executable, str(REPO / "cli.py"), "fit", *TINY], cwd=lab,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in processes:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    runs = only_run(lab)
    assert sorted(r.info.run_name for r in runs) == ["version_0", "version_1"]
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow  # several runs or processes: in `pytest -m slow` and CI, to keep the default run short
def test_mlflow_ui_serves_the_runs(lab: Path) -> None:
    """``mlflow ui`` on loopback answers its REST API with the run; the server is stopped after a bounded wait."""
    cli_main(["fit", *TINY])
    with mlflow_ui(lab) as url:
        body = json.dumps({"max_results": 10}).encode()
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search", data=body,
                                         headers={"Content-Type": "application/json"})
        experiments = json.load(urllib.request.urlopen(request, timeout=10))["experiments"]
        (experiment,) = [e for e in experiments if e["name"] == "mnist-dlops"]
        request = urllib.request.Request(
            f"{url}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
            headers={"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(request, timeout=10))["runs"]
    assert [r["info"]["run_name"] for r in runs] == ["version_0"]
