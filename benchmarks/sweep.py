"""What a sweep pays per trial beyond training: trials in the sweep's process against one ``cli.py fit`` process each.

    python benchmarks/sweep.py --data_dir ../shared/data/mnist

Runs the same 8 short trials (the quick sweep's recipe, a few lrs) twice, interleaved: in-process through
``mnist_dlops.cli.run`` (as ``mnist-dlops sweep`` runs them), and as separate ``python cli.py fit``
processes. A trial's overhead is its wall time minus the training stage's own wall time (``wall_time_s`` in the
run's ``provenance.yaml``: from the stage's setup to its end), so start-up, imports, parsing, data loading and
teardown are what is counted. The last line reads ``overhead_in_process_s=<x> overhead_subprocess_s=<y> ratio=<y/x>``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mnist_dlops.cli.app import run  # noqa: E402

LRS = [0.002, 0.004, 0.006, 0.008, 0.01, 0.012, 0.014, 0.016]


def trial_args(data_dir: str, lr: float, runs_dir: Path) -> list[str]:
    return ["fit", "--data.data_dir", data_dir, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "80",
            "--trainer.limit_val_batches", "20", "--model.optimizer.init_args.lr", str(lr),
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--runs_dir", str(runs_dir)]


def overhead(wall: float, run_dir: Path) -> float:
    return wall - yaml.safe_load((run_dir / "provenance.yaml").read_text())["wall_time_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
    data_dir = parser.parse_args().data_dir
    inproc, subproc = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, lr in enumerate(LRS):
            start = time.perf_counter()
            cli = run(trial_args(data_dir, lr, Path(tmp) / "in"))
            inproc.append(overhead(time.perf_counter() - start, Path(cli.run_dir)))
            start = time.perf_counter()
            subprocess.run([sys.executable, str(REPO / "cli.py"), *trial_args(data_dir, lr, Path(tmp) / "sub")],
                           check=True, capture_output=True)
            subproc.append(overhead(time.perf_counter() - start, Path(tmp) / "sub" / f"version_{i}"))
            print(f"trial {i}: overhead in-process {inproc[-1]:.2f} s, separate process {subproc[-1]:.2f} s",
                  flush=True)
    a, b = statistics.median(inproc), statistics.median(subproc)
    print(f"median overhead per trial: in-process {a:.2f} s (range {min(inproc):.2f}-{max(inproc):.2f}), "
          f"separate process {b:.2f} s (range {min(subproc):.2f}-{max(subproc):.2f})")
    print(f"overhead_in_process_s={a:.3f} overhead_subprocess_s={b:.3f} ratio={b / a:.2f}")


if __name__ == "__main__":
    main()
