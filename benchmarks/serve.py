"""The model server under load, on loopback, side by side with its limit, in one run.

    python benchmarks/serve.py --data_dir ../shared/data/mnist        # needs wrk and hey (apt-get install wrk hey)

Trains nothing: serves the newest run's best checkpoint (``--ckpt_path``), or trains a one-epoch model first if
there is none. Prints:
- the limit: the same preprocessing (``decode_image`` of the PNG) and forward pass in this process, on one thread;
- closed loop (wrk): throughput and p50/p99 latency at 1 and 50 concurrent connections;
- open loop (hey -q): p99 at a fixed offered load (300 requests/s by default);
- a soak: 10,000 requests, valid and invalid mixed, counting wrong answers, and the server's memory before/after.

The request is what the page sends: a 280x280 PNG of a dark digit on white, posted as the raw body.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mnist_dlops.data.idx import IDX_FILES, find_idx, read_idx  # noqa: E402
from mnist_dlops.data.images import decode_image  # noqa: E402
from mnist_dlops.module import Probabilities, rebuild  # noqa: E402
from mnist_dlops.rundir.run import resolve_ckpt  # noqa: E402


def drawn_png(data_dir: Path) -> bytes:
    """MNIST's first test digit as the page draws it: black on a white 280x280 canvas, PNG."""
    from PIL import Image

    digit = read_idx(find_idx(data_dir, IDX_FILES["test"][0]), 0x00000803)[0]
    canvas = Image.fromarray(255 - digit).resize((280, 280), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG")
    return buffer.getvalue()


def in_process_rate(ckpt: Path, png: bytes, seconds: float = 5.0) -> float:
    """Images per second through decode_image + forward, one at a time, on one thread: what a worker can do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = Probabilities(rebuild(ckpt)).eval()
    n, start = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - start < seconds:
            model(torch.from_numpy(decode_image(png).copy())[None, None])
            n += 1
    torch.set_num_threads(threads)
    return n / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, workers: int, max_batch_size: int, batch_timeout: float,
                 monitor: bool = True) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_dlops", "serve", "--ckpt_path", str(ckpt), "--port", str(port),
         "--workers", str(workers), "--max_batch_size", str(max_batch_size), "--batch_timeout", str(batch_timeout),
         "--monitor", str(monitor).lower()],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    for _ in range(240):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit("the server did not become healthy within two minutes")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's processes; SIGKILL to whatever is left a minute later."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def _ms(value: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if found is None:
        raise SystemExit(f"cannot read wrk's latency {value!r}")
    number, unit = found.groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(url: str, body_file: Path, connections: int, seconds: int) -> tuple[float, float, float]:
    """Closed loop: (requests/s, p50 ms, p99 ms), non-2xx answers counted as failures."""
    script = body_file.with_suffix(".lua")
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "image/png"\n'
        f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
    )
    out = subprocess.run(["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{seconds}s",
                          "--latency", "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw failed requests:\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    # The "Latency Distribution" table's own lines: a bare "50%" at the start of a line ("+/- Stdev" columns
    # elsewhere end in "%" too, e.g. "68.50%").
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)$", out, re.MULTILINE).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)$", out, re.MULTILINE).group(1))
    return rate, p50, p99


def hey(url: str, body_file: Path, rate: int, seconds: int) -> tuple[float, float, float]:
    """Open loop at ``rate`` requests/s (hey -q is per worker): (achieved requests/s, p50 ms, p99 ms).

    hey's workers start their tickers together, so the load arrives in bursts of one request per worker: few
    workers at 50 requests/s each keep the bursts small, closer to an even stream of arrivals."""
    workers = max(1, rate // 50)
    out = subprocess.run(["hey", "-z", f"{seconds}s", "-c", str(workers), "-q", f"{rate / workers:g}", "-m", "POST",
                          "-T", "image/png", "-D", str(body_file), url], capture_output=True, text=True,
                         check=True).stdout
    codes = re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)
    if any(code != "200" for code, _ in codes):
        raise SystemExit(f"hey saw failed requests:\n{out}")
    achieved = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = float(re.search(r"50%+ in ([\d.]+) secs", out).group(1)) * 1e3
    p99 = float(re.search(r"99%+ in ([\d.]+) secs", out).group(1)) * 1e3
    return achieved, p50, p99


def server_rss(process: subprocess.Popen) -> float:
    """Resident memory of the server and its workers, MB."""
    parent = psutil.Process(process.pid)
    return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]) / 2**20


def soak(port: int, png: bytes, n: int, clients: int = 8) -> tuple[int, int, int]:
    """``n`` requests over ``clients`` keep-alive connections, every fifth one invalid (garbage, a cut PNG, bad
    JSON, a wrong shape): (valid answered 200, invalid answered 4xx, anything else)."""
    bad = [(b"not an image", "image/png"), (png[: len(png) // 2], "image/png"), (b"{\"images\": [", "application/json"),
           (b"{\"images\": [[1, 2]]}", "application/json")]
    counts = {"ok": 0, "refused": 0, "wrong": 0}
    lock = threading.Lock()

    def client(share: int, offset: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for i in range(share):
            invalid = (offset + i) % 5 == 4
            body, kind = bad[(offset + i) % len(bad)] if invalid else (png, "image/png")
            connection.request("POST", "/predict", body=body, headers={"Content-Type": kind})
            response = connection.getresponse()
            response.read()
            good = (400 <= response.status < 500) if invalid else response.status == 200
            with lock:
                counts["wrong" if not good else "refused" if invalid else "ok"] += 1

    threads = [threading.Thread(target=client, args=(n // clients, k * 7)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts["ok"], counts["refused"], counts["wrong"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared/data/mnist"))
    parser.add_argument("--ckpt_path", default=None, help="default: the best of the newest run, trained if none")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--batch_timeout", type=float, default=0.001)
    parser.add_argument("--seconds", type=int, default=10, help="per load measurement")
    parser.add_argument("--rate", type=int, default=300, help="offered load of the open-loop measurement")
    parser.add_argument("--soak", type=int, default=10_000)
    parser.add_argument("--monitoring_rounds", type=int, default=3,
                        help="rounds of the monitoring on/off comparison at 50 connections (0: skip it)")
    parser.add_argument("--monitoring_only", action="store_true", help="only the monitoring on/off comparison")
    args = parser.parse_args()

    data_dir = Path(args.data_dir).resolve()
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    if args.ckpt_path:
        ckpt = resolve_ckpt(args.ckpt_path, REPO / "lightning_logs").resolve()
    else:
        print("training a one-epoch model to serve...", flush=True)
        subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", "--data.data_dir", str(data_dir),
                        "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar",
                        "false", "--trainer.callbacks", "[]", "--runs_dir", str(work / "runs")],
                       check=True, capture_output=True)
        ckpt = resolve_ckpt("best", work / "runs").resolve()
    png = drawn_png(data_dir)
    body = work / "digit.png"
    body.write_bytes(png)

    if args.monitoring_only:
        compare_monitoring(ckpt, body, args)
        return
    limit = in_process_rate(ckpt, png)
    port = free_port()
    server = start_server(ckpt, port, args.workers, args.max_batch_size, args.batch_timeout)
    url = f"http://127.0.0.1:{port}/predict"
    try:
        wrk(url, body, 50, 3)  # warm-up
        one = wrk(url, body, 1, args.seconds)
        fifty = wrk(url, body, 50, args.seconds)
        opened = hey(url, body, args.rate, args.seconds)
        rss_before = server_rss(server)
        started = time.perf_counter()
        ok, refused, wrong = soak(port, png, args.soak)
        soak_s = time.perf_counter() - started
        rss_after = server_rss(server)
    finally:
        stop(server)

    print(f"\nserver: {args.workers} workers, max_batch_size {args.max_batch_size}, batch_timeout {args.batch_timeout}; "
          f"request: {len(png)}-byte PNG body")
    print(f"in-process limit (decode_image + forward, 1 thread): {limit:8.0f} images/s")
    print(f"closed loop,  1 connection : {one[0]:8.0f} req/s   p50 {one[1]:6.1f} ms   p99 {one[2]:6.1f} ms")
    print(f"closed loop, 50 connections: {fifty[0]:8.0f} req/s   p50 {fifty[1]:6.1f} ms   p99 {fifty[2]:6.1f} ms   "
          f"({fifty[0] / limit:.2f}x the limit; target >= 0.6, p99 <= 150 ms)")
    print(f"open loop at {args.rate} req/s     : {opened[0]:8.0f} req/s   p50 {opened[1]:6.1f} ms   p99 "
          f"{opened[2]:6.1f} ms   (target p99 <= 50 ms)")
    print(f"soak: {ok + refused + wrong} requests in {soak_s:.0f} s: {ok} valid answered 200, {refused} invalid "
          f"answered 4xx, {wrong} wrong; server memory {rss_before:.0f} MB -> {rss_after:.0f} MB")
    print(f"ratio_vs_inprocess={fifty[0] / limit:.2f} p99_50_ms={fifty[2]:.1f} p99_open_ms={opened[2]:.1f} "
          f"soak_wrong={wrong} rss_growth_mb={rss_after - rss_before:.0f}")
    if args.monitoring_rounds:
        compare_monitoring(ckpt, body, args)


def compare_monitoring(ckpt: Path, body: Path, args: argparse.Namespace) -> None:
    """Throughput and p99 at 50 connections with /metrics and drift counting on and off, in alternating rounds
    (a fresh server each time, the order swapped every round): what monitoring costs, side by side."""
    import statistics

    results: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
    for round_ in range(args.monitoring_rounds):
        for monitor in ((True, False) if round_ % 2 == 0 else (False, True)):
            port = free_port()
            server = start_server(ckpt, port, args.workers, args.max_batch_size, args.batch_timeout, monitor)
            try:
                url = f"http://127.0.0.1:{port}/predict"
                wrk(url, body, 50, 3)  # warm-up
                results[monitor].append(wrk(url, body, 50, args.seconds))
            finally:
                stop(server)
    on, off = ({key: statistics.median(r[i] for r in results[flag]) for i, key in enumerate(("rps", "p50", "p99"))}
               for flag in (True, False))
    print(f"monitoring on : {on['rps']:8.0f} req/s   p99 {on['p99']:6.1f} ms   (rounds: "
          f"{', '.join(f'{r[0]:.0f}' for r in results[True])} req/s)")
    print(f"monitoring off: {off['rps']:8.0f} req/s   p99 {off['p99']:6.1f} ms   (rounds: "
          f"{', '.join(f'{r[0]:.0f}' for r in results[False])} req/s)")
    print(f"monitoring_throughput_ratio={on['rps'] / off['rps']:.3f} monitoring_p99_ratio={on['p99'] / off['p99']:.3f} "
          "(target: throughput ratio >= 0.95)")


if __name__ == "__main__":
    main()
