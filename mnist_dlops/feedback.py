"""Users' corrections of the served model: signed prediction ids, the feedback store, and its export as a new data
version."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from mnist_dlops.errors import ConfigError, DataError, UserError, reason
from mnist_dlops.files import allow_atomic_writes, replacing, write_atomic
from mnist_dlops.trust import check_url, engine_url, redact
from mnist_dlops.writeguard import allow_writes

SECRET_FILE = "feedback.secret"
SECRET_ENV = "MNIST_DLOPS_FEEDBACK_SECRET"


def load_secret(folder: Path) -> bytes:
    """The server's signing secret: ``MNIST_DLOPS_FEEDBACK_SECRET`` (hex; the same for several servers sharing one
    store), else kept in ``folder`` (so ids stay valid across restarts), made once."""
    if os.environ.get(SECRET_ENV):
        try:
            return bytes.fromhex(os.environ[SECRET_ENV])
        except ValueError:
            raise ConfigError(f"{SECRET_ENV}: not hex (e.g. python -c 'import secrets; print(secrets.token_hex(32))')") from None
    file = folder / SECRET_FILE
    allow_atomic_writes(file, "the feedback secret")
    folder.mkdir(parents=True, exist_ok=True)
    if not file.is_file():
        write_atomic(file, secrets.token_hex(32), mode=0o600)  # private from its first byte
    return bytes.fromhex(file.read_text().strip())


def _serializer(secret: bytes) -> Any:
    from itsdangerous import URLSafeSerializer

    # SHA-256, as the docs promise (itsdangerous signs with SHA-1 unless told).
    return URLSafeSerializer(secret, salt="mnist-dlops prediction id", signer_kwargs={"digest_method": hashlib.sha256})


def sign(secret: bytes, image: np.ndarray, upload_sha256: str, predicted: str, model: str, version: str) -> str:
    """A prediction id: what the model saw and said, signed (itsdangerous: HMAC-SHA256 over compact JSON)."""
    pixels = base64.b64encode(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).decode()
    payload = {"i": pixels, "h": upload_sha256, "p": predicted, "m": model, "v": version, "t": round(time.time(), 3)}
    return _serializer(secret).dumps(payload)


def verify(secret: bytes, token: Any) -> dict[str, Any]:
    """The prediction a signed id names; ValueError for anything else (a 400)."""
    from itsdangerous import BadSignature

    if not isinstance(token, str) or len(token) > 4096:
        raise ValueError("prediction_id: not an id this server gave")
    try:
        payload = _serializer(secret).loads(token)
    except BadSignature:
        raise ValueError("prediction_id: unknown (not signed by this server)") from None
    payload["image"] = np.frombuffer(base64.b64decode(payload.pop("i")), dtype=np.uint8).reshape(28, 28)
    return payload


class FeedbackStore:
    """Feedback items in a database: SQLite by default, any SQLAlchemy URL of the drivers we ship."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import Column, Float, Integer, LargeBinary, MetaData, String, Table, create_engine

        url = engine_url(check_url("feedback_url", url))
        if url.startswith("sqlite:///"):
            db = Path(url.removeprefix("sqlite:///"))
            allow_writes(db, "the feedback store")  # its journal is SQLite's own C code, unseen by the gate
            db.parent.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.engine = create_engine(url)
        self.table = Table(
            "feedback", MetaData(),
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("created", Float, nullable=False),
            Column("image", LargeBinary, nullable=False),  # the 28x28 uint8 image the model saw
            Column("upload_sha256", String(64), nullable=False),
            Column("predicted", String(32), nullable=False),
            Column("label", String(32), nullable=False),
            Column("model_name", String(256), nullable=False),
            Column("model_version", String(64), nullable=False),
            Column("client", String(64), nullable=False),
        )
        try:
            self.table.metadata.create_all(self.engine)
        except Exception as err:  # noqa: BLE001 - SQLAlchemy and the drivers raise many kinds for a store that fails
            raise ConfigError(f"feedback_url={redact(url)}: cannot be opened ({reason(err)})") from None

    def add(self, prediction: dict[str, Any], label: str, client: str) -> int:
        """Store one item; returns its id once committed (SQLite: fsynced)."""
        row = {"created": time.time(), "image": prediction["image"].tobytes(), "upload_sha256": prediction["h"],
               "predicted": prediction["p"], "label": label, "model_name": prediction["m"],
               "model_version": prediction["v"] or "", "client": client[:64]}
        with self.engine.begin() as connection:
            return int(connection.execute(self.table.insert().values(**row)).inserted_primary_key[0])

    def items(self) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            rows = connection.execute(self.table.select().order_by(self.table.c.id)).mappings().all()
        wrong = next((row["id"] for row in rows if len(row["image"] or b"") != 28 * 28), None)
        if wrong is not None:  # a store written by something else
            raise DataError(f"feedback_url={redact(self.url)}: item {wrong} holds no 28x28 image; refusing the store")
        return [{**row, "image": np.frombuffer(row["image"], dtype=np.uint8).reshape(28, 28)} for row in rows]


class RateLimit:
    """At most ``per_minute`` items a minute from one client (in this process): a flood gets a 429."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.seen: dict[str, deque[float]] = {}
        self.lock = threading.Lock()

    def allow(self, client: str) -> bool:
        now = time.monotonic()
        with self.lock:
            times = self.seen.setdefault(client, deque())
            while times and now - times[0] > 60:
                times.popleft()
            if len(times) >= self.per_minute:
                return False
            times.append(now)
            return True


def export(url: str, out: str, holdout: float = 0.2, min_items: int = 0) -> dict[str, int]:
    """The stored feedback as a PNG data set: ``<out>/train/<digit>/*.png`` and a held-out ``<out>/test/<digit>/``.

    One file per distinct image (the newest label wins when the same image was labelled twice); which side an image
    falls on is decided by its hash, so a later export keeps every earlier image on the same side. Returns counts.
    """
    from PIL import Image

    if not 0 <= holdout < 1:
        raise ConfigError(f"holdout={holdout}: must be in [0, 1)")
    items = FeedbackStore(url).items()
    latest: dict[str, dict[str, Any]] = {}
    for item in items:  # in id order: a later label of the same image replaces the earlier one
        latest[hashlib.sha256(item["image"].tobytes()).hexdigest()] = item
    if len(latest) < min_items:
        raise UserError(f"feedback_url={redact(url)}: {len(latest)} distinct items, fewer than {min_items}")
    counts = {"train": 0, "test": 0, "items": len(items), "distinct": len(latest)}
    # The store is read from anywhere: a label names a class folder, so it must be a digit's name and nothing more.
    wrong = next((item["label"] for item in latest.values() if not re.fullmatch(r"\d", str(item["label"]))), None)
    if wrong is not None:
        raise DataError(f"feedback_url={redact(url)}: an item's label {wrong!r} is not a digit 0-9")
    with replacing(Path(out)) as folder:
        for split in ("train", "test"):  # class folders only for classes with images: an empty one is an error
            (folder / split).mkdir()
        for digest, item in sorted(latest.items()):
            split = "test" if int(digest[:8], 16) / 0xFFFFFFFF < holdout else "train"
            target = folder / split / item["label"]
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(item["image"]).save(target / f"{digest[:16]}.png")
            counts[split] += 1
    return counts
