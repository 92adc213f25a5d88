"""Closing the loop: feedback stored in a real database, exported as a data version, a retrained model promoted only
when it beats production, and the server switching to it without a restart (slow: real MNIST, a real server)."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import make_idx_set

from mnist_dlops.feedback import FeedbackStore, export, sign, verify

SECRET = bytes(range(32))


def test_a_signed_prediction_round_trips_and_a_forged_one_does_not() -> None:
    image = np.arange(784, dtype=np.uint8).reshape(28, 28)
    token = sign(SECRET, image, "ab" * 32, "7", "digits", "3")
    back = verify(SECRET, token)
    assert (back["image"] == image).all() and (back["p"], back["m"], back["v"]) == ("7", "digits", "3")
    body, mac = token.rsplit(".", 1)
    assert len(base64.urlsafe_b64decode(mac + "=")) == 32  # HMAC-SHA256, as docs/closing-the-loop.md says
    for forged in (f"{body}.{'0' * 32}", f"{body[:-2]}xy.{mac}", "nonsense", None, 7, "a.b.c"):
        with pytest.raises(ValueError, match="prediction_id"):
            verify(SECRET, forged)
    with pytest.raises(ValueError):
        verify(bytes(32), token)  # another server's secret


def test_the_secret_is_private_from_its_first_byte_and_kept(tmp_path: Path) -> None:
    """The server's signing secret is made once, readable by its owner only, and read back the same after."""
    from mnist_dlops.feedback import load_secret

    secret = load_secret(tmp_path)
    file = next(tmp_path.iterdir())
    assert len(secret) == 32 and oct(file.stat().st_mode & 0o777) == oct(0o600)
    assert load_secret(tmp_path) == secret and list(tmp_path.iterdir()) == [file]  # no temporary file left


