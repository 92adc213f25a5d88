"""What MLflow tracking adds to the default fit: TensorBoard alone against TensorBoard + MLflow, interleaved.

    python benchmarks/mlflow_overhead.py --data_dir ../shared/data/mnist [--rounds 2]

Each round runs ``cli.py fit`` (the default experiment, in its own process, as a user runs it) once with each
logger set, in alternating order, into one runs folder whose MLflow store an untimed first run has created (a
runs folder's first MLflow run creates its database once; that one-off cost is printed apart). Prints the wall
times and the median ratio; the issue's target is <= 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TENSORBOARD = "mnist_dlops.trackers.tensorboard.TensorBoardLogger"
MLFLOW = "mnist_dlops.trackers.mlflow.MLflowLogger"


def fit(data_dir: Path, runs_dir: Path, loggers: list[str], extra: list[str]) -> float:
    logger = "[" + ", ".join(f"{{class_path: {c}}}" for c in loggers) + "]"
    started = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", "--data.data_dir", str(data_dir),
                    "--trainer.enable_progress_bar", "false", "--runs_dir", str(runs_dir), "--trainer.logger", logger,
                    *extra], check=True, capture_output=True, env=_env())
    return time.perf_counter() - started


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared/data/mnist"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="more cli.py flags for both (e.g. --trainer.max_epochs 1)")
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    times: dict[str, list[float]] = {"tensorboard": [], "tensorboard+mlflow": []}
    runs = Path(tempfile.mkdtemp(prefix="mlflow-bench-"))
    short = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    first = fit(data_dir, runs, [MLFLOW], short) - fit(data_dir, runs / "tb", [TENSORBOARD], short)
    print(f"a runs folder's first MLflow run creates its store: {first:+.1f} s (once)", flush=True)
    for r in range(args.rounds):
        order = [("tensorboard", [TENSORBOARD]), ("tensorboard+mlflow", [TENSORBOARD, MLFLOW])]
        for name, loggers in order if r % 2 == 0 else order[::-1]:
            seconds = fit(data_dir, runs, loggers, args.extra)
            times[name].append(seconds)
            print(f"round {r + 1}: {name:<20} {seconds:6.1f} s", flush=True)
    ratios = [m / t for t, m in zip(times["tensorboard"], times["tensorboard+mlflow"])]
    print(f"median wall: tensorboard {statistics.median(times['tensorboard']):.1f} s, tensorboard+mlflow "
          f"{statistics.median(times['tensorboard+mlflow']):.1f} s; per-round ratios "
          + ", ".join(f"{x:.3f}" for x in ratios))
    print(f"mlflow_overhead_ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
