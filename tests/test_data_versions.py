"""Data versions on the real DVC, in temporary git repositories: made, listed, trained on by name, registered,
checked out byte for byte; bad versions, missing bytes and modified copies as one line; the pipeline (slow)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_idx_set

from mnist_dlops.cli.app import cli_main
from mnist_dlops.commands.datasets import main as datasets_main
from mnist_dlops.commands.datasets import versions
from mnist_dlops.commands.registry import register
from mnist_dlops.commands.registry import versions as model_versions

DVC = str(Path(sys.executable).with_name("dvc"))
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
         "--data.val_size", "20", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
         "--trainer.logger", "false", "--data.download", "false"]


def sh(cwd: Path, *command: str) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, (command, result.stdout[-8000:], result.stderr[-4000:])
    return result.stdout


def md5s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def new_repo(path: Path) -> Path:
    """A git repository with DVC, analytics off and a local-folder default remote beside it."""
    path.mkdir()
    sh(path, "git", "init", "-q")
    sh(path, "git", "config", "user.email", "test@example.com")
    sh(path, "git", "config", "user.name", "test")
    sh(path, DVC, "init", "-q")
    sh(path, DVC, "config", "core.analytics", "false")
    sh(path, DVC, "remote", "add", "-d", "local", str(path.parent / "remote"))
    (path / ".gitignore").write_text("/lightning_logs/\n")  # dvc add ignores data/mnist in data/.gitignore
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-qm", "dvc")
    return path


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two versions of data/mnist: v1, and v2 with 50 of its 300 training labels changed."""
    root = new_repo(tmp_path / "repo")
    make_idx_set(root / "data" / "mnist")
    monkeypatch.chdir(root)
    datasets_main(["add", "data/mnist", "--tag", "v1"])
    datasets_main(["relabel", "data/mnist", "--n", "50"])
    datasets_main(["add", "data/mnist", "--tag", "v2"])
    return root


def test_two_versions_train_register_and_check_out_byte_for_byte(repo: Path, capsys: pytest.CaptureFixture) -> None:
    listed = versions("data/mnist")
    assert [row["tags"] for row in listed] == ["v2", "v1"] and listed[0]["md5"] != listed[1]["md5"]
    assert all(row["files"] == 4 for row in listed)
    v2_files = md5s(repo / "data/mnist")
    # Train on each by name; the working copy (v2) is neither read for v1 nor changed.
    for version in ("v1", "v2"):
        cli_main(["fit", "--data.data_dir", "data/mnist", "--data.version", version, *SHORT])
    assert md5s(repo / "data/mnist") == v2_files
    recorded = [yaml.safe_load((repo / f"lightning_logs/version_{i}/provenance.yaml").read_text())["data"]["version"]
                for i in (0, 1)]
    assert [r["tags"] for r in recorded] == [["v1"], ["v2"]]
    assert [r["md5"][:12] for r in recorded] == [listed[1]["md5"], listed[0]["md5"]]
    # Each registered model version names the data version its run trained on.
    for i in (0, 1):
        register(ckpt_path=f"lightning_logs/version_{i}", name="digits")
    labels = {row["version"]: row["data_version"] for row in model_versions("digits")}
    assert labels[1].startswith("v1:") and labels[2].startswith("v2:") and labels[1] != labels[2]
    # dvc checkout of each version restores its bytes exactly.
    sh(repo, "git", "checkout", "-q", "v1", "--", "data/mnist.dvc")
    sh(repo, DVC, "checkout", "-q", "data/mnist.dvc")
    v1_files = md5s(repo / "data/mnist")
    assert v1_files != v2_files and v1_files["train-images-idx3-ubyte.gz"] == v2_files["train-images-idx3-ubyte.gz"]
    sh(repo, "git", "checkout", "-q", "v2", "--", "data/mnist.dvc")
    sh(repo, DVC, "checkout", "-q", "data/mnist.dvc")
    assert md5s(repo / "data/mnist") == v2_files
    # A plain run on the working copy records it too, and the runs table shows both versions.
    cli_main(["fit", "--data.data_dir", "data/mnist", *SHORT])
    capsys.readouterr()
    from mnist_dlops.commands.runs import runs

    assert [label.split(":")[0] for label in runs(sort="run", ascending=True)["data_version"]] == ["v1", "v2", "v2"]


