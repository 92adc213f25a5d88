"""``mnist-dlops serve``: the model behind an HTTP API and a draw-a-digit page."""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Optional
from unittest.mock import patch  # patch.dict: set environment variables for a block, restored after

from mnist_dlops.errors import ConfigError, command
from mnist_dlops.writeguard import allow_writes


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While serving, SIGTERM (``docker stop``, systemd, Kubernetes) shuts the server down as Ctrl+C does.

    LitServe's ``run()`` stops its workers and HTTP servers on KeyboardInterrupt but installs no SIGTERM handler
    (litserve 0.2.19), so SIGTERM's default killed this process alone and left the workers spinning as orphans, and
    an HTTP server holding the port. The processes it forks inherit the handler and keep SIGTERM's default; the
    caller's own handler is back once the server has stopped.
    """
    main = os.getpid()

    def interrupt(signum: int, frame: object) -> None:
        if os.getpid() != main:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(
    model: Optional[str] = None,
    ckpt_path: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 2,
    max_batch_size: int = 16,
    batch_timeout: float = 0.001,
    max_upload_mb: float = 10,
    threads: Optional[int] = None,
    accelerator: Literal["cpu", "cuda", "auto"] = "cpu",
    api_servers: int = 1,
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "warning",
    runs_dir: str = "lightning_logs",
    tracking_uri: Optional[str] = None,
    monitor: bool = True,
    feedback: bool = True,
    feedback_url: Optional[str] = None,
    feedback_per_minute: int = 30,
    reload_interval: float = 10,
) -> None:
    """Serve a model: ``POST /predict``, ``GET /metadata``, ``GET /health``, and the draw-a-digit page at ``/``.

    Args:
        model: ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` from the registry, or an exported
            ``model.pt`` (TorchScript) or ``model.onnx`` with its ``classes.txt``.
        ckpt_path: Instead of ``model``: a checkpoint, a run folder, or ``best``/``last`` of the newest run.
        host: The address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: The port to listen on.
        workers: Model worker processes (each with its share of the CPU threads).
        max_batch_size: Requests batched into one forward pass, across clients.
        batch_timeout: Seconds a worker waits to fill a batch.
        max_upload_mb: Largest request body accepted (413 above it).
        threads: Torch threads per worker (default: the cores divided among the workers).
        accelerator: Where the workers run the model.
        api_servers: HTTP server processes in front of the workers.
        log_level: Uvicorn's log level (``info`` logs every request).
        runs_dir: Folder of the runs (for ``best``/``last`` and the default MLflow store).
        tracking_uri: The MLflow store; default ``MLFLOW_TRACKING_URI``, else ``sqlite:///<runs_dir>/mlflow.db``.
        monitor: Serve Prometheus metrics at ``GET /metrics`` (requests, latency, batch sizes, predictions,
            confidence, input drift against the training data), counted across every worker.
        feedback: Take users' corrections at ``POST /feedback`` (and on the page): each prediction carries a signed
            ``prediction_id`` to send back with the right label.
        feedback_url: Where feedback is stored: an SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``);
            default ``sqlite:///<runs_dir>/feedback.db``.
        feedback_per_minute: Feedback items accepted a minute from one client (more: 429).
        reload_interval: For a model served by alias (``models:/<name>@production``): seconds between looks at the
            registry; when the alias moves, the workers switch to the new version without a restart (0: never).
    """
    check_options(host, port, workers, max_batch_size, batch_timeout, max_upload_mb, threads, api_servers)
    if feedback_per_minute < 1 or reload_interval < 0:
        key, value = ("feedback_per_minute", feedback_per_minute) if feedback_per_minute < 1 else (
            "reload_interval", reload_interval)
        raise ConfigError(f"{key}={value}: must be {'>= 1' if key == 'feedback_per_minute' else '>= 0'}")
    from mnist_dlops.model.served import DOWNLOADS_ENV, check, resolve  # prometheus_client is not imported by it

    with metrics_folder() if monitor else contextlib.nullcontext(), \
            temporary_folder(DOWNLOADS_ENV, "mnist-dlops-serve-"):  # registered versions downloaded, all processes
        from mnist_dlops.serve.api import build_server  # after the metrics folder is set: prometheus_client reads it

        served = resolve(model, ckpt_path, runs_dir, tracking_uri)
        check(served)
        store, secret = None, b""
        if feedback:
            from mnist_dlops.feedback import FeedbackStore, load_secret

            store = FeedbackStore(feedback_url or f"sqlite:///{Path(runs_dir).resolve() / 'feedback.db'}")
            secret = load_secret(Path(runs_dir))
        server = build_server(served, workers=workers, max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                              max_upload_mb=max_upload_mb, accelerator=accelerator, threads=threads, monitor=monitor,
                              feedback=store, feedback_secret=secret, feedback_per_minute=feedback_per_minute,
                              reload_interval=reload_interval if (model or "").startswith("models:/") else 0)
        version = f" version {served.version}" if served.version else ""
        drift = "" if not monitor else ", GET /metrics" + ("" if served.reference else " (no drift: no reference)")
        print(f"serving {served.name}{version} ({served.format}, classes {','.join(served.class_names)}) "
              f"on http://{host}:{port}/  (POST /predict, GET /metadata, GET /health{drift})", flush=True)
        with stop_on_sigterm():
            server.run(host=host, port=port, num_api_servers=api_servers, log_level=log_level,
                       generate_client_file=False)


@contextmanager
def metrics_folder() -> Iterator[None]:
    """``PROMETHEUS_MULTIPROC_DIR`` for this server: every process it starts counts into its own files there and
    ``/metrics`` adds them up. A fresh folder, removed after (or the one the environment names, emptied first, as
    prometheus_client asks: files of earlier processes would be counted again)."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        allow_writes(given, "PROMETHEUS_MULTIPROC_DIR")
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):  # prometheus_client's own files (<kind>_<pid>.db), nothing else of the folder
            if re.fullmatch(r"(counter|histogram|summary|gauge_[a-z]+)_\d+\.db", name):
                os.unlink(os.path.join(given, name))
        yield
        return
    with temporary_folder("PROMETHEUS_MULTIPROC_DIR", "mnist-dlops-metrics-"):
        yield


@contextmanager
def temporary_folder(variable: str, prefix: str) -> Iterator[None]:
    """A fresh temporary folder named by the environment ``variable`` (the workers LitServe starts inherit it),
    removed with the variable when the server stops."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix=prefix)
    try:
        with patch.dict(os.environ, {variable: folder}):
            yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_options(host: str, port: int, workers: int, max_batch_size: int, batch_timeout: float,
                  max_upload_mb: float, threads: Optional[int], api_servers: int) -> None:
    """Values that parse but cannot serve, refused in one line before anything loads."""
    # Not jsonargparse.typing's PositiveInt: its line starts 'Parser key "workers": Not of type PositiveInt', every
    # other line of ours with the key=value the user gave.
    import ipaddress

    for key, value, low in (("workers", workers, 1), ("max_batch_size", max_batch_size, 1),
                            ("api_servers", api_servers, 1), ("threads", threads or 1, 1)):
        if value < low:
            raise ConfigError(f"{key}={value}: must be >= {low}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"port={port}: must be 0-65535")
    if batch_timeout < 0 or not max_upload_mb > 0:
        key, value = ("batch_timeout", batch_timeout) if batch_timeout < 0 else ("max_upload_mb", max_upload_mb)
        raise ConfigError(f"{key}={value}: must be {'>= 0' if key == 'batch_timeout' else '> 0'}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"host={host}: not an IP address (127.0.0.1: this machine only; 0.0.0.0: all)") from None


def main(argv: Optional[list[str]] = None) -> None:
    """Parse the flags of ``serve`` and run it, with one-line errors."""
    command(serve, argv, "serve", as_positional=False)
