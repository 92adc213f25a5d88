"""The HTTP API on LitServe: ``POST /predict``, ``GET /metadata``, ``GET /health`` and the draw-a-digit page at ``/``.

LitServe reads every request body as JSON (or a form). An image upload is raw bytes or multipart, so
:class:`Uploads`, an ASGI middleware in front of LitServe, turns those into ``{"image": <base64>}`` and refuses
what is no request at all (an empty body, a body over the size limit, JSON that does not parse) with a 4xx before it
reaches a worker. Decoding and preprocessing run in the workers (``decode_request``), with the exact code of
``cli.py predict`` (:func:`mnist_dlops.sources.decode_image`); a user's mistake there is an ``HTTPException`` 4xx.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from email.parser import BytesParser
from email.policy import HTTP
from importlib import resources
from typing import Any, Optional

import litserve as ls
import numpy as np
import torch
from fastapi import HTTPException
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnist_dlops.errors import DataError
from mnist_dlops.serve.model import ServedModel
from mnist_dlops.sources import ImageTooLarge, decode_image

MAX_IMAGES = 256  # images in one JSON batch


class DigitAPI(ls.LitAPI):
    """Images in, class probabilities out; requests batched across clients up to ``max_batch_size``."""

    def __init__(self, served: ServedModel, threads: int = 1, max_batch_size: int = 16, batch_timeout: float = 0.001):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.served = served
        self.threads = threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)  # the workers share the machine's cores
        self.forward = self.served.load()

    def decode_request(self, request: dict) -> Any:
        """(uint8 images [k, 28, 28], whether the request was a JSON batch, whether to return the 28x28 image), or
        the 4xx answer to a user's mistake. LitServe answers a whole batch with the error if one request's
        decoding raises, so a mistake is carried as a value and answered on its own, its neighbours unharmed."""
        try:
            if not isinstance(request, dict):
                raise HTTPException(400, "expected a JSON object with \"image\" (base64) or \"images\" (28x28 arrays)")
            if "image" in request:
                return _image(request["image"]), False, bool(request.get("return_image"))
            if "images" in request:
                return _arrays(request["images"]), True, False
            raise HTTPException(400, f"no \"image\" or \"images\" key in the JSON body (keys: {sorted(request)[:5]})")
        except HTTPException as err:
            return err

    def batch(self, inputs: list) -> list:
        return inputs  # requests carry different numbers of images: stacked in predict, split back there

    def predict(self, inputs: Any) -> Any:
        batched = self.max_batch_size > 1
        items = inputs if batched else [inputs]
        valid = [item for item in items if not isinstance(item, HTTPException)]
        if valid:
            images = torch.from_numpy(np.concatenate([images for images, _, _ in valid]))[:, None]
            probs = self.forward(images).float().numpy()
        outputs, start = [], 0
        for item in items:
            if isinstance(item, HTTPException):
                outputs.append(item)
                continue
            images, is_batch, return_image = item
            outputs.append((probs[start : start + len(images)], images, is_batch, return_image))
            start += len(images)
        return outputs if batched else outputs[0]

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: Any) -> Response:
        if isinstance(output, HTTPException):
            return JSONResponse({"detail": output.detail}, status_code=output.status_code)
        probs, images, is_batch, return_image = output
        names = self.served.class_names
        predictions = [
            {"class": names[int(p.argmax())], "probabilities": {n: round(float(v), 6) for n, v in zip(names, p)}}
            for p in probs
        ]
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
    an empty body, one over ``max_bytes`` or JSON that does not parse is answered 4xx here, with a one-line reason."""

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
        try:
            payload = _json_body(bytes(body)) if kind == "application/json" else _image_body(bytes(body), headers)
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


def build_server(served: ServedModel, workers: int = 1, max_batch_size: int = 16, batch_timeout: float = 0.001,
                 max_upload_mb: float = 10, accelerator: str = "cpu", threads: Optional[int] = None) -> ls.LitServer:
    """A LitServer for ``served`` with the page, ``/metadata`` and upload handling."""
    from fastapi.responses import HTMLResponse

    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    api = DigitAPI(served, threads=threads, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    # fast_queue asks for LitServe's ZMQ transport; litserve 0.2.19 passes it under a wrong keyword and keeps its
    # multiprocessing-manager queues (LitServe issue 751), so it takes effect only with a fixed release.
    server = ls.LitServer(
        api, accelerator=accelerator, devices=1, workers_per_device=workers, timeout=30, fast_queue=True,
        middlewares=[(Uploads, {"max_bytes": int(max_upload_mb * 2**20)})], model_metadata=served.metadata(),
    )
    html, metadata = page(), served.metadata()

    @server.app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return html

    @server.app.get("/metadata")
    async def describe() -> JSONResponse:
        return JSONResponse(metadata)

    # LitServe's constructor has registered its own GET / ("litserve running"); the first matching route wins,
    # so ours go to the front of the router's (public) list of routes. FastAPI's /docs and /redoc pages load their
    # scripts from a CDN (blank offline) and are not our documented API: removed, with the schema they read.
    ours = [route for route in server.app.router.routes if getattr(route, "endpoint", None) in (index, describe)]
    hidden = {server.app.docs_url, server.app.redoc_url, server.app.openapi_url, "/docs/oauth2-redirect"}
    server.app.router.routes[:] = ours + [route for route in server.app.router.routes
                                          if route not in ours and getattr(route, "path", None) not in hidden]
    return server