def fails(args: list[str], capsys: pytest.CaptureFixture, *fragments: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err.splitlines()[-1], err
    return err


def test_bad_versions_are_one_line_and_lose_nothing(repo: Path, capsys: pytest.CaptureFixture) -> None:
    before = md5s(repo / "data/mnist")
    fails(["fit", "--data.data_dir", "data/mnist", "--data.version", "v9", *SHORT], capsys,
          "data.version=v9", "no such git revision")
    # A modified working copy of tracked data: no run may claim a version it did not read.
    labels = repo / "data/mnist/t10k-labels-idx1-ubyte.gz"
    original = labels.read_bytes()
    labels.write_bytes(original + b"x")
    fails(["fit", "--data.data_dir", "data/mnist", *SHORT], capsys, "differs from its DVC version",
          "dvc checkout data/mnist.dvc")
    labels.write_bytes(original)
    # The bytes of v1 in neither the cache nor the remote (both emptied): one line naming the version.
    shutil.rmtree(repo / ".dvc/cache")
    shutil.rmtree(repo.parent / "remote")
    fails(["fit", "--data.data_dir", "data/mnist", "--data.version", "v1", *SHORT], capsys,
          "data.version=v1", "neither the DVC cache nor a reachable remote")
    assert md5s(repo / "data/mnist") == before
    assert not list((repo / ".dvc/tmp").glob("mnist_dlops-versions/*"))  # nothing half-read is kept
    assert not list(repo.glob("lightning_logs/version_*"))


def test_data_outside_dvc_says_so_and_still_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_idx_set(tmp_path / "data")
    cli_main(["fit", "--data.data_dir", "data", *SHORT, "--log_level", "info"])
    assert "data: data is not tracked by DVC" in caplog.text
    record = yaml.safe_load((tmp_path / "lightning_logs/version_0/provenance.yaml").read_text())["data"]
    assert record["version"] is None and len(record["fingerprint"]) == 64


def test_new_versions_from_pngs_and_the_seeds_png_tree(repo: Path, tmp_path: Path) -> None:
    """merge adds labelled PNGs to the training split; png writes the seeds' tree, which trains as a PNG source."""
    from PIL import Image

    extra = tmp_path / "extra"
    for digit in (3, 7):
        (extra / str(digit)).mkdir(parents=True)
        Image.new("L", (40, 40), 255).save(extra / str(digit) / "a.png")
    datasets_main(["merge", "data/mnist", str(extra), "--out", str(tmp_path / "plus")])
    from mnist_dlops.data.idx import read_idx_set

    assert len(read_idx_set(tmp_path / "plus")["train"][1]) == 302
    datasets_main(["png", str(tmp_path / "plus"), str(tmp_path / "pngs")])
    assert len(list((tmp_path / "pngs/train").rglob("*.png"))) == 302
    cli_main(["fit", "--data.data_dir", str(tmp_path / "pngs"), "--data.source", "png", *SHORT])


@pytest.mark.slow  # three trainings on real MNIST and DVC's experiments: in `pytest -m slow` and CI
def test_the_pipeline_reruns_only_what_changed(tmp_path: Path, mnist_dir: Path) -> None:
    """The repository's own dvc.yaml and configs on a fresh clone: every stage once, then nothing, then fit, test
    and register after one param changes; `dvc exp run -S` and `dvc exp show --json` list both experiments."""
    root = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(REPO), str(root))
    for name in ("mnist_dlops", "cli.py", "dvc.yaml", "configs", ".dvc/config", ".dvc/.gitignore", ".dvcignore",
                 ".gitignore", "data/mnist.dvc", "data/.gitignore"):
        source, target = REPO / name, root / name  # the working tree as it is now, committed or not
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    sh(root, "git", "config", "user.email", "test@example.com")
    sh(root, "git", "config", "user.name", "test")
    (root / "data/mnist").mkdir(parents=True, exist_ok=True)
    for file in mnist_dir.glob("*-ubyte.gz"):
        shutil.copy(file, root / "data/mnist")
    sh(root, DVC, "config", "--local", "core.analytics", "false")
    sh(root, DVC, "status", "data/mnist.dvc")  # the real MNIST is the committed data version
    params = root / "configs/pipeline.yaml"
    config = yaml.safe_load(params.read_text())
    config["trainer"].update(max_epochs=1, limit_train_batches=40, limit_val_batches=5, limit_test_batches=5)
    params.write_text(yaml.safe_dump(config, sort_keys=False))
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "a short pipeline")

    def ran(output: str) -> list[str]:
        return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]

    loop = ["feedback", "plus", "retrain", "candidate", "promote"]  # closing the loop: no feedback yet on a clone
    first = ran(sh(root, DVC, "repro"))
    assert sorted(first) == sorted(["data", "fit", "test", "register", *loop]) and len(first) == 9
    assert first.index("data") < first.index("fit") < first.index("test") < first.index("register")
    assert "-> version 2" in (root / "pipeline/promotion.txt").read_text()  # the first candidate takes @production
    sh(root, "git", "add", "dvc.lock")
    sh(root, "git", "commit", "-qm", "lock")
    assert ran(sh(root, DVC, "repro")) == ["feedback"]  # reads a database: always exported, nothing else reruns
    config["model"]["optimizer"]["init_args"]["lr"] = 0.005
    params.write_text(yaml.safe_dump(config, sort_keys=False))
    # A stage that fails (a value the config refuses) leaves the previous outputs as they were.
    before = {str(p.relative_to(root)): p.read_bytes() for p in (root / "pipeline/fit").rglob("*") if p.is_file()}
    config["model"]["optimizer"]["init_args"]["lr"] = -1
    params.write_text(yaml.safe_dump(config, sort_keys=False))
    failed = subprocess.run([DVC, "repro"], cwd=root, capture_output=True, text=True, env=ENV, timeout=600)
    assert failed.returncode != 0 and "model.optimizer.init_args.lr=-1" in failed.stdout + failed.stderr
    assert {str(p.relative_to(root)): p.read_bytes() for p in (root / "pipeline/fit").rglob("*") if p.is_file()} == before
    config["model"]["optimizer"]["init_args"]["lr"] = 0.005
    params.write_text(yaml.safe_dump(config, sort_keys=False))
    # The param reruns fit, test, register and the retraining; the feedback export (unchanged) does not redo plus.
    assert sorted(ran(sh(root, DVC, "repro"))) == sorted(["feedback", "fit", "test", "register", "retrain",
                                                          "candidate", "promote"])
    assert "version 3" in (root / "pipeline/registered.txt").read_text()
    data = yaml.safe_load((root / "pipeline/fit/provenance.yaml").read_text())["data"]["version"]
    assert data["md5"] == yaml.safe_load((root / "data/mnist.dvc").read_text())["outs"][0]["md5"]
    sh(root, "git", "commit", "-qam", "lr 0.005")
    sh(root, DVC, "exp", "run", "-S", "configs/pipeline.yaml:model.optimizer.init_args.lr=0.003")
    shown = json.loads(sh(root, DVC, "exp", "show", "--json"))
    found = {}
    for entry in shown:
        for row in [entry, *[rev for exp in entry.get("experiments") or [] for rev in exp.get("revs") or []]]:
            data = row.get("data") or {}
            lr = data["params"]["configs/pipeline.yaml"]["data"]["model"]["optimizer"]["init_args"]["lr"]
            acc = data["metrics"]["pipeline/test/metrics.test.json"]["data"]["test/acc"]
            found[row.get("name") or row["rev"]] = (lr, acc)
    lrs = {lr for lr, _ in found.values()}
    assert {0.005, 0.003} <= lrs and all(0 < acc <= 1 for _, acc in found.values()), found


def test_a_version_needs_dvcs_set_up_committed(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """DVC reads a revision with that revision's .dvc/config: a version made before it is committed is refused."""
    root = tmp_path / "repo"
    root.mkdir()
    sh(root, "git", "init", "-q")
    sh(root, DVC, "init", "-q")
    make_idx_set(root / "data" / "mnist")
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as exit_info:
        datasets_main(["add", "data/mnist", "--tag", "v1"])
    assert exit_info.value.code == 2
    assert "commit DVC's set-up first" in capsys.readouterr().err
    assert not (root / "data/mnist.dvc").exists()
