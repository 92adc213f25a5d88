"""The served model over real HTTP on loopback, and the page in a real headless Chromium: one server for the module,
serving the model tests/test_serve.py's ``lab`` trains and registers, stopped at the end."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTOS, digit_photo
from PIL import Image
from test_serve import ARTIFACTS, CHROMIUM, _png, get, lab, mnist_test, multipart, post, start_server, stop_group  # noqa: F401

from mnist_dlops.cli.app import cli_main
from mnist_dlops.module import rebuild


@pytest.fixture(scope="module")
def server(lab: Path) -> str:
    """``mnist-dlops serve --model models:/mnist-digits@production`` on a free loopback port."""
    process, url = start_server(lab, "--model", "models:/mnist-digits@production", "--workers", "2")
    try:
        yield url
    finally:
        stop_group(process)


@pytest.mark.slow  # a long real run or a server: in `pytest -m slow` and CI, to keep the default run short
def test_http_predictions_equal_cli_predict(lab: Path, server: str, mnist_dir: Path) -> None:
    """The same PNGs (MNIST digits as photos on every kind of paper, and as plain 28x28 files) through
    ``cli.py predict`` and through the server: the same classes and probabilities; raw and multipart uploads."""
    images, labels = mnist_test(mnist_dir, 40)
    folder = lab / "uploads"
    shutil.rmtree(folder, ignore_errors=True)
    kinds = [*sorted(PHOTOS), "plain"]
    for i, (image, label) in enumerate(zip(images, labels)):
        kind = kinds[i % len(kinds)]
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        data = digit_photo(image, seed=i, **PHOTOS[kind]) if kind != "plain" else _png(image)
        (folder / str(label) / f"{i:03d}-{kind}.png").write_bytes(data)
    here = os.getcwd()
    os.chdir(lab)
    try:
        # In fp32, as the server runs the export: the run's own precision (bf16 where the CPU has it) moves
        # probabilities by ~1e-4, which would hide a difference in preprocessing.
        cli_main(["predict", "--ckpt_path", "best", "--data.predict_dir", str(folder),
                  "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true"])
    finally:
        os.chdir(here)
    (csv_file,) = (lab / "lightning_logs/version_0").glob("predictions*.csv")
    rows = list(csv.DictReader(open(csv_file)))
    assert len(rows) == 40
    correct = 0
    for i, row in enumerate(rows):
        data = Path(row["file"]).read_bytes()
        body, kind = multipart("image", "digit.png", data) if i % 2 else (data, "image/png")
        status, answer = post(f"{server}/predict", body, kind)
        assert status == 200, answer
        assert answer["class"] == row["predicted"], (row, answer)
        assert abs(answer["probabilities"][row["predicted"]] - float(row["probability"])) <= 2e-5
        assert answer["model"] == {"name": "mnist-digits", "version": "1"}
        correct += answer["class"] == row["true"]
    assert correct >= 36, f"{correct}/40 photos and scans read right"


@pytest.mark.slow  # a long real run or a server: in `pytest -m slow` and CI, to keep the default run short
def test_a_json_batch_and_the_metadata(lab: Path, server: str, mnist_dir: Path) -> None:
    images, labels = mnist_test(mnist_dir, 8)
    status, answer = post(f"{server}/predict", json.dumps({"images": images.tolist()}).encode(), "application/json")
    assert status == 200
    # The same JSON as `curl -d` sends it, with a form's content type: read as the JSON it is.
    again = post(f"{server}/predict", json.dumps({"images": images.tolist()}).encode(),
                 "application/x-www-form-urlencoded")
    assert again[0] == 200 and [p["probabilities"] for p in again[1]["predictions"]] == \
        [p["probabilities"] for p in answer["predictions"]]
    best = sorted((lab / "lightning_logs/version_0/checkpoints").glob("epoch*.ckpt"))[0]
    with torch.no_grad():
        expected = rebuild(best)(torch.from_numpy(images[:, None].copy())).softmax(-1).numpy()
    got = np.array([[p["probabilities"][str(c)] for c in range(10)] for p in answer["predictions"]])
    assert np.abs(got - expected).max() <= 2e-6 and [int(p["class"]) for p in answer["predictions"]] == \
        expected.argmax(1).tolist()
    status, body = get(f"{server}/metadata")
    meta = json.loads(body)
    assert status == 200 and meta["model"]["name"] == "mnist-digits" and meta["model"]["version"] == "1"
    assert meta["classes"] == [str(c) for c in range(10)] and len(meta["data_fingerprint"]) == 64
    assert get(f"{server}/health") == (200, b"ok")
    # FastAPI's pages load scripts from a CDN and are not our API: LitServe's disable_openapi_url drops them.
    assert [get(f"{server}{path}")[0] for path in ("/docs", "/redoc", "/openapi.json")] == [404, 404, 404]


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")  # a few kB on disk, 400 megapixels decoded
    return buffer.getvalue()


@pytest.mark.slow  # a long real run or a server: in `pytest -m slow` and CI, to keep the default run short
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(server: str, mnist_dir: Path) -> None:
    good = _png(mnist_test(mnist_dir, 1)[0][0])
    cases = {
        "empty body": (b"", "image/png", 400, "empty body"),
        "not an image": (b"hello, server", "application/octet-stream", 400, "not a readable image"),
        "truncated PNG": (good[: len(good) // 2], "image/png", 400, "not a readable image"),
        "decompression bomb": (_bomb(), "image/png", 413, "pixels than the"),
        "JSON that does not parse": (b"{\"images\": [", "application/json", 400, "does not parse"),
        "wrong JSON shape": (json.dumps({"images": [[1, 2, 3]]}).encode(), "application/json", 400, "shape"),
        "values out of range": (json.dumps({"images": [[[300] * 28] * 28]}).encode(), "application/json", 400,
                                "0 to 255"),
        "no known key": (json.dumps({"pixels": 1}).encode(), "application/json", 400, "no \"image\""),
        "bad base64": (json.dumps({"image": "***"}).encode(), "application/json", 400, "base64"),
        "empty multipart": (*multipart("image", "x.png", b""), 400, "no file"),
        "huge upload": (os.urandom(11 * 2**20), "image/png", 413, "MB accepted"),
        "a DDS file (not an accepted format)": (_dds(), "image/png", 400, "not a readable image"),
        "JSON nested 1,200 deep": (b"[" * 1200 + b"]" * 1200, "application/json", 400, "nested too deeply"),
        "a JSON list": (b"[1, 2, 3]", "application/json", 400, "expected a JSON object"),
        "JSON null": (b"null", "application/json", 400, "expected a JSON object"),
    }
    for name, (body, kind, code, reason) in cases.items():
        status, answer = post(f"{server}/predict", body, kind)
        assert status == code and reason in answer["detail"], (name, status, answer)
        assert "\n" not in answer["detail"] and "Traceback" not in answer["detail"]
        assert post(f"{server}/predict", good, "image/png")[0] == 200, f"not serving after {name}"
    # Mistakes batched together with good requests (LitServe batches across clients) fail alone.
    from concurrent.futures import ThreadPoolExecutor

    mixed = [(good, "image/png", 200) if i % 3 else (b"junk", "image/png", 400) for i in range(48)]
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda case: post(f"{server}/predict", case[0], case[1])[0], mixed))
    assert statuses == [code for _, _, code in mixed]


@pytest.mark.slow  # a long real run or a server: in `pytest -m slow` and CI, to keep the default run short
def test_the_page_in_chromium_reads_a_drawn_seven(lab: Path, server: str, mnist_dir: Path) -> None:
    """Headless Chromium draws MNIST's first test digit (a 7) on the canvas, stroke by stroke along its pixels, and
    reads the model's answer, the 28x28 image and ten probability bars off the page; a screenshot is kept."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    images, labels = mnist_test(mnist_dir, 1)
    assert labels[0] == 7
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 600})
            page.goto(server, timeout=30_000)
            page.wait_for_function("document.getElementById('model').textContent.includes('version 1')")
            box = page.locator("#pad").bounding_box()
            scale = box["width"] / 28
            for y, row in enumerate(images[0] > 100):  # each horizontal run of ink is one stroke
                x = 0
                while x < 28:
                    if not row[x]:
                        x += 1
                        continue
                    end = x
                    while end + 1 < 28 and row[end + 1]:
                        end += 1
                    at = lambda c: (box["x"] + (c + 0.5) * scale, box["y"] + (y + 0.5) * scale)  # noqa: E731
                    page.mouse.move(*at(x))
                    page.mouse.down()
                    page.mouse.move(*at(end), steps=3)
                    page.mouse.up()
                    x = end + 1
            page.wait_for_function("document.getElementById('prediction').dataset.state === 'done'", timeout=30_000)
            predicted = page.locator("#prediction").text_content()
            bars = page.locator("#bars .bar").count()
            seen = page.evaluate("Array.from(document.getElementById('seen').getContext('2d')"
                                 ".getImageData(0, 0, 28, 28).data).filter((v, i) => i % 4 == 0 && v > 0).length")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve-page.png"))
            # The user says it is a 1, not a 7 (a correction): the page sends it and shows it stored.
            page.locator("#digits button[data-label='1']").click()
            page.wait_for_function("document.getElementById('thanks').dataset.stored", timeout=30_000)
            stored = int(page.evaluate("document.getElementById('thanks').dataset.stored"))
            shown = np.array(page.evaluate("lastAnswer.image"), dtype=np.uint8)
            page.screenshot(path=str(ARTIFACTS / "serve-page-feedback.png"))
        finally:
            browser.close()
    assert predicted == "7" and bars == 10 and seen > 50
    import sqlite3

    with sqlite3.connect(lab / "lightning_logs/feedback.db") as db:
        label, before, image = db.execute("SELECT label, predicted, image FROM feedback WHERE id = ?",
                                          (stored,)).fetchone()
    assert (label, before) == ("1", "7")
    assert (np.frombuffer(image, dtype=np.uint8).reshape(28, 28) == shown).all()  # the image the model saw


def _dds() -> bytes:
    """A small DDS image: Pillow decodes DDS, and a crafted one made it raise NotImplementedError (a 500)."""
    buffer = io.BytesIO()
    Image.new("RGB", (28, 28)).save(buffer, "DDS")
    return buffer.getvalue()
