"""The README's own commands, in the README's order, on a fresh folder: each succeeds, the registered version is the
run the README says, the server answers from it, and no line on stderr reads as trouble that we could prevent."""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, free_port

# Lines on stderr that are news, not trouble: Lightning's own start-up and end lines, our one-line notes.
NEWS = re.compile(
    r"^(Seed set to|GPU available|TPU available|HPU available|LOCAL_RANK|`Trainer\.fit` stopped|Restoring states"
    r"|Loaded model weights|  \| Name|--|\d|[┏┃┡│└━]|data: .* is not tracked by DVC|Trainer already configured"
    r"|trial \d|study |best:|  |rerun it|plots:|trials:|sweep |Testing|Predicting|wrote )"
)
TROUBLE = re.compile(r"(?i)warning|traceback|error|deprecat|exception")


def block(marker: str, after: str = "") -> list[str]:
    """The commands of the README's first bash block after ``marker`` (and ``after``), comments dropped."""
    text = (REPO / "README.md").read_text().split(marker, 1)[1]
    text = text.split(after, 1)[-1] if after else text
    body = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in body.splitlines() if line.strip()]


def walkthrough() -> list[str]:
    """The commands of the README's walkthrough block."""
    return block("<!-- walkthrough -->")


def digit_png(mnist_dir: Path, path: Path) -> None:
    """MNIST's first test digit (a 7), dark on white at 280x280, as a phone photo of one would be."""
    from PIL import Image

    from mnist_dlops.data.idx import IDX_FILES, find_idx, read_idx

    digit = read_idx(find_idx(mnist_dir, IDX_FILES["test"][0]), 0x00000803)[0]
    buffer = io.BytesIO()
    Image.fromarray(255 - digit).resize((280, 280)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())


@pytest.mark.slow  # a full fit, a sweep, a registration and a server: in `pytest -m slow` and CI
def test_the_readmes_commands_in_order(tmp_path: Path, mnist_dir: Path) -> None:
    commands = walkthrough()
    assert commands[0] == "python cli.py fit" and any(c.startswith("curl") for c in commands)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    digit_png(mnist_dir, tmp_path / "digit.png")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    port, server, troubles = free_port(), None, []
    try:
        for command in commands:
            words = shlex.split(command.rstrip("&").strip())
            if words[0] == "curl":
                answer = subprocess.run([*words[:-1], words[-1].replace("8000", str(port))], cwd=tmp_path,
                                        capture_output=True, text=True, timeout=60)
                assert answer.returncode == 0 and '"class":"7"' in answer.stdout, answer
                assert '"version":"1"' in answer.stdout, answer.stdout
                continue
            assert words[0] in ("python", "mnist-dlops"), command  # the project's two spellings
            words = ([sys.executable, str(REPO / "cli.py"), *words[2:]] if words[0] == "python"
                     else [str(Path(sys.executable).with_name("mnist-dlops")), *words[1:]])
            if ("fit" in words and "-c" not in words) or "sweep" in words:
                words += ["--data.data_dir", str(mnist_dir)]  # offline: the README's own note for a fresh machine
            if command.endswith("&"):
                log = open(tmp_path / "server.log", "w")
                server = subprocess.Popen([*words, "--port", str(port)], cwd=tmp_path, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
                for _ in range(240):
                    try:
                        if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                            break
                    except OSError:
                        time.sleep(0.5)
                continue
            done = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, (command, done.stderr[-3000:])
            troubles += [f"{command}: {line}" for line in done.stderr.splitlines()
                         if TROUBLE.search(line) and not NEWS.match(line)]
            if "register" in words:
                assert "version 1: run " in done.stdout and "lightning_logs/version_0," in done.stdout, done.stdout
        assert not troubles, "\n".join(troubles)
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)


@pytest.mark.slow  # git, DVC, three trainings and the pipeline twice: in `pytest -m slow` and CI
def test_the_readmes_data_versions_and_closing_loop_on_a_fresh_clone(tmp_path: Path, mnist_dir: Path) -> None:
    """The README's data-versions and closing-the-loop blocks, word for word, on a fresh clone with MNIST placed as
    the quick start says (copied into data/mnist) and users' corrections in the server's feedback store."""
    import shutil

    import numpy as np

    from mnist_dlops.data.download import MD5
    from mnist_dlops.data.idx import IDX_FILES, find_idx, read_idx
    from mnist_dlops.feedback import FeedbackStore

    clone = tmp_path / "work" / "mnist-dlops"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    (clone / "data" / "mnist").mkdir(parents=True, exist_ok=True)
    for name in MD5:
        shutil.copy(mnist_dir / name, clone / "data" / "mnist")
    who = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost"}
    env = {**os.environ, **who, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def run(command: str) -> str:
        done = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=1200)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
        return done.stdout

    versions = block("## Data versions and the pipeline")
    assert versions[0].startswith("mnist-dlops datasets add data/mnist --tag v1")
    outputs = [run(command) for command in versions]
    assert "version v1" in outputs[0] and "version v2" in outputs[1] and "on branch" in outputs[1]
    assert "|" in outputs[-1]  # dvc exp show --md: a table
    assert "pipeline: dvc.lock" in run("git log --format=%s")  # the README's commit of the pipeline's record
    # Users' corrections, as the server stores them (POST /feedback), before the closing loop exports them.
    images = read_idx(find_idx(mnist_dir, IDX_FILES["test"][0]), 0x00000803)[:40]
    labels = read_idx(find_idx(mnist_dir, IDX_FILES["test"][1]), 0x00000801)[:40]
    store = FeedbackStore(f"sqlite:///{clone / 'lightning_logs' / 'feedback.db'}")
    for image, label in zip(images, labels):
        store.add({"image": np.ascontiguousarray(image), "h": "", "p": str(int(label)), "m": "mnist-digits", "v": "1"},
                  str(int(label)), "127.0.0.1")
    store.engine.dispose()
    loop = [run(command) for command in block("## Closing the loop")]
    assert "40 feedback items" in loop[0] and "version feedback-v1" in loop[0]
    assert "candidate: version" in loop[1] and "mnist-digits@production" in loop[1]
