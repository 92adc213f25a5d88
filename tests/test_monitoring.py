"""Monitoring: the drift statistics on real MNIST, the shipped Prometheus files under promtool, and (slow) the
server with two workers scraped by a real Prometheus, read back through its HTTP API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, free_port

from mnist_dlops.data.idx import IDX_FILES, find_idx, read_idx
from mnist_dlops.model.reference import STATISTICS, Reference, image_statistics

MONITORING = REPO / "monitoring"


def mnist(mnist_dir: Path, split: str) -> np.ndarray:
    return read_idx(find_idx(mnist_dir, IDX_FILES[split][0]), 0x00000803)


def distorted(images: np.ndarray) -> np.ndarray:
    """Shifted 4 pixels right and down, strokes thickened by 2 pixels: inputs unlike MNIST in every statistic."""
    out = np.roll(np.roll(images, 4, axis=1), 4, axis=2)
    thick = out.copy()
    for dy in (-1, 0, 1, 2):
        for dx in (-1, 0, 1, 2):
            thick = np.maximum(thick, np.roll(np.roll(out, dy, axis=1), dx, axis=2))
    return thick


def test_drift_is_low_on_mnists_own_test_set_and_high_on_distorted_digits(mnist_dir: Path) -> None:
    train, test = mnist(mnist_dir, "train"), mnist(mnist_dir, "test")
    reference = Reference.from_values(image_statistics(train[np.random.default_rng(0).permutation(60000)[:10000]]))
    own = image_statistics(test[:2000])
    shifted = image_statistics(distorted(test[2000:4000]))
    for name in STATISTICS[:-1]:  # confidence needs a model: the live test covers it
        assert reference.psi(name, own[name]) < 0.1, name
        assert reference.psi(name, shifted[name]) > 0.25, name


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing: .ci/run installs Debian's prometheus")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def test_the_shipped_config_and_rules_pass_promtool_and_the_drift_alert_fires() -> None:
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"],
                 ["test", "rules", "rules_test.yml"]):
        result = subprocess.run([promtool(), *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert "SUCCESS" in result.stdout


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def post_images(url: str, images: np.ndarray) -> list[str]:
    body = json.dumps({"images": images.astype(int).tolist()}).encode()
    request = urllib.request.Request(f"{url}/predict", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return [p["class"] for p in json.load(response)["predictions"]]


@pytest.mark.slow  # a trained model, a server with two workers and a Prometheus: in `pytest -m slow` and CI
def test_prometheus_reads_whole_counts_and_drift_from_two_workers(tmp_path: Path, mnist_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus missing: .ci/run installs Debian's prometheus")
        pytest.skip("prometheus is not installed")
    from test_serve import start_server, stop_group

    from mnist_dlops.cli.app import cli_main
    from mnist_dlops.commands.export import export

    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--data.data_dir", str(mnist_dir), "--data.download", "false", "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "150", "--trainer.enable_progress_bar", "false",
              "--trainer.callbacks", "[]", "--trainer.logger", "false"])
    export("best", formats=["torchscript"], out_dir=str(tmp_path / "export"))
    assert (tmp_path / "export/reference.json").is_file()
    server, url = start_server(tmp_path, "--model", str(tmp_path / "export/model.pt"), "--workers", "2")
    port = free_port()
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(MONITORING / "rules.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [url.removeprefix("http://")]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    with open(tmp_path / "prometheus.log", "w") as log:
        prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api/v1/query?query="

    def query(expr: str) -> dict[str, float]:
        for _ in range(60):
            try:
                result = get_json(api + urllib.parse.quote(expr))["data"]["result"]
                if result:
                    return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in result}
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"Prometheus never answered {expr}: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")

    def settled(expr: str, expected: float) -> None:
        for _ in range(30):  # until a scrape after the last request has been taken
            if abs(sum(query(expr).values()) - expected) < 1e-9:
                return
            time.sleep(1)
        assert sum(query(expr).values()) == expected, expr

    try:
        query("sum(mnist_input_bin_total)")  # scraped once at zero before any request
        test = mnist(mnist_dir, "test")
        predicted: list[str] = []
        for start in range(0, 400, 10):  # 40 requests of 10 MNIST digits, spread over both workers
            predicted += post_images(url, test[start : start + 10])
        settled('sum(mnist_requests_total{route="/predict"})', 40)
        time.sleep(3)  # a few rule evaluations over the MNIST-only window
        own = {json.loads(k)["statistic"]: v for k, v in query("mnist:drift_psi:5m").items()}
        for start in range(400, 800, 10):
            predicted += post_images(url, distorted(test[start : start + 10]))
        settled('sum(mnist_requests_total{route="/predict"})', 80)
        counts = {json.loads(k)["digit"]: v for k, v in query("sum by (digit) (mnist_predictions_total)").items()}
        assert counts == {d: float(predicted.count(d)) for d in set(predicted)}
        assert sum(query("mnist_batch_images_count").values()) >= 2
        time.sleep(3)
        shifted = {json.loads(k)["statistic"]: v for k, v in query("mnist:drift_psi:5m").items()}
        assert set(own) == set(shifted) == set(STATISTICS)
        for name in STATISTICS:
            assert shifted[name] > own[name], (name, own, shifted)
        info = query("mnist_model_info")
        assert any(json.loads(k)["format"] == "torchscript" for k in info)
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        stop_group(server)
