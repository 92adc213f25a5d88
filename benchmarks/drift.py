"""The drift scores as the inputs change: MNIST's own test digits, then shifted, thickened and faint ones.

    python benchmarks/drift.py --data_dir ../shared/data/mnist [--out docs/drift.png]

Trains a one-epoch model (or takes --ckpt_path), computes its reference on 10,000 training digits as export and
registration do, then scores windows of 500 requests, each the same PSI per statistic that monitoring/rules.yml
computes in Prometheus. Prints a table and draws it; the README's Monitoring section shows the plot.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mnist_dlops.data.idx import IDX_FILES, find_idx, read_idx  # noqa: E402
from mnist_dlops.model.reference import (  # noqa: E402
    STATISTICS,
    image_statistics,
    training_reference,  # noqa: E402
)
from mnist_dlops.module import Probabilities, rebuild  # noqa: E402
from mnist_dlops.rundir.run import resolve_ckpt  # noqa: E402


def shifted(images: np.ndarray, pixels: int) -> np.ndarray:
    return np.roll(np.roll(images, pixels, axis=1), pixels, axis=2)


def thickened(images: np.ndarray) -> np.ndarray:
    out = images.copy()
    for dy, dx in ((0, 1), (1, 0), (1, 1)):
        out = np.maximum(out, np.roll(np.roll(images, dy, axis=1), dx, axis=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared/data/mnist"))
    parser.add_argument("--ckpt_path", default=None)
    parser.add_argument("--out", default=str(REPO / "docs" / "drift.png"))
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    if args.ckpt_path:
        ckpt = resolve_ckpt(args.ckpt_path, REPO / "lightning_logs")
    else:
        work = Path(tempfile.mkdtemp(prefix="drift-"))
        subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", "--data.data_dir", str(data_dir),
                        "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar",
                        "false", "--trainer.callbacks", "[]", "--runs_dir", str(work)], check=True, capture_output=True)
        ckpt = resolve_ckpt("best", work)
    model = Probabilities(rebuild(ckpt)).eval()
    reference = training_reference(ckpt, model)
    test = read_idx(find_idx(data_dir, IDX_FILES["test"][0]), 0x00000803)
    windows = [("MNIST test", test[:500]), ("MNIST test", test[500:1000]), ("shift 2 px", shifted(test[1000:1500], 2)),
               ("shift 4 px", shifted(test[1500:2000], 4)), ("thickened", thickened(test[2000:2500])),
               ("faint (x0.5)", (test[2500:3000] * 0.5).astype(np.uint8)), ("MNIST test", test[3000:3500])]
    scores = []
    for _, images in windows:
        values = image_statistics(images)
        with torch.inference_mode():
            values["confidence"] = model(torch.from_numpy(images.copy())[:, None]).max(dim=1).values.numpy()
        scores.append([reference.psi(name, values[name]) for name in STATISTICS])
    print(f"{'window':<14}" + "".join(f"{name:>15}" for name in STATISTICS))
    for (label, _), row in zip(windows, scores):
        print(f"{label:<14}" + "".join(f"{value:15.3f}" for value in row))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4))
    for i, name in enumerate(STATISTICS):
        axis.plot(range(len(windows)), [row[i] for row in scores], marker="o", label=name)
    axis.axhline(0.25, color="red", linestyle="--", linewidth=1, label="alert (PSI 0.25)")
    axis.set_xticks(range(len(windows)), [label for label, _ in windows], rotation=20)
    axis.set_yscale("symlog", linthresh=0.1)
    axis.set_ylim(bottom=0)
    axis.set_ylabel("PSI against the training data")
    axis.set_title("Input drift per statistic, windows of 500 requests")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
