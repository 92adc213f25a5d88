"""Downloading MNIST from mirrors served on 127.0.0.1: verified files land, corrupted ones never do."""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import find_mnist, run_cli

from mnist_dlops.data.download import MD5, ensure_mnist, md5sum
from mnist_dlops.errors import DataError


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on a free loopback port; yield its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"  # nothing listens once the socket closes


@pytest.fixture
def corrupted_mirror(tmp_path: Path, mnist_dir: Path) -> Path:
    """A copy of MNIST in which one byte of the test labels is flipped."""
    folder = tmp_path / "corrupted"
    shutil.copytree(mnist_dir, folder)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    return folder


def test_download_verifies_every_file(tmp_path: Path, mnist_dir: Path) -> None:
    dest = tmp_path / "data"
    with serve(mnist_dir) as url:
        ensure_mnist(dest, [url])
    assert sorted(p.name for p in dest.iterdir()) == sorted(MD5)
    assert all(md5sum(dest / name) == digest for name, digest in MD5.items())


def test_corrupted_file_is_rejected_and_never_left(tmp_path: Path, corrupted_mirror: Path) -> None:
    dest = tmp_path / "data"
    with serve(corrupted_mirror) as url, pytest.raises(DataError, match="MD5") as err:
        ensure_mnist(dest, [url])
    assert "t10k-labels-idx1-ubyte.gz" in str(err.value)
    assert not (dest / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list(dest.glob(".*part"))  # no temporary file left behind


def test_next_mirror_is_tried_after_a_bad_one(tmp_path: Path, corrupted_mirror: Path, mnist_dir: Path) -> None:
    dest = tmp_path / "data"
    with serve(corrupted_mirror) as bad, serve(mnist_dir) as good:
        ensure_mnist(dest, [_closed_port_url(), bad, good])
    assert md5sum(dest / "t10k-labels-idx1-ubyte.gz") == MD5["t10k-labels-idx1-ubyte.gz"]


@pytest.mark.slow  # a long real run or a server: in `pytest -m slow` and CI, to keep the default run short
def test_cli_downloads_on_first_run(tmp_path: Path, mnist_dir: Path) -> None:
    with serve(mnist_dir) as url:
        result = run_cli(
            "fit", "-c", "configs/debug.yaml", "--data.data_dir", "mnist", f"--data.mirrors=[{url}]", cwd=_cwd(tmp_path)
        )
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(md5sum(tmp_path / "mnist" / name) == digest for name, digest in MD5.items())


def test_offline_without_data_fails_in_one_line(tmp_path: Path) -> None:
    result = run_cli("fit", "--data.data_dir", "nowhere", f"--data.mirrors=[{_closed_port_url()}]", cwd=_cwd(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nowhere" in last and "--data.data_dir" in last
    assert not any((tmp_path / "lightning_logs").iterdir())  # the claimed run directory was empty: removed


def _cwd(tmp_path: Path) -> Path:
    """A working directory where ``configs/`` resolves to the project's configs, as in a checkout."""
    from conftest import REPO

    (tmp_path / "configs").symlink_to(REPO / "configs")
    return tmp_path


def test_the_suite_fetches_mnist_on_a_fresh_clone(tmp_path: Path, mnist_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A clone with no ../shared beside it and no MNIST_DIR: the tests' MNIST is downloaded into its data/mnist with
    the project's MD5-checked downloader (here from a mirror on 127.0.0.1); with no mirror, one line."""
    monkeypatch.delenv("MNIST_DIR", raising=False)
    clone = tmp_path / "laptop" / "mnist-dlops"
    clone.mkdir(parents=True)
    with serve(mnist_dir) as url:
        found = find_mnist(clone, (url,))
    assert found == clone / "data" / "mnist"
    assert {name: md5sum(found / name) for name in MD5} == MD5
    assert find_mnist(clone, (_closed_port_url(),)) == found  # found there the next time, nothing fetched
    with pytest.raises(DataError) as error:
        find_mnist(tmp_path / "offline" / "mnist-dlops", (_closed_port_url(),))
    assert "\n" not in str(error.value) and "no mirror gave a verified copy" in str(error.value)
