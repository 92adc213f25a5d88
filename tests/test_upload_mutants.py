"""The server answers every request, however malformed, with a 4xx for that request alone: seeded mutations of a
digit in every image format, and JSON nested past Python's recursion limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_security import lab, trained  # noqa: F401 - fixtures (trained requests lab)


def mutants(n_per_format: int = 45) -> list[tuple[str, bytes]]:
    """Seeded mutations of one digit saved in every format Pillow writes here: flipped, cut and inserted bytes."""
    import io
    import random

    from PIL import Image

    digit = Image.fromarray((np.indices((28, 28)).sum(0) % 7 * 36).astype(np.uint8)).convert("RGB")
    rng = random.Random(0)
    cases = []
    for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "DDS"):
        buffer = io.BytesIO()
        digit.save(buffer, fmt)
        seed = buffer.getvalue()
        cases.append((fmt, seed))
        for i in range(n_per_format):
            data = bytearray(seed)
            kind = i % 3
            if kind == 0:  # flip bytes, mostly in the header where the decoders' choices are made
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(min(len(data), 64 if rng.random() < 0.7 else len(data)))] = rng.randrange(256)
            elif kind == 1:
                data = data[: rng.randrange(1, len(data))]
            else:
                at = rng.randrange(len(data))
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
            cases.append((f"{fmt} mutant {i}", bytes(data)))
    return cases


def test_no_upload_gets_a_5xx_and_its_batch_neighbours_are_answered(trained: Path) -> None:
    """Every mutant through the worker's own path (decode, batched predict, encode) in batches with good requests:
    each answered 200 or 4xx, never an exception; the good ones all 200. JSON bodies through the upload middleware."""
    import base64

    from mnist_dlops.model.served import resolve
    from mnist_dlops.serve.api import DigitAPI, _json_body

    api = DigitAPI(resolve(None, str(trained), str(trained.parents[2])), max_batch_size=8)
    api.setup("cpu")
    good = {"image": base64.b64encode(mutants(0)[0][1]).decode()}
    cases = mutants()
    assert len(cases) >= 300
    statuses: dict[str, int] = {}
    for start in range(0, len(cases), 4):
        chunk = cases[start : start + 4]
        requests = [x for name, data in chunk for x in ({"image": base64.b64encode(data).decode()}, good)]
        answers = [api.encode_response(out) for out in api.predict([api.decode_request(r) for r in requests])]
        for (name, _), mutant, neighbour in zip(chunk, answers[::2], answers[1::2]):
            statuses[name] = mutant.status_code
            assert neighbour.status_code == 200, name
    assert set(statuses.values()) <= {200, 400, 413}, {k: v for k, v in statuses.items() if v >= 500}
    assert statuses["DDS"] == 400  # a format outside the accepted list is refused before decoding
    assert all(statuses[fmt] == 200 for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"))
    for body in (b"[" * 1200 + b"]" * 1200, b'{"a":' * 1200 + b"1" + b"}" * 1200, b"[1,2,3]", b"null", b'"x"'):
        with pytest.raises(ValueError):
            _json_body(body)
