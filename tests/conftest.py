"""Shared fixtures: the real MNIST copy, a small generated IDX set, a PNG-tree dataset, and a CLI runner."""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MACHINE_TEMP = tempfile.gettempdir()  # before system_temp() gives the tests a temp folder of their own


def find_mnist(repo: Path = REPO, mirrors: tuple[str, ...] | None = None) -> Path:
    """The genuine MNIST files: ``MNIST_DIR``, else ``../shared/data/mnist`` beside the checkout, else the
    repository's ``data/mnist`` (where the quick start puts them), downloaded there with the project's own
    MD5-checked downloader when none holds them. One line (``DataError``) when no copy and no mirror answers."""
    from mnist_dlops.data.download import DEFAULT_MIRRORS, ensure_mnist, missing_files

    if os.environ.get("MNIST_DIR"):
        return Path(os.environ["MNIST_DIR"])
    for folder in (repo.parent / "shared" / "data" / "mnist", repo / "data" / "mnist"):
        if folder.is_dir() and not missing_files(folder):
            return folder
    ensure_mnist(repo / "data" / "mnist", list(mirrors or DEFAULT_MIRRORS))
    return repo / "data" / "mnist"


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random 28x28 uint8 images with labels cycling through 0-9."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def make_idx_set(folder: Path, n_train: int = 300, n_test: int = 100, gz: bool = True) -> Path:
    """Write the four MNIST IDX files, with generated content, into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return folder


def make_png_tree(root: Path, per_class: int = 3, names: dict[int, str] | None = None) -> Path:
    """Write ``root/{train,test}/<class>/*.png`` from generated digits; ``names`` maps labels to folder names."""
    from PIL import Image

    for split, seed in (("train", 0), ("test", 1)):
        images, labels = fake_digits(10 * per_class, seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / (names or {}).get(int(label), str(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")
    return root


@pytest.fixture(scope="session", autouse=True)
def system_temp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A system temp folder of the tests' own, beside their tmp_path folders: the write gate lets every command
    write in the temp folder, and a file a test plants under its tmp_path must be outside it, as on a user's disk."""
    folder = tmp_path_factory.mktemp("system-temp")
    before = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(folder), str(folder)
    yield folder
    tempfile.tempdir = before[0]
    if before[1] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before[1]


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST files (``find_mnist``); none is a failure, not a skip, so CI cannot pass without real data."""
    from mnist_dlops.errors import DataError

    try:
        return find_mnist()
    except DataError as err:
        pytest.fail(f"real MNIST not found nor downloadable: {err} (or set MNIST_DIR)", pytrace=False)


def forge(path: Path, out: Path, config: Callable[[dict], object],
          hparams: Callable[[dict], object] = lambda hparams: None) -> Path:
    """A copy of checkpoint ``path`` at ``out`` whose stored run config (and hyper-parameters) ``config`` (and
    ``hparams``) changed in place, as a stranger would send it; still plain data."""
    import torch
    import yaml

    from mnist_dlops.rundir.checkpoints import STATE_KEY

    checkpoint = torch.load(path, weights_only=True)
    hparams(checkpoint["hyper_parameters"])
    stored = yaml.safe_load(checkpoint[STATE_KEY]["config"])
    config(stored)
    checkpoint[STATE_KEY]["config"] = yaml.safe_dump(stored)
    torch.save(checkpoint, out)
    torch.load(out, weights_only=True)  # weights_only alone would accept it
    return out


@pytest.fixture
def tiny_idx(tmp_path: Path) -> Path:
    return make_idx_set(tmp_path / "tiny")


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python cli.py ARGS`` in ``cwd`` as a user would, capturing its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``cli_main(args)`` in this process, in ``cwd``, as a ``CompletedProcess``: the exit status ``cli.py`` would
    return, and what it printed. Seconds faster than a process (no imports); an unexpected exception propagates
    (what would have been a traceback fails the test all the same)."""
    import contextlib
    import io

    from mnist_dlops.cli.app import cli_main

    out, err, code, here = io.StringIO(), io.StringIO(), 0, os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_main(list(args))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["cli.py", *args], code, out.getvalue(), err.getvalue())


def run_module(module: str, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m MODULE ARGS`` (an mnist_dlops tool) in ``cwd``, with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def read_scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar series in a run's TensorBoard events, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A PostgreSQL server on loopback, in a temporary folder, stopped and removed afterwards."""
    pg_ctl = shutil.which("pg_ctl") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))), None)
    if not pg_ctl:
        pytest.skip("PostgreSQL is not installed here (pg_ctl not found); .ci/run installs it, so CI runs this test")
    # PostgreSQL refuses to run as root: as root, it runs as the postgres user, in a folder that user can reach
    # (pytest's own temporary folders are private to root).
    user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # In the machine's temp folder: the postgres user cannot enter the tests' own (pytest's folders are private).
    root = Path(tempfile.mkdtemp(prefix="mnist-dlops-pg-", dir=MACHINE_TEMP))
    root.chmod(0o777)
    bin_dir, data = Path(pg_ctl).parent, root / "data"
    subprocess.run([*user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    port = free_port()
    subprocess.run([*user, str(pg_ctl), "-D", str(data), "-o", f"-k {data} -h 127.0.0.1 -p {port}", "-w", "start",
                    "-l", str(data / "log")], check=True, capture_output=True)
    try:
        subprocess.run([*user, str(bin_dir / "createdb") if (bin_dir / "createdb").exists() else "createdb",
                        "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "sweeps"], check=True,
                       capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run([*user, str(pg_ctl), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def digit_photo(digit: np.ndarray, paper: float, size: int, frame: tuple[int, int], offset: tuple[int, int],
                noise: float, seed: int = 0, gradient: float = 0.0, fmt: str = "PNG") -> bytes:
    """An MNIST digit as a photo or scan of paper: dark ink on ``paper`` grey, ``size`` pixels tall at ``offset``
    in a ``frame`` (height, width), with Gaussian noise and a left-to-right lighting ``gradient``; encoded bytes."""
    import io

    from PIL import Image

    big = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    height, width = frame
    page = np.full(frame, float(paper)) + np.linspace(-gradient, gradient, width)[None, :]
    y, x = offset
    page[y : y + size, x : x + size] = page[y : y + size, x : x + size] * (1 - big) + 30.0 * big
    page += np.random.default_rng(seed).normal(0, noise, page.shape) if noise else 0
    buffer = io.BytesIO()
    Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


# Photos and scans people upload: white, grey, noisy and unevenly lit paper; large, small and off-centre digits.
PHOTOS = {
    "white": dict(paper=250, size=200, frame=(300, 300), offset=(50, 50), noise=0),
    "grey": dict(paper=200, size=120, frame=(400, 300), offset=(30, 150), noise=0),
    "grey-noisy": dict(paper=190, size=100, frame=(480, 640), offset=(300, 60), noise=12),
    "uneven": dict(paper=180, size=80, frame=(300, 400), offset=(100, 250), noise=6, gradient=30),
    "small": dict(paper=210, size=40, frame=(500, 500), offset=(400, 20), noise=4),
}


@pytest.fixture(autouse=True)
def no_leaked_environment():
    """Each test leaves the process environment as it found it; MLflow's process-wide tracking URI (which
    ``mlflow.set_tracking_uri`` also writes into the environment) is reset after a test that set it."""
    before = dict(os.environ)
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)
    os.environ.clear()
    os.environ.update(before)


@contextmanager
def mlflow_ui(lab: Path) -> Iterator[str]:
    """``mlflow ui`` over ``lab``'s store on a free loopback port, once it answers (a minute at most); stopped after."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
         f"sqlite:///{lab}/lightning_logs/mlflow.db", "--host", "127.0.0.1", "--port", str(port)],
        cwd=lab, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow ui did not answer within a minute")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
