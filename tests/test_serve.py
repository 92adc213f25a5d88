"""What the server loads and how it starts and stops: every kind of model with the checkpoint's probabilities, a
stranger's registered model refused before it runs code, SIGTERM, bad options and fake exports. One model is trained
on real MNIST and registered for the module (``lab``); the HTTP API and the page: tests/test_serve_http.py.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, free_port
from PIL import Image

from mnist_dlops.cli.app import cli_main
from mnist_dlops.commands.export import export
from mnist_dlops.commands.registry import register
from mnist_dlops.data.idx import IDX_FILES, find_idx, read_idx
from mnist_dlops.errors import CheckpointError
from mnist_dlops.model.served import check, resolve
from mnist_dlops.module import rebuild

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"


def mnist_test(mnist_dir: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(find_idx(mnist_dir, IDX_FILES["test"][0]), 0x00000803)[:n]
    labels = read_idx(find_idx(mnist_dir, IDX_FILES["test"][1]), 0x00000801)[:n]
    return images, labels.astype(int)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """One model trained on real MNIST (one epoch) and registered as mnist-digits@production."""
    lab = tmp_path_factory.mktemp("serve")
    here = os.getcwd()
    os.chdir(lab)
    previous = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        cli_main(["fit", "--data.data_dir", str(mnist_dir), "--data.download", "false", "--trainer.max_epochs", "1",
                  "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
                  "--trainer.enable_model_summary", "false", "--trainer.logger", "false"])
        register(ckpt_path="best", name="mnist-digits", alias="production")
    finally:
        os.chdir(here)
        if previous is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    return lab


def get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def post(url: str, body: bytes, content_type: str, timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "----mnist-dlops-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def start_server(lab: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """``mnist-dlops serve <flags>`` on a free loopback port, once healthy: (its process, its URL)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(lab / "server.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mnist_dlops", "serve", *flags, "--host", "127.0.0.1", "--port", str(port)],
            cwd=lab, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):  # up to two minutes for the workers to load the model
        if process.poll() is not None:
            pytest.fail(f"the server exited: {(lab / 'server.log').read_text()[-3000:]}")
        try:
            if get(f"{url}/health", timeout=2)[0] == 200:
                return process, url
        except OSError:
            pass
        time.sleep(0.5)
    stop_group(process)
    pytest.fail("the server did not become healthy within two minutes")


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server and its worker processes, SIGKILL to any left after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def test_every_kind_of_model_serves_the_checkpoints_probabilities(lab: Path, mnist_dir: Path) -> None:
    """A checkpoint, its TorchScript and ONNX exports and the registered version load through the same checks and
    give the checkpoint's probabilities."""
    images = torch.from_numpy(mnist_test(mnist_dir, 16)[0][:, None].copy())
    best = sorted((lab / "lightning_logs/version_0/checkpoints").glob("epoch*.ckpt"))[0]
    export(str(best), out_dir=str(lab / "exported"))
    with torch.no_grad():
        expected = rebuild(best)(images).softmax(-1)
    runs_dir = str(lab / "lightning_logs")
    for served in (resolve(None, str(best), runs_dir), resolve(str(lab / "exported/model.pt"), None, runs_dir),
                   resolve(str(lab / "exported/model.onnx"), None, runs_dir),
                   resolve("models:/mnist-digits@production", None, runs_dir)):
        check(served)
        assert served.class_names == [str(c) for c in range(10)]
        assert (served.load()(images) - expected).abs().max() <= 1e-5, served.format


