"""Start-up of each command that does not train, against a bare import of its heaviest library, side by side.

    python benchmarks/startup.py [--rounds 5]

Every round runs each command and each bare ``python -c "import <library>"`` once, interleaved, so a busy machine
slows both alike; medians are reported. The commands run as a user types them (the installed ``mnist-dlops``
script, else ``python -m mnist_dlops``) in a scratch folder holding one recorded run, so ``runs`` has a row to read
and ``registry list`` an empty store. The first training step of ``python cli.py fit`` against ``import
pytorch_lightning`` is ``benchmarks/throughput.py``'s (first_step_ratio). The last line is machine-readable:
``<command>=<seconds over its library's import>`` for each command.
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
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from mnist_dlops.data.idx import write_idx_set  # noqa: E402
from mnist_dlops.rundir.run import write_summary  # noqa: E402

# command -> (its arguments, the import of the heaviest library it loads; "pass": nothing beyond Python)
COMMANDS = {
    "--help": (["--help"], "pass"),
    # What MLflow needs to list a registry: its SQL store, which a bare `import mlflow` defers.
    "registry list": (["registry", "list"], "import mlflow.store.tracking.sqlalchemy_store"),
    "runs": (["runs"], "import pandas"),
    "datasets list": (["datasets", "list", "data"], "import jsonargparse"),
    "serve --help": (["serve", "--help"], "import jsonargparse"),
    # The sweep's options are the training CLI's own (trainer.*, model.*), which Lightning's classes define.
    "sweep --help": (["sweep", "--help"], "import pytorch_lightning"),
}


def scratch(folder: Path, command: list[str]) -> None:
    """One recorded run (config, metrics, best-checkpoint summary), and a git repository with DVC and a data folder
    (what ``datasets list`` lists the versions of)."""
    checkpoints = folder / "lightning_logs" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints.parent / "config.yaml").write_text("model: {}\ndata: {}\ntrainer: {max_epochs: 2}\n")
    (checkpoints.parent / "metrics.csv").write_text("epoch,step,val/acc,val/loss\n0,429,0.988,0.04\n1,859,0.991,0.03\n")
    (checkpoints / "epoch01-val_loss0.0300.ckpt").write_bytes(b"")
    write_summary(checkpoints, "val/loss", "min", "epoch01-val_loss0.0300.ckpt", 0.03)
    rng = np.random.default_rng(0)
    sizes = {"train": 60, "test": 20}
    write_idx_set(folder / "data", {split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                                            rng.integers(0, 10, n, dtype=np.uint8)) for split, n in sizes.items()})
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "-q"], cwd=folder, check=True)
    subprocess.run([dvc, "config", "core.analytics", "false"], cwd=folder, check=True)
    subprocess.run([dvc, "remote", "add", "-d", "local", str(folder / "remote")], cwd=folder, check=True)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run([*git, "commit", "-qam", "dvc init"], cwd=folder, check=True)
    added = subprocess.run([*command, "datasets", "add", "data", "--tag", "v1"], cwd=folder, capture_output=True,
                           text=True)
    if added.returncode != 0:
        raise SystemExit(f"datasets add failed:\n{added.stderr[-2000:]}")


def timed(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved rounds; medians are reported.")
    opts = parser.parse_args()
    script = Path(sys.executable).with_name("mnist-dlops")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "mnist_dlops"]
    imports = sorted({library for _, library in COMMANDS.values()})
    times: dict[str, list[float]] = {name: [] for name in [*COMMANDS, *imports]}
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        scratch(cwd, command)
        for round_ in range(opts.rounds):
            for library in imports:
                times[library].append(timed([sys.executable, "-c", library], cwd))
            for name, (args, _) in COMMANDS.items():
                times[name].append(timed([*command, *args], cwd))
            print(f"round {round_ + 1}/{opts.rounds} done", flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"\nmedian wall seconds over {opts.rounds} rounds ({' '.join(command)}):")
    overheads = {}
    for name, (_, library) in COMMANDS.items():
        overheads[name] = median[name] - median[library]
        print(f"  {name:14s} {median[name]:5.2f} s   bare import {median[library]:5.2f} s   over it "
              f"{overheads[name]:+.2f} s   ratio {median[name] / median[library]:.2f}   (python -c {library!r})")
    print(" ".join(f"{name.replace(' ', '_')}={seconds:.2f}" for name, seconds in overheads.items()))


if __name__ == "__main__":
    main()
