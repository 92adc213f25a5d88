"""The HTTP API on LitServe: ``POST /predict``, ``/metadata``, ``/feedback``, ``/metrics`` and the draw-a-digit page."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from email.parser import BytesParser
from email.policy import HTTP
from importlib import resources
from typing import Any, Optional

import litserve as ls
import numpy as np
import torch
from fastapi import HTTPException, Request  # Request at module level: FastAPI resolves the route's annotations here
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnist_dlops.data.images import ImageTooLarge, decode_image
from mnist_dlops.errors import DataError, reason
from mnist_dlops.feedback import FeedbackStore, RateLimit, sign, verify
from mnist_dlops.model.served import ServedModel, discard, promoted
from mnist_dlops.serve.monitoring import Metrics, RequestMetrics, exposition

MAX_IMAGES = 256  # images in one JSON batch


class DigitAPI(ls.LitAPI):
    """Images in, class probabilities out; requests batched across clients up to ``max_batch_size``."""

    def __init__(self, served: ServedModel, threads: int = 1, max_batch_size: int = 16, batch_timeout: float = 0.001,
                 monitor: bool = True, feedback_secret: Optional[bytes] = None, reload_interval: float = 0):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.served = served
        self.threads = threads
        self.monitor = monitor
        self.metrics: Optional[Metrics] = None
        self.feedback_secret = feedback_secret  # signs each prediction's id (POST /feedback takes it back)
        self.reload_interval = reload_interval
        self._next_check = 0.0

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)  # the workers share the machine's cores
        self.forward = self.served.load()
        if self.monitor:  # in the worker process, where the predictions are: counted into the shared folder
            self.metrics = Metrics(model_labels(self.served), self.served.reference)

    def decode_request(self, request: dict) -> Any:
        """(uint8 images [k, 28, 28], whether the request was a JSON batch, whether to return the 28x28 image), or
        the 4xx answer to a user's mistake. LitServe answers a whole batch with the error if one request's
        decoding raises, so a mistake is carried as a value and answered on its own, its neighbours unharmed."""
        try:
            if not isinstance(request, dict):
                raise HTTPException(400, "expected a JSON object with \"image\" (base64) or \"images\" (28x28 arrays)")
            if "image" in request:
                image = _image(request["image"])
                upload = hashlib.sha256(str(request["image"]).encode()).hexdigest()
                return image, False, bool(request.get("return_image")), [upload]
            if "images" in request:
                images = _arrays(request["images"])
                return images, True, False, [hashlib.sha256(image.tobytes()).hexdigest() for image in images]
            raise HTTPException(400, f"no \"image\" or \"images\" key in the JSON body (keys: {sorted(request)[:5]})")
        except HTTPException as err:
            return err

    def _switch_if_promoted(self) -> None:
        """Serve the version the registry alias names now, if it moved: loaded here, between two batches, so no
        request fails during the switch (the batch that finds it waits for the load)."""
        self._next_check = time.monotonic() + self.reload_interval
        try:
            now = promoted(self.served)
        except Exception as err:  # noqa: BLE001 - the registry unreachable for a moment: keep serving what runs
            print(f"model switch: registry not readable ({type(err).__name__}); still serving "
                  f"{self.served.name} version {self.served.version}", flush=True)
            return
        if now is not None and now.version != self.served.version:
            before, (self.forward, self.served) = self.served, (now.load(), now)
            discard(before)
            if self.metrics is not None:
                self.metrics.switched(model_labels(now), now.reference)
            print(f"model switch: now serving {now.name} version {now.version}", flush=True)

    def batch(self, inputs: list) -> list:
        return inputs  # requests carry different numbers of images: stacked in predict, split back there

    def predict(self, inputs: Any) -> Any:
        if self.reload_interval and time.monotonic() >= self._next_check:
            self._switch_if_promoted()
        batched = self.max_batch_size > 1
        items = inputs if batched else [inputs]
        valid = [item for item in items if not isinstance(item, HTTPException)]
        if valid:
            stacked = np.concatenate([item[0] for item in valid])
            probs = self.forward(torch.from_numpy(stacked)[:, None]).float().numpy()
            if self.metrics is not None:
                self.metrics.observe(stacked, probs, self.served.class_names)
        outputs, start = [], 0
        for item in items:
            if isinstance(item, HTTPException):
                outputs.append(item)
                continue
            images, is_batch, return_image, uploads = item
            outputs.append((probs[start : start + len(images)], images, is_batch, return_image, uploads))
            start += len(images)
        return outputs if batched else outputs[0]

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: Any) -> Response:
        if isinstance(output, HTTPException):
            return JSONResponse({"detail": output.detail}, status_code=output.status_code)
        probs, images, is_batch, return_image, uploads = output
        names = self.served.class_names
        predictions = [
            {"class": names[int(p.argmax())], "probabilities": {n: round(float(v), 6) for n, v in zip(names, p)}}
            for p in probs
        ]
        if self.feedback_secret is not None:
            for prediction, image, upload in zip(predictions, images, uploads):
                prediction["prediction_id"] = sign(self.feedback_secret, image, upload, prediction["class"],
                                                   self.served.name, self.served.version or "")
        answer: dict[str, Any] = {"predictions": predictions} if is_batch else dict(predictions[0])
        if return_image:
            answer["image"] = images[0].tolist()  # the 28x28 image the model saw
        answer["model"] = {"name": self.served.name, "version": self.served.version}
        answer["data_fingerprint"] = self.served.data_fingerprint
        return JSONResponse(answer)


def _image(encoded: Any) -> np.ndarray:
    if not isinstance(encoded, str) or not encoded:
        raise HTTPException(400, "\"image\" must be a non-empty base64 string of a PNG or JPEG file")
    try:
        data = base64.b64decode(encoded.split(",", 1)[-1], validate=True)  # a data: URL's prefix is dropped
    except (binascii.Error, ValueError):
        raise HTTPException(400, "\"image\" is not valid base64") from None
    try:
        return decode_image(data, "upload")[None]
    except ImageTooLarge as err:
        raise HTTPException(413, str(err)) from None
    except DataError as err:
        raise HTTPException(400, str(err)) from None


def _arrays(images: Any) -> np.ndarray:
    try:
        array = np.asarray(images, dtype=np.float64)
    except (TypeError, ValueError):
        raise HTTPException(400, "\"images\" must be a list of 28x28 arrays of numbers 0-255") from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (28, 28) or not 1 <= len(array) <= MAX_IMAGES:
        raise HTTPException(400, f"\"images\" has shape {list(array.shape)}; expected [N, 28, 28] with "
                                 f"1 <= N <= {MAX_IMAGES}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise HTTPException(400, "\"images\" values must be numbers from 0 to 255 (white digit on black)")
    return array.round().astype(np.uint8)


class Uploads:
    """ASGI middleware for ``POST /predict``: an image body (raw or multipart) becomes ``{"image": <base64>}``;
    an empty body, one over ``max_bytes`` or JSON that does not parse is answered 4xx here, with a one-line reason.
    Not LitServe's ``max_payload_size``: this reads the body anyway, and LitServe's 413 says neither size nor limit."""

    def __init__(self, app: ASGIApp, path: str = "/predict", max_bytes: int = 10 * 2**20) -> None:
        self.app, self.path, self.max_bytes = app, path, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body, size = bytearray(), 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_bytes:  # beyond it, what is sent is read and dropped: the client then reads our 413
                body += chunk
            if not message.get("more_body"):
                break
        if size > self.max_bytes:
            await _reply(send, 413, f"upload of {size} bytes is larger than the {self.max_bytes / 2**20:g} MB accepted")
            return
        if not body:
            await _reply(send, 400, "empty body: send a PNG/JPEG image, or JSON with \"image\" or \"images\"")
            return
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        # JSON sent without its content type (curl -d's form type): no image format starts with '{' or '['.
        is_json = kind == "application/json" or (
            not kind.startswith(("image/", "multipart/")) and bytes(body).lstrip()[:1] in (b"{", b"["))
        try:
            payload = _json_body(bytes(body)) if is_json else _image_body(bytes(body), headers)
        except ValueError as err:
            await _reply(send, 400, str(err))
            return
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
        scope["headers"] += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # after the body: wait for the client's disconnect, as Starlette expects
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}

        await self.app(scope, replay, send)


def _json_body(body: bytes) -> bytes:
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"the JSON body does not parse ({type(err).__name__}: {str(err)[:80]})") from None
    except RecursionError:  # nesting deeper than Python's recursion limit: no request of ours looks like that
        raise ValueError("the JSON body is nested too deeply") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"expected a JSON object with \"image\" or \"images\", not {type(parsed).__name__}")
    return body


def _image_body(body: bytes, headers: dict[str, str]) -> bytes:
    """The image in a raw body, or in the first file part of a multipart form, as ``{"image": <base64>}``."""
    if headers.get("content-type", "").lower().startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {headers['content-type']}\r\n\r\n".encode("latin-1") + body
        )
        parts = [part for part in message.iter_parts() if part.get_content_disposition() == "form-data"]
        files = [part for part in parts if part.get_filename()] or parts
        body = files[0].get_payload(decode=True) if files else b""
        if not body:
            raise ValueError("the multipart form holds no file: upload the image as a file field")
    return json.dumps({"image": base64.b64encode(body).decode("ascii")}).encode()


async def _reply(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}, separators=(",", ":")).encode()  # as FastAPI's JSONResponse writes it
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def page() -> str:
    """The draw-a-digit page: plain HTML and JavaScript, no build step, nothing fetched from elsewhere."""
    return resources.files("mnist_dlops.serve").joinpath("page.html").read_text()


def model_labels(served: ServedModel) -> dict[str, str]:
    """The served model as Prometheus labels: name, version, data version, format."""
    return {"name": served.name, "version": served.version or "", "format": served.format,
            "data_version": served.reference.data_version if served.reference else ""}


def build_server(served: ServedModel, workers: int = 1, max_batch_size: int = 16, batch_timeout: float = 0.001,
                 max_upload_mb: float = 10, accelerator: str = "cpu", threads: Optional[int] = None,
                 monitor: bool = True, feedback: Optional[FeedbackStore] = None, feedback_secret: bytes = b"",
                 feedback_per_minute: int = 30, reload_interval: float = 0) -> ls.LitServer:
    """A LitServer for ``served`` with the page, ``/metadata``, upload handling, (``monitor``) ``/metrics`` and
    (``feedback``) ``POST /feedback``; ``monitor`` needs ``PROMETHEUS_MULTIPROC_DIR`` set before anything imported
    ``prometheus_client``. ``reload_interval``: seconds between looks at the registry alias (0: never)."""
    from fastapi.responses import HTMLResponse

    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    api = DigitAPI(served, threads=threads, max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                   monitor=monitor, feedback_secret=feedback_secret if feedback else None,
                   reload_interval=reload_interval)
    middlewares: list[Any] = [(Uploads, {"max_bytes": int(max_upload_mb * 2**20)})]
    if monitor:  # outermost: it times and counts every request, the ones Uploads answers itself included
        routes = ("/predict", "/", "/metadata", "/health", "/metrics", "/feedback")
        middlewares.append((RequestMetrics, {"metrics": Metrics(model_labels(served), served.reference),
                                             "routes": routes}))
    # FastAPI's /docs and /redoc pages load their scripts from a CDN (blank offline) and are not our documented API:
    # LitServe's disable_openapi_url drops them with the schema they read.
    server = ls.LitServer(
        api, accelerator=accelerator, devices=1, workers_per_device=workers, timeout=30, disable_openapi_url=True,
        middlewares=middlewares, model_metadata=served.metadata(),
    )
    html, metadata = page(), served.metadata()

    @server.app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return html

    current = {"served": served, "checked": time.monotonic()}

    @server.app.get("/metadata")
    def describe() -> JSONResponse:  # plain def: FastAPI runs it in its thread pool, a registry download included
        if reload_interval and time.monotonic() - current["checked"] >= reload_interval:
            current["checked"] = time.monotonic()
            try:
                before = current["served"]
                current["served"] = promoted(before) or before
                if current["served"] is not before:
                    discard(before)
            except Exception:  # noqa: BLE001, S110 - the registry unreachable for a moment: the last answer stands
                pass
        return JSONResponse({**metadata, **current["served"].metadata()} if reload_interval else metadata)

    limit = RateLimit(feedback_per_minute)

    @server.app.post("/feedback")
    async def give_feedback(request: Request) -> JSONResponse:
        """The right label of a prediction: ``{"prediction_id": ..., "label": "7"}``; stored before the answer."""
        if feedback is None:
            return JSONResponse({"detail": "feedback is off (serve --feedback true)"}, status_code=404)
        try:
            body = json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return JSONResponse({"detail": "the JSON body does not parse"}, status_code=400)
        if not isinstance(body, dict) or set(body) - {"prediction_id", "label"} or "prediction_id" not in body:
            return JSONResponse({"detail": "expected {\"prediction_id\": <from /predict>, \"label\": <class>}"},
                                status_code=400)
        label = str(body.get("label"))
        if label not in served.class_names:
            return JSONResponse({"detail": f"label={label!r}: one of {', '.join(served.class_names)}"},
                                status_code=400)
        try:
            prediction = verify(feedback_secret, body["prediction_id"])
        except ValueError as err:
            return JSONResponse({"detail": str(err)}, status_code=400)
        client = request.client.host if request.client else "unknown"
        if not limit.allow(client):
            return JSONResponse({"detail": f"more than {feedback_per_minute} items a minute from {client}"},
                                status_code=429)
        # Committed before the answer (an acknowledged item survives a kill), off the event loop: a database write.
        try:
            item = await run_in_threadpool(feedback.add, prediction, label, client)
        except SQLAlchemyError as err:  # a full, read-only or unreachable store: this item only, /predict goes on
            why = reason(getattr(err, "orig", None) or err)
            return JSONResponse({"detail": f"the feedback store cannot take it now ({why}); nothing was stored"},
                                status_code=503)
        return JSONResponse({"stored": item, "label": label, "predicted": prediction["p"],
                             "model": {"name": prediction["m"], "version": prediction["v"]}})

    @server.app.get("/metrics")
    async def metrics() -> Response:
        if not monitor:
            return JSONResponse({"detail": "monitoring is off (serve --monitor true)"}, status_code=404)
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    # LitServe's constructor has registered its own GET / ("litserve running"); the first matching route wins,
    # so ours go to the front of the router's (public) list of routes.
    ours = [route for route in server.app.router.routes
            if getattr(route, "endpoint", None) in (index, describe, metrics, give_feedback)]
    server.app.router.routes[:] = ours + [route for route in server.app.router.routes if route not in ours]
    return server