class _Payload:
    """Unpickling this runs a shell command that leaves a marker file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_strangers_registered_model_never_runs_code(lab: Path, tmp_path: Path) -> None:
    """Registered versions that would run code when loaded (a pickled PyTorch model, a python_function model, a
    TorchScript archive with a pickle payload inside) are refused by the server's loader; no marker appears."""
    import zipfile

    import mlflow

    marker = tmp_path / "PWNED"
    uri = f"sqlite:///{lab}/lightning_logs/mlflow.db"
    mlflow.set_tracking_uri(uri)
    folder = tmp_path / "evil"
    # 1. A "pytorch" flavor whose model.pth is a pickle of the payload.
    good = sorted((lab / "lightning_logs/version_0/checkpoints").glob("epoch*.ckpt"))[0]
    export(str(good), formats=["torchscript"], out_dir=str(tmp_path / "ts"))
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(torch.jit.load(str(tmp_path / "ts/model.pt")), name="model",
                                        serialization_format="pickle", pip_requirements=["torch"],
                                        metadata={"class_names": [str(c) for c in range(10)]})
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(folder)))
    (local / "data/model.pth").write_bytes(pickle.dumps(_Payload(marker)))
    with mlflow.start_run() as run:  # the tampered folder, as a stranger would log it
        mlflow.log_artifacts(str(local), "model")
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("evil")
    client.create_model_version("evil", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)  # version 1
    # 2. A python_function model: cloudpickled Python. MLflow advises type hints on its predict as the class is
    # defined, under its own simplefilter("once") that no ignore filter reaches: recorded here, not shown.
    with warnings.catch_warnings(record=True):

        class Hostile(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input):
                return model_input

    with mlflow.start_run() as run2:
        mlflow.pyfunc.log_model(name="model", python_model=Hostile(), pip_requirements=["mlflow"])
    client.create_model_version("evil", f"runs:/{run2.info.run_id}/model", run_id=run2.info.run_id)  # version 2
    # 3. A TorchScript archive with the payload as its pickled constants.
    forged = tmp_path / "forged"
    shutil.copytree(local, forged)
    with zipfile.ZipFile(tmp_path / "ts/model.pt") as src, zipfile.ZipFile(forged / "data/model.pth", "w") as out:
        for name in src.namelist():
            out.writestr(name, pickle.dumps(_Payload(marker)) if name.endswith(".pkl") else src.read(name))
    with mlflow.start_run() as run3:
        mlflow.log_artifacts(str(forged), "model")
    client.create_model_version("evil", f"runs:/{run3.info.run_id}/model", run_id=run3.info.run_id)  # version 3

    runs_dir = str(lab / "lightning_logs")
    for version, refusal in (("1", "pickled PyTorch model"), ("2", "python_function")):
        with pytest.raises(CheckpointError, match=refusal):
            resolve(f"models:/evil/{version}", None, runs_dir)
    served = resolve("models:/evil/3", None, runs_dir)
    # TorchScript's own unpickler resolves no Python global: the load fails, as one line naming the version.
    with pytest.raises(CheckpointError, match="cannot be loaded as torchscript"):
        check(served)
    # Through the command, as a user would run it: one line, exit 2, and the server never starts.
    done = subprocess.run([sys.executable, "-m", "mnist_dlops", "serve", "--model", "models:/evil/1",
                           "--runs_dir", runs_dir, "--port", str(free_port())],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    last = done.stderr.strip().splitlines()[-1]  # after MLflow's download progress bar
    assert done.returncode == 2 and last.startswith("error: model=models:/evil/1") and "Traceback" not in done.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_sigterm_to_the_server_alone_stops_every_process_it_started(lab: Path) -> None:
    """As ``docker stop`` or systemd do: SIGTERM to the main process only; its workers and HTTP server go with it."""
    import psutil

    process, url = start_server(lab, "--ckpt_path", "best", "--workers", "2")
    try:
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 4  # the queue manager, two model workers, the HTTP server (and a resource tracker)
        assert post(f"{url}/predict", _png(np.zeros((28, 28), np.uint8)), "image/png")[0] == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running after SIGTERM: {[p.cmdline()[:3] for p in alive]}"
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no holder
            s.bind(("127.0.0.1", int(url.rsplit(":", 1)[1])))  # the port is free for the next start
    finally:
        stop_group(process)


def test_sigterm_while_serving_is_ctrl_c_and_the_callers_handler_comes_back() -> None:
    """In the serving process SIGTERM takes LitServe's Ctrl+C path; a Python caller gets its own handler back."""
    from mnist_dlops.serve.command import stop_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with stop_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted as soon as the handler runs
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("flags,fragment", [
    (["--port", "-1"], "port=-1"), (["--port", "70000"], "port=70000"), (["--workers", "0"], "workers=0"),
    (["--max_batch_size", "0"], "max_batch_size=0"), (["--batch_timeout", "-1"], "batch_timeout=-1"),
    (["--host", "999.1.1.1"], "host=999.1.1.1"), (["--max_upload_mb", "0"], "max_upload_mb=0"),
])
def test_bad_server_options_are_one_line(capsys: pytest.CaptureFixture, flags: list[str], fragment: str) -> None:
    from mnist_dlops.serve.command import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt_path", "nosuch.ckpt", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"error: {fragment}"), err


def test_fake_exports_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A file named model.onnx or model.pt that is no such thing: one line naming it, before any worker starts."""
    import zipfile

    from mnist_dlops.serve.command import main

    (tmp_path / "classes.txt").write_text("0\n1\n")
    (tmp_path / "model.onnx").write_bytes(b"not a protobuf")
    with zipfile.ZipFile(tmp_path / "model.pt", "w") as archive:
        archive.writestr("archive/code/x.py", "not TorchScript")
    for name in ("model.onnx", "model.pt"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", str(tmp_path / name)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and err.splitlines()[-1].startswith(f"error: {tmp_path / name}: cannot be"), err
