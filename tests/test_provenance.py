"""Provenance: which data (fingerprint), which code (git), which machine, recorded in the run and every tracker."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, make_png_tree, run_module
from PIL import Image
from test_trackers import neptune_operations, wandb_records

from mnist_dlops.data import MNISTDataModule

TINY = ["--trainer.max_epochs", "1", "--data.val_size", "10", "--trainer.enable_progress_bar", "false"]


def run(cli: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(cli), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def provenance(cwd: Path, version: int = 0, name: str = "provenance.yaml") -> dict:
    return yaml.safe_load((cwd / "lightning_logs" / f"version_{version}" / name).read_text())


def test_fingerprint_is_stable_and_follows_one_changed_png(tmp_path: Path) -> None:
    root = make_png_tree(tmp_path / "pngs")
    first = MNISTDataModule(str(root), source="png").fingerprint
    assert MNISTDataModule(str(root), source="png").fingerprint == first  # same data, same fingerprint
    assert (root / ".mnist_dlops_fingerprint.json").is_file()  # cached next to the data
    img = root / "train" / "3" / "00003.png"
    pixels = list(Image.open(img).getdata())
    pixels[0] = 255 - pixels[0]
    changed = Image.new("L", (28, 28))
    changed.putdata(pixels)
    changed.save(img)
    assert MNISTDataModule(str(root), source="png").fingerprint != first


@pytest.mark.slow  # several runs: in `pytest -m slow` and CI, to keep the default run near 10 minutes
def test_runs_on_the_same_data_share_the_fingerprint_and_changed_data_warns(tmp_path: Path) -> None:
    root = make_png_tree(tmp_path / "pngs", per_class=4)
    args = ["fit", "--data.source", "png", "--data.data_dir", str(root), *TINY]
    for _ in range(2):
        result = run(REPO / "cli.py", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = provenance(tmp_path, 0), provenance(tmp_path, 1)
    assert a["data"]["fingerprint"] == b["data"]["fingerprint"] == MNISTDataModule(str(root), source="png").fingerprint
    ckpt = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    datamodule_state = next(v for k, v in torch.load(ckpt, weights_only=True).items() if k == "MNISTDataModule")
    assert datamodule_state["data_fingerprint"] == a["data"]["fingerprint"]  # in every checkpoint

    same = run(REPO / "cli.py", "test", "--ckpt_path", str(ckpt), cwd=tmp_path)
    assert same.returncode == 0 and "differs from the data" not in same.stderr

    Image.new("L", (28, 28), 128).save(root / "test" / "5" / "00005.png")
    changed = run(REPO / "cli.py", "test", "--ckpt_path", str(ckpt), cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert f"differs from the data this checkpoint was trained on ({a['data']['fingerprint'][:12]}" in changed.stderr
    assert provenance(tmp_path, 0, "provenance.test-1.yaml")["data"]["fingerprint"] != a["data"]["fingerprint"]


def copy_project(dest: Path) -> Path:
    """cli.py and the package, copied to ``dest`` (a script's own folder comes first on sys.path)."""
    dest.mkdir(parents=True)
    shutil.copy(REPO / "cli.py", dest / "cli.py")
    shutil.copytree(REPO / "mnist_dlops", dest / "mnist_dlops", ignore=shutil.ignore_patterns("__pycache__"))
    return dest / "cli.py"


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow  # several runs or processes: in `pytest -m slow` and CI, to keep the default run short
def test_provenance_records_the_git_commit_dirty_diff_and_environment(tmp_path: Path, tiny_idx: Path) -> None:
    repo = tmp_path / "repo"
    cli = copy_project(repo)
    git("init", "-q", cwd=repo)
    git("add", ".", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "snapshot", cwd=repo)
    work = tmp_path / "work"
    work.mkdir()

    result = run(cli, "fit", "--data.data_dir", str(tiny_idx), *TINY, "--run.tags", "[a, b]", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    clean = provenance(work, 0)
    assert clean["code"] == {"commit": git("rev-parse", "HEAD", cwd=repo), "dirty": False, "repo": str(repo.resolve())}
    assert clean["command"].startswith("cli.py fit --data.data_dir")
    assert clean["versions"]["torch"] == torch.__version__ and clean["versions"]["python"].count(".") == 2
    assert clean["hardware"]["cpu_cores"] >= 1 and clean["hardware"]["cpu"]
    assert clean["tags"] == ["a", "b"] and clean["status"] == "finished" and clean["wall_time_s"] > 0
    assert clean["started"] <= clean["ended"]

    with open(repo / "mnist_dlops" / "networks.py", "a") as f:
        f.write("# a local change\n")
    result = run(cli, "fit", "--data.data_dir", str(tiny_idx), *TINY, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    dirty = provenance(work, 1)
    assert dirty["code"]["dirty"] is True and dirty["code"]["diff_file"] == "provenance.diff"
    assert "+# a local change" in (work / "lightning_logs/version_1/provenance.diff").read_text()

    outside = copy_project(tmp_path / "no_git")
    result = run(outside, "fit", "--data.data_dir", str(tiny_idx), *TINY, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert provenance(work, 2)["code"]["commit"] == "no git"


@pytest.mark.slow  # a long real run or a server: in `pytest -m slow` and CI, to keep the default run short
def test_every_tracker_holds_the_provenance_and_hardware_use(tmp_path: Path, tiny_idx: Path) -> None:
    result = run(REPO / "cli.py", "fit", "-c", str(REPO / "configs/all_trackers.yaml"), "--data.data_dir", str(tiny_idx),
                 *TINY, "--trainer.log_every_n_steps", "1", "--run.tags", "[nightly]", "--run.note", "tiny data", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "lightning_logs/version_0"
    fingerprint = provenance(tmp_path)["data"]["fingerprint"]

    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())  # CSV (and TensorBoard) hparams file
    assert hparams["provenance"]["data"]["fingerprint"] == fingerprint
    assert hparams["provenance_end"]["status"] == "finished"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    session = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert session.hparams["provenance/data/fingerprint"].string_value == fingerprint

    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(wandb_file)
    config = {u.key: u.value_json for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert json.loads(config["provenance"])["data"]["fingerprint"] == fingerprint
    tags = [list(r.run.tags) for r in records if r.WhichOneof("record_type") == "run"]
    assert "nightly" in tags[-1]

    ops = neptune_operations(run_dir)
    values = {"/".join(op["path"]): op.get("value") for op in ops}
    assert values["parameters/provenance/data/fingerprint"] == fingerprint
    assert values["sys/description"] == "tiny data" and values["provenance/status"] == "finished"

    metrics = pd.read_csv(run_dir / "metrics.csv")
    cpu = metrics["train/system/cpu_percent"].dropna()
    assert len(cpu) and ((cpu >= 0) & (cpu <= 100 * (torch.get_num_threads() + 64))).all()

    table = run_module("mnist_dlops", "runs", "--csv", "t.csv", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    # dtype=str: a short commit or fingerprint of digits only (8354874329) would otherwise be read as a number
    row = pd.read_csv(tmp_path / "t.csv", dtype=str).iloc[0]
    assert row["data"] == fingerprint[:12] and row["tags"] == "nightly" and row["note"] == "tiny data"
    code = provenance(tmp_path)["code"]
    assert row["commit"] == code["commit"][:10] + ("+dirty" if code.get("dirty") else "")


def test_the_fingerprint_cache_sees_a_file_rewritten_with_its_old_size_and_mtime(tmp_path: Path) -> None:
    """Zeroed labels, same size, mtime set back (``touch -d``): the cache must not vouch for the old hash."""
    import os

    from conftest import make_idx_set

    from mnist_dlops.data.fingerprint import data_fingerprint

    root = make_idx_set(tmp_path / "data", gz=False)
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    official = data_fingerprint(root, files)
    labels = next(p for p in files if p.name.startswith("t10k-labels"))
    info = labels.stat()
    data = labels.read_bytes()
    labels.write_bytes(data[:8] + bytes(len(data) - 8))
    os.utime(labels, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert labels.stat().st_size == info.st_size and labels.stat().st_mtime_ns == info.st_mtime_ns
    assert data_fingerprint(root, files) != official