def test_export_deduplicates_keeps_the_newest_label_and_holds_out_by_hash(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    for i, image in enumerate(images):
        prediction = verify(SECRET, sign(SECRET, image, f"{i:064x}", "1", "digits", "1"))
        store.add(prediction, str(i % 10), "127.0.0.1")
    again = verify(SECRET, sign(SECRET, images[0], "0" * 64, "1", "digits", "1"))
    store.add(again, "9", "127.0.0.1")  # the same image relabelled: the newest label wins
    counts = export(store.url, str(tmp_path / "feedback"), holdout=0.25)
    assert counts["items"] == 41 and counts["distinct"] == 40 and counts["train"] + counts["test"] == 40
    assert 3 <= counts["test"] <= 20
    files = {p.name: p.parent.name for p in (tmp_path / "feedback").rglob("*.png")}
    assert len(files) == 40
    import hashlib

    assert files[hashlib.sha256(images[0].tobytes()).hexdigest()[:16] + ".png"] == "9"
    first = {p.relative_to(tmp_path / "feedback") for p in (tmp_path / "feedback").rglob("*.png")}
    export(store.url, str(tmp_path / "feedback"), holdout=0.25)  # a later export: every image on the same side
    assert {p.relative_to(tmp_path / "feedback") for p in (tmp_path / "feedback").rglob("*.png")} == first


# --- Over HTTP, with a real server ----------------------------------------------------------------------------------


def post(url: str, body: object, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.slow  # a server: in `pytest -m slow` and CI
def test_feedback_over_http_refuses_bad_items_and_survives_sigkill(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from test_serve import start_server

    from mnist_dlops.cli.app import cli_main

    monkeypatch.chdir(tmp_path)
    make_idx_set(tmp_path / "data")
    cli_main(["fit", "--data.data_dir", "data", "--data.download", "false", "--data.val_size", "20",
              "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
              "--trainer.logger", "false"])
    server, url = start_server(tmp_path, "--ckpt_path", "best", "--workers", "1", "--feedback_per_minute", "5")
    try:
        digit = np.zeros((28, 28), dtype=int)
        digit[6:22, 12:16] = 255
        status, answer = post(f"{url}/predict", {"images": [digit.tolist()]})
        assert status == 200
        token = answer["predictions"][0]["prediction_id"]
        bad = {
            "malformed": [1, 2], "no id": {"label": "1"}, "unknown id": {"prediction_id": token[:-4] + "0000", "label": "1"},
            "label out of range": {"prediction_id": token, "label": "12"}, "extra key": {"prediction_id": token,
                                                                                      "label": "1", "x": 1},
        }
        for name, body in bad.items():
            status, answer = post(f"{url}/feedback", body)
            assert status == 400 and "\n" not in answer["detail"], (name, status, answer)
        status, answer = post(f"{url}/feedback", {"prediction_id": token, "label": "1"})
        assert status == 200 and answer["stored"] == 1
        os.killpg(server.pid, signal.SIGKILL)  # right after the acknowledgement
        server.wait(timeout=30)
        with sqlite3.connect(tmp_path / "lightning_logs/feedback.db") as db:
            rows = db.execute("SELECT label, predicted, image FROM feedback").fetchall()
        assert len(rows) == 1 and rows[0][0] == "1"
        assert (np.frombuffer(rows[0][2], dtype=np.uint8).reshape(28, 28) == digit).all()
        server, url = start_server(tmp_path, "--ckpt_path", "best", "--workers", "1", "--feedback_per_minute", "5")
        with sqlite3.connect(tmp_path / "lightning_logs/feedback.db", timeout=0) as other:  # a store that cannot
            other.execute("BEGIN EXCLUSIVE")                                                 # take the item now
            status, answer = post(f"{url}/feedback", {"prediction_id": token, "label": "1"})
            assert status == 503 and "nothing was stored" in answer["detail"], (status, answer)
            assert post(f"{url}/predict", {"images": [digit.tolist()]})[0] == 200  # predictions go on
            other.rollback()
        statuses = [post(f"{url}/feedback", {"prediction_id": token, "label": "1"})[0] for _ in range(6)]
        assert statuses == [200] * 4 + [429] * 2  # the id stays valid after a restart; a flood is refused
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


def thick(images: np.ndarray) -> np.ndarray:
    """Strokes thickened by 2 pixels: digits as a marker draws them, which MNIST's pen did not."""
    out = images.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out = np.maximum(out, np.roll(np.roll(images, dy, axis=1), dx, axis=2))
    return out


@pytest.mark.slow  # three trainings on real MNIST, a registry and a server under load: in `pytest -m slow` and CI
def test_the_loop_feedback_retrain_gate_and_hot_switch(tmp_path: Path, mnist_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    from test_serve import start_server, stop_group

    from mnist_dlops.cli.app import cli_main
    from mnist_dlops.commands.datasets import main as datasets_main
    from mnist_dlops.commands.promote import promote
    from mnist_dlops.commands.registry import register
    from mnist_dlops.data.idx import IDX_FILES, find_idx, read_idx

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    short = ["--data.download", "false", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "120",
             "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", "--trainer.logger", "false"]
    cli_main(["fit", "--data.data_dir", str(mnist_dir), *short])
    register(ckpt_path="lightning_logs/version_0", name="digits", alias="production")
    downloads = Path(tempfile.gettempdir())
    before = set(downloads.glob("mnist-dlops-serve-*"))
    server, url = start_server(tmp_path, "--model", "models:/digits@production", "--workers", "2",
                               "--reload_interval", "1", "--feedback_per_minute", "1000")
    failures, versions, running = [], set(), threading.Event()
    try:
        # Users draw thick digits and correct the model: 300 items of feedback.
        test_images = read_idx(find_idx(mnist_dir, IDX_FILES["test"][0]), 0x00000803)
        test_labels = read_idx(find_idx(mnist_dir, IDX_FILES["test"][1]), 0x00000801)
        drawn, truth = thick(test_images[:300]), test_labels[:300]
        for start in range(0, 300, 20):
            status, answer = post(f"{url}/predict", {"images": drawn[start : start + 20].astype(int).tolist()})
            assert status == 200
            for prediction, label in zip(answer["predictions"], truth[start : start + 20]):
                assert post(f"{url}/feedback", {"prediction_id": prediction["prediction_id"],
                                                "label": str(int(label))})[0] == 200
        # A new data version from the feedback, and MNIST plus its training share.
        datasets_main(["feedback", "--out", "data/feedback", "--holdout", "0.3"])
        datasets_main(["merge", str(mnist_dir), "data/feedback/train", "--out", "data/plus"])
        cli_main(["fit", "--data.data_dir", "data/plus", *short])
        register(ckpt_path="lightning_logs/version_1", name="digits")
        cli_main(["fit", "--data.data_dir", str(mnist_dir), *short[:-6], "--trainer.limit_train_batches", "3",
                  "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", "--trainer.logger", "false"])
        register(ckpt_path="lightning_logs/version_2", name="digits")

        def load() -> None:  # clients keep asking while the alias moves
            digit = test_images[:1].astype(int).tolist()
            while running.is_set():
                status, answer = post(f"{url}/predict", {"images": digit}, timeout=30)
                if status != 200:
                    failures.append((status, answer))
                else:
                    versions.add(answer["model"]["version"])

        running.set()
        clients = [threading.Thread(target=load) for _ in range(4)]
        for client in clients:
            client.start()
        # The worse candidate (3 batches of training) is refused; the alias stays.
        assert promote("digits", 3, mnist_dir=str(mnist_dir), feedback_dir="data/feedback", tolerance=0.01) is False
        # The retrained one is better on the held-out feedback and not worse on MNIST: promoted.
        assert promote("digits", 2, mnist_dir=str(mnist_dir), feedback_dir="data/feedback", tolerance=0.01) is True
        for _ in range(60):
            if "2" in versions:
                break
            time.sleep(0.5)
        time.sleep(2)
        running.clear()
        for client in clients:
            client.join(timeout=60)
        assert not failures, failures[:3]
        assert versions == {"1", "2"}, versions
        metadata = json.load(urllib.request.urlopen(f"{url}/metadata", timeout=10))
        assert metadata["model"]["version"] == "2"
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/lightning_logs/mlflow.db")
        refused = client.get_model_version("digits", "3").tags
        passed = client.get_model_version("digits", "2").tags
        assert refused["gate.passed"] == "False" and passed["gate.passed"] == "True"
        # A first holder of an alias is judged against a floor; a small loss within the tolerance says so.
        assert promote("digits", 3, alias="canary", mnist_dir=str(mnist_dir), floor=0.99) is False
        assert "stays unset" in capsys.readouterr().out
        assert promote("digits", 2, alias="canary", mnist_dir=str(mnist_dir), floor=0.5) is True
        assert promote("digits", 3, alias="canary", mnist_dir=str(mnist_dir), tolerance=1.0) is True
        assert "within the allowed 1.0" in capsys.readouterr().out
        from mnist_dlops.errors import ConfigError

        with pytest.raises(ConfigError, match="feedback_dir=nowhere: no such folder"):
            promote("digits", 2, mnist_dir=str(mnist_dir), feedback_dir="nowhere")
        assert float(passed["gate.feedback_test.acc"]) > float(passed["gate.feedback_test.champion_acc"])
    finally:
        running.clear()
        stop_group(server)
    assert set(downloads.glob("mnist-dlops-serve-*")) == before  # the server's downloads went with it


@pytest.mark.slow  # a PostgreSQL server and a model server: in `pytest -m slow` and CI (skipped without pg_ctl)
def test_the_loop_with_feedback_and_registry_on_postgresql(tmp_path: Path, postgres: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Feedback store and MLflow store in one PostgreSQL server: predict, correct, export, gate, switch."""
    from test_serve import start_server, stop_group

    from mnist_dlops.cli.app import cli_main
    from mnist_dlops.commands.datasets import main as datasets_main
    from mnist_dlops.commands.promote import promote
    from mnist_dlops.commands.registry import register

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres.replace("postgresql://", "postgresql+psycopg2://"))
    make_idx_set(tmp_path / "data")
    for batches in ("2", "6"):
        cli_main(["fit", "--data.data_dir", "data", "--data.download", "false", "--data.val_size", "20",
                  "--trainer.max_epochs", "1", "--trainer.limit_train_batches", batches,
                  "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", "--trainer.logger", "false"])
    register(ckpt_path="lightning_logs/version_0", name="pg-digits", alias="production")
    register(ckpt_path="lightning_logs/version_1", name="pg-digits")
    server, url = start_server(tmp_path, "--model", "models:/pg-digits@production", "--workers", "1",
                               "--tracking_uri", os.environ["MLFLOW_TRACKING_URI"], "--feedback_url", postgres,
                               "--reload_interval", "1")
    try:
        rng = np.random.default_rng(1)
        images = rng.integers(0, 256, size=(12, 28, 28)).tolist()
        status, answer = post(f"{url}/predict", {"images": images})
        assert status == 200 and answer["model"]["version"] == "1"
        for i, prediction in enumerate(answer["predictions"]):
            assert post(f"{url}/feedback", {"prediction_id": prediction["prediction_id"], "label": str(i % 10)})[0] == 200
        datasets_main(["feedback", "--out", "data/feedback", "--url", postgres, "--holdout", "0.5"])
        assert len(list((tmp_path / "data/feedback").rglob("*.png"))) == 12
        assert promote("pg-digits", 2, mnist_dir="data", feedback_dir="data/feedback", tolerance=1.0) is True
        for _ in range(60):
            if post(f"{url}/predict", {"images": images[:1]})[1]["model"]["version"] == "2":
                break
            time.sleep(0.5)
        assert post(f"{url}/predict", {"images": images[:1]})[1]["model"]["version"] == "2"
    finally:
        stop_group(server)
