"""What the served model is asked and how it answers, for Prometheus: ``GET /metrics``, whole across processes.

LitServe answers HTTP in API-server processes and runs the model in worker processes; each counts what it sees with
``prometheus_client`` in its multiprocess mode (every process writes its own files under one folder,
``PROMETHEUS_MULTIPROC_DIR``, and ``/metrics`` adds them up), so a count is whole, not one worker's fragment.

**Input drift.** Seven cheap statistics of each image the model sees (ink, mean intensity, the bounding box's width
and height, the centre of mass, the model's confidence) are counted into ten bins per statistic, cut at the deciles
of the same statistics on the model's training data (``Reference``: computed once when the model is exported or
registered, stored with it). Prometheus then computes, per statistic, the **population stability index** (PSI) of
the last window's bin shares against the training shares (``monitoring/rules.yml``): PSI, rather than a KS test,
because it is a sum over fixed bins that counters carry exactly across processes and that a PromQL rule computes over
any window; by the usual reading, below 0.1 is no shift, 0.1-0.25 a moderate one, above 0.25 a real one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

STATISTICS = ("ink", "mean_intensity", "bbox_width", "bbox_height", "center_x", "center_y", "confidence")
BINS = 10
REFERENCE_FILE = "reference.json"


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """The statistics of uint8 images ``[N, 28, 28]`` (white digit on black), confidence aside."""
    images = images.reshape(len(images), 28, 28).astype(np.float32) / 255.0
    ink = images > 0.5
    rows, cols = ink.any(axis=2), ink.any(axis=1)

    def extent(mask: np.ndarray) -> np.ndarray:
        first = np.where(mask.any(axis=1), mask.argmax(axis=1), 0)
        last = np.where(mask.any(axis=1), mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1), -1)
        return (last - first + 1).astype(np.float32)

    mass = images.sum(axis=(1, 2)) + 1e-6
    grid = np.arange(28, dtype=np.float32)
    return {
        "ink": ink.mean(axis=(1, 2)),
        "mean_intensity": images.mean(axis=(1, 2)),
        "bbox_width": extent(cols),
        "bbox_height": extent(rows),
        "center_x": (images.sum(axis=1) * grid).sum(axis=1) / mass,
        "center_y": (images.sum(axis=2) * grid).sum(axis=1) / mass,
    }


@dataclass
class Reference:
    """Per statistic: the inner bin edges (deciles on the training data) and the training share of each bin."""

    edges: dict[str, list[float]]
    shares: dict[str, list[float]]
    data_version: str = ""  # the training data's version (``v1:b6c29e96``), a label of the served model

    @classmethod
    def from_values(cls, values: dict[str, np.ndarray], data_version: str = "") -> Reference:
        edges, shares = {}, {}
        for name, column in values.items():
            cut = np.unique(np.quantile(column, np.linspace(0, 1, BINS + 1)[1:-1]))  # ties merge bins
            counts = np.bincount(np.searchsorted(cut, column, side="right"), minlength=len(cut) + 1)
            edges[name], shares[name] = cut.tolist(), (counts / counts.sum()).tolist()
        return cls(edges, shares, data_version)

    def bins(self, name: str, column: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.edges[name]), column, side="right")

    def psi(self, name: str, column: np.ndarray) -> float:
        """The population stability index of ``column`` against the training shares: what ``monitoring/rules.yml``
        computes in Prometheus (shares floored at 0.001), here for a plot or a test."""
        q = np.maximum(np.asarray(self.shares[name]), 0.001)
        counts = np.bincount(self.bins(name, column), minlength=len(q))
        p = np.maximum(counts / max(1, counts.sum()), 0.001)
        return float(((p - q) * np.log(p / q)).sum())

    def save(self, folder: Path) -> Path:
        file = folder / REFERENCE_FILE
        file.write_text(json.dumps({"edges": self.edges, "shares": self.shares, "data_version": self.data_version},
                                   indent=1))
        return file

    @classmethod
    def load(cls, folder: Path) -> Optional[Reference]:
        file = folder / REFERENCE_FILE
        if not file.is_file():
            return None
        data = json.loads(file.read_text())
        return cls(data["edges"], data["shares"], data.get("data_version", ""))


def reference_of(forward: Any, images: np.ndarray, data_version: str = "", batch: int = 1000) -> Reference:
    """The reference of a model on its training images (uint8 ``[N, 28, 28]``): image statistics and confidence."""
    import torch

    values = image_statistics(images)
    confidence = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))[:, None]
            confidence.append(forward(chunk).float().max(dim=1).values.numpy())
    values["confidence"] = np.concatenate(confidence)
    return Reference.from_values(values, data_version)


class Metrics:
    """The server's Prometheus metrics; create one per process, after ``PROMETHEUS_MULTIPROC_DIR`` is set."""

    def __init__(self, model: dict[str, str], reference: Optional[Reference]) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.reference = reference
        # registry=None: in multiprocess mode each process writes its values to files and /metrics reads them all;
        # no process-wide registry is involved (and a second server built in one process clashes with none).
        self.requests = Counter("mnist_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=None)
        self.latency = Histogram("mnist_request_duration_seconds", "Time to answer a request, by route", ["route"],
                                 buckets=(.005, .01, .025, .05, .075, .1, .25, .5, 1, 2.5, 5, 10), registry=None)
        self.batch = Histogram("mnist_batch_images", "Images per forward pass of the model",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=None)
        self.predictions = Counter("mnist_predictions", "Predictions by class", ["digit"], registry=None)
        self.confidence = Histogram("mnist_confidence", "The top class probability of each prediction",
                                    buckets=(.2, .3, .4, .5, .6, .7, .8, .9, .95, .99, 1.0), registry=None)
        self.bins = Counter("mnist_input_bin", "Images by the training-decile bin of each statistic",
                            ["statistic", "bin"], registry=None)
        self.info = Gauge("mnist_model_info", "The served model", list(model), multiprocess_mode="mostrecent",
                          registry=None)
        self.model = model
        self.info.labels(**model).set(1)
        if reference is not None:
            shares = Gauge("mnist_input_reference_share", "Each bin's share on the training data",
                           ["statistic", "bin"], multiprocess_mode="max", registry=None)
            for name, values in reference.shares.items():
                for i, share in enumerate(values):
                    shares.labels(name, str(i)).set(share)
                    # Every bin exists from the start, at 0: Prometheus' increase() sees no growth in a series
                    # whose first sample already holds the count.
                    self.bins.labels(name, str(i))

    def switched(self, model: dict[str, str], reference: Optional[Reference]) -> None:
        """Another model version now serves: its labels, and its training data as the drift reference."""
        self.info.labels(**self.model).set(0)
        self.model, self.reference = model, reference
        self.info.labels(**model).set(1)

    def observe(self, images: np.ndarray, probs: np.ndarray, class_names: list[str]) -> None:
        """Count one forward pass: its size, each prediction and its confidence, each statistic's bin."""
        self.batch.observe(len(images))
        top = probs.argmax(axis=1)
        confidence = probs.max(axis=1)
        for digit, count in zip(*np.unique(top, return_counts=True)):
            self.predictions.labels(class_names[int(digit)]).inc(int(count))
        for value in confidence:
            self.confidence.observe(float(value))
        if self.reference is None:
            return
        values = {**image_statistics(images), "confidence": confidence}
        for name, column in values.items():
            for index, count in zip(*np.unique(self.reference.bins(name, column), return_counts=True)):
                self.bins.labels(name, str(int(index))).inc(int(count))


class RequestMetrics:
    """ASGI middleware in the API-server processes: every request's route, status and time."""

    def __init__(self, app: Any, metrics: Metrics, routes: tuple[str, ...]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = {"code": 500}
        started = time.perf_counter()

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def exposition() -> tuple[bytes, str]:
    """Every process's metrics, added up: the body and content type of ``GET /metrics``."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def training_reference(path: Path, model: Any, n: int = 10_000) -> Optional[Reference]:
    """The drift reference of the model on (a seeded sample of) the data it was trained on, read as its checkpoint's
    config says; None, said in one line, when that data cannot be read here."""
    import yaml

    from mnist_dlops.data import MNISTDataModule
    from mnist_dlops.data.versions import version_label
    from mnist_dlops.errors import UserError
    from mnist_dlops.rundir.checkpoints import STATE_KEY
    from mnist_dlops.rundir.run import load_checkpoint

    config = yaml.safe_load(load_checkpoint(path).get(STATE_KEY, {}).get("config") or "{}") or {}
    try:
        data = MNISTDataModule(**{**(config.get("data") or {}), "download": False})
        data.setup("fit")
    except (UserError, OSError, TypeError) as err:
        print(f"drift reference: skipped, the training data cannot be read here ({str(err).splitlines()[0][:160]})")
        return None
    images = data.splits["train"][0][:, 0].numpy()
    sample = np.random.default_rng(0).permutation(len(images))[:n]
    version = data.data_version.as_dict() if data.data_version else None
    return reference_of(model, images[np.sort(sample)], version_label(version))
