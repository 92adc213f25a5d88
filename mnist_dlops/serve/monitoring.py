"""What the served model is asked and how it answers, for Prometheus: ``GET /metrics``, whole across processes."""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

from mnist_dlops.model.reference import Reference, image_statistics


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
