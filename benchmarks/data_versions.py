"""What data versions cost: `dvc add` and `dvc checkout` of MNIST, and what `--data.version` adds to a fit's start.

    python benchmarks/data_versions.py --data_dir ../shared/data/mnist [--rounds 3]

In a temporary git repository with DVC (analytics off, a local-folder remote): MNIST recorded as v1 and a relabelled
copy as v2 (timed: `datasets add`, which is dvc add + git commit + dvc push), then `dvc checkout` between them. Then,
interleaved in each round, the data module's set-up (what a fit does before its first step: resolve the version,
read, fingerprint, split) on the working copy and on `version=v1`, the first read of v1 (fetched from DVC's cache
into its own folder) timed apart. Prints the medians and the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DVC = str(Path(sys.executable).with_name("dvc"))


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    return time.perf_counter() - started


def setup_time(version: str | None) -> float:
    from mnist_dlops.data import MNISTDataModule

    started = time.perf_counter()
    module = MNISTDataModule("data/mnist", download=False, version=version)
    module.prepare_data()
    module.setup("fit")
    module.fingerprint  # noqa: B018 - what a run records
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="../shared/data/mnist")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    source = Path(args.data_dir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        root.mkdir()
        for command in (["git", "init", "-q"], ["git", "config", "user.email", "b@example.com"],
                        ["git", "config", "user.name", "bench"], [DVC, "init", "-q"],
                        [DVC, "config", "core.analytics", "false"],
                        [DVC, "remote", "add", "-d", "local", str(Path(tmp) / "remote")]):
            subprocess.run(command, cwd=root, check=True, capture_output=True)
        (root / "data/mnist").mkdir(parents=True)
        for file in source.glob("*-ubyte.gz"):
            shutil.copy(file, root / "data/mnist")
        subprocess.run(["git", "add", ".dvc", ".dvcignore"], cwd=root, check=True)
        subprocess.run(["git", "commit", "-qm", "DVC"], cwd=root, check=True)
        module = [sys.executable, "-m", "mnist_dlops", "datasets"]
        add_v1 = timed([*module, "add", "data/mnist", "--tag", "v1"], root)
        timed([*module, "relabel", "data/mnist", "--n", "500"], root)
        add_v2 = timed([*module, "add", "data/mnist", "--tag", "v2"], root)
        checkouts = []
        for tag in ("v1", "v2") * args.rounds:
            subprocess.run(["git", "checkout", "-q", tag, "--", "data/mnist.dvc"], cwd=root, check=True)
            checkouts.append(timed([DVC, "checkout", "-q", "data/mnist.dvc"], root))
        os.chdir(root)
        first_read = setup_time("v1")  # fetches v1 from the cache into .dvc/tmp: once per version
        plain, versioned = [], []
        for _ in range(args.rounds):
            plain.append(setup_time(None))
            versioned.append(setup_time("v1"))
    print(f"datasets add (dvc add + commit + push) of MNIST: v1 {add_v1:.2f} s, v2 {add_v2:.2f} s")
    print(f"dvc checkout between v1 and v2: median {statistics.median(checkouts):.2f} s "
          f"({min(checkouts):.2f}-{max(checkouts):.2f} s, {len(checkouts)} checkouts)")
    print(f"data set-up, working copy: median {statistics.median(plain):.2f} s; --data.version v1: median "
          f"{statistics.median(versioned):.2f} s (its first read {first_read:.2f} s)")
    print(f"ratio_version_setup={statistics.median(versioned) / statistics.median(plain):.2f} "
          f"version_setup_added_s={statistics.median(versioned) - statistics.median(plain):.2f}")


if __name__ == "__main__":
    main()
