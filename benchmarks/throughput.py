"""Training speed of the default recipe: our full stack against a plain PyTorch loop, start-up, memory, time to 99%.

    python benchmarks/throughput.py --data_dir ../shared/data/mnist

Measured in one process run, interleaved (raw, ours, seed, raw, ours, seed...), on the same network, batch size,
optimizer, schedule and data, and reported as medians, so that a busy machine slows all three alike:

1. raw:  a plain PyTorch loop over the in-memory uint8 tensors (slice, normalize, forward, loss, backward, the
         default's fused Adam, one-cycle schedule and precision: bf16 autocast where the CPU has bf16), and the
         same loop in fp32 (the bf16/fp32 ratio) and in NCHW (the channels-last ratio);
2. ours: ``cli.py fit`` with the default stack (metrics, logging, diagnostics, checkpoints, progress bar), timed
         by Lightning's ``Timer`` callback over the training epoch, validation excluded;
3. seed: the seeds' recipe on today's Lightning: their LightningModule (batch accuracy logged to the progress
         bar at every step) in a Trainer set up as theirs, fed by their ``DataLoader`` that reads one PNG per sample
         with scikit-image's ``imread`` (PIL when scikit-image is not installed: about 5x faster), same network.

Then the default config itself, once per seed (``--seeds``): training seconds (Timer: train, validation included)
and test accuracy, seconds from process start to the first training step, and the peak and per-epoch resident
memory (``probe.Probe``); and ``python cli.py --help`` against ``python -c "import pytorch_lightning"``. The last
line is machine-readable: ``ratio_vs_raw=<x> ratio_vs_seed=<y> bf16_vs_fp32=<b> time_to_99_s=<z>
first_step_ratio=<r> peak_rss_mb=<m>``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mnist_dlops.cli.app import DEFAULT_OPTIMIZER  # noqa: E402
from mnist_dlops.data import MNISTDataModule  # noqa: E402
from mnist_dlops.data.idx import read_idx_split  # noqa: E402
from mnist_dlops.data.images import MNIST_MEAN, MNIST_STD  # noqa: E402
from mnist_dlops.networks import MLP, FastCNN  # noqa: E402
from mnist_dlops.rundir.record import default_precision  # noqa: E402
from mnist_dlops.schedules import OneCycleLR  # noqa: E402

# Lightning's Timer; its interval is given as a plain string, as its default (an Enum) does not dump to YAML.
TIMER = '{"class_path": "pytorch_lightning.callbacks.Timer", "init_args": {"interval": "epoch"}}'
try:  # the seeds' image reader, if installed (pip install scikit-image); not a dependency of the project
    from skimage.io import imread as IMREAD
except ImportError:
    IMREAD = None
# The probe callback (benchmarks/probe.py) is our own code: trusted by name, importable from this folder.
PROBE_ENV = {**os.environ, "MNIST_DLOPS_TRUST": "probe", "PYTHONPATH": str(REPO / "benchmarks")}
# The default recipe's batch size and peak lr, as the CLI sets them.
DEFAULT_BATCH = inspect.signature(MNISTDataModule).parameters["batch_size"].default
DEFAULT_LR = DEFAULT_OPTIMIZER["init_args"]["lr"]
BF16 = default_precision() == "bf16-mixed"  # the default's precision on this machine
NETWORKS = {"mlp": ("mnist_dlops.networks.MLP", MLP), "cnn": ("mnist_dlops.networks.FastCNN", FastCNN)}


def raw_loop(
    network: str, images: torch.Tensor, labels: torch.Tensor, batch_size: int, steps: int, contiguous: bool = False,
    bf16: bool = BF16,
) -> float:
    """Samples/s of the plainest training loop over resident tensors, with the default's optimizer, schedule and
    precision (``bf16``: autocast); ``contiguous``: the network's weights in NCHW instead of its own channels-last."""
    torch.manual_seed(0)
    model = NETWORKS[network][1](10)
    if contiguous:
        model = model.to(memory_format=torch.contiguous_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=DEFAULT_LR, fused=True)
    schedule = OneCycleLR(optimizer, steps)  # the default schedule itself, peaking at the optimizer's lr
    order = torch.randperm(len(labels))
    warmup = 10  # untimed: oneDNN builds its kernels for each shape at first use (ours pays that in its model summary)
    for step in range(-warmup, steps):
        if step == 0:
            start = time.perf_counter()
        idx = order[(step * batch_size) % (len(labels) - batch_size) :][:batch_size]
        x = (images[idx].float() / 255.0 - MNIST_MEAN) / MNIST_STD
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # what Lightning's bf16-mixed does
            logits = model.head(model.features(x)) if contiguous else model(x)  # forward() makes x channels-last
            loss = F.cross_entropy(logits, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 0:
            schedule.step()
    return steps * batch_size / (time.perf_counter() - start)


def read_image(path: Path) -> np.ndarray:
    """One image file as an array, with the seeds' reader (scikit-image's ``imread``) when it is installed."""
    if IMREAD is not None:
        return IMREAD(path)
    return np.asarray(Image.open(path))


class PngDataset(torch.utils.data.Dataset):
    """The seeds' dataset: one image file read and decoded per sample."""

    def __init__(self, files: list[Path], labels: list[int]) -> None:
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(read_image(self.files[i])).unsqueeze(0), self.labels[i]


class SeedModule(pl.LightningModule):
    """The seeds' LightningModule, with our network: the batch accuracy computed and logged at every step."""

    def __init__(self, network: str) -> None:
        super().__init__()
        self.network = NETWORKS[network][1](10)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, target = batch
        logits = self.network((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD)
        loss = F.cross_entropy(logits, target)
        self.log("acc", (logits.argmax(-1) == target).float().mean(), prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def seed_recipe(network: str, files: list[Path], labels: list[int], batch_size: int, workdir: Path) -> float:
    """Samples/s of the seeds' recipe over one pass of ``files``: their module in a Trainer set up as theirs
    (default logger and progress bar, no checkpoints), fed by their per-file DataLoader; Lightning's Timer."""
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(PngDataset(files, labels), batch_size=batch_size, shuffle=True)
    timer = pl.callbacks.Timer(interval="epoch")
    trainer = pl.Trainer(max_epochs=1, enable_checkpointing=False, enable_model_summary=False, callbacks=[timer],
                         default_root_dir=workdir / "seed")
    trainer.fit(SeedModule(network), train_dataloaders=loader)
    return len(files) / timer.time_elapsed("train")


def timer_seconds(run_dir: Path) -> dict[str, float]:
    """The per-stage seconds Lightning's Timer callback kept in the run's last checkpoint."""
    states = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    return next(s["time_elapsed"] for k, s in states.items() if k.startswith("Timer"))


def ours(network: str, data_dir: str, batch_size: int, steps: int, workdir: Path) -> float:
    """Samples/s of ``cli.py fit`` with the default stack, over ``steps`` training steps, validation excluded."""
    args = [
        sys.executable, str(REPO / "cli.py"), "fit", "--data.data_dir", data_dir,
        "--model.network", NETWORKS[network][0], "--data.batch_size", str(batch_size),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(steps),
        "--trainer.callbacks+", TIMER,
    ]
    done = subprocess.run(args, cwd=workdir, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"cli.py fit failed:\n{done.stderr[-3000:]}")
    run_dir = max((workdir / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    seconds = timer_seconds(run_dir)
    return steps * batch_size / (seconds["train"] - seconds.get("validate", 0.0))


def default_fit(data_dir: str, workdir: Path, seed: int) -> dict[str, float]:
    """The default config with one seed: training seconds (Timer: train, validation included), test accuracy,
    seconds from process start to the first step, peak RSS and the RSS at the end of each epoch (probe.Probe)."""
    fit = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "fit", "--data.data_dir", data_dir, "--seed_everything", str(seed),
         "--trainer.callbacks+", TIMER, "--trainer.callbacks+", "probe.Probe"],
        cwd=workdir, capture_output=True, text=True, env=PROBE_ENV,
    )
    if fit.returncode != 0:
        raise SystemExit(f"cli.py fit failed:\n{fit.stderr[-3000:]}")
    run_dir = max((workdir / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    seconds = timer_seconds(run_dir)["train"]
    test = subprocess.run([sys.executable, str(REPO / "cli.py"), "test", "--ckpt_path", str(run_dir)],
                          cwd=workdir, capture_output=True, text=True, env=PROBE_ENV)
    match = re.search(r"test/acc\s*│\s*([0-9.]+)", test.stdout)
    if test.returncode != 0 or not match:
        raise SystemExit(f"cli.py test failed:\n{test.stderr[-3000:]}")
    probed = dict(re.findall(r"^(first_step_s|peak_rss_mb)=([0-9.]+)$", fit.stdout, re.M))
    return {"seconds": seconds, "acc": float(match.group(1)), "first_step_s": float(probed["first_step_s"]),
            "peak_rss_mb": float(probed["peak_rss_mb"]),
            "rss_mb": [float(v) for v in re.findall(r"^rss_mb=([0-9.]+)$", fit.stdout, re.M)]}


def startup(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="data/mnist", help="Folder with the four MNIST *-ubyte.gz files.")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH, help="Batch size of every contender.")
    parser.add_argument("--steps", type=int, default=None,
                        help="Training steps timed per raw/ours measurement (default: one epoch's full batches, so "
                             "that ours pays its per-epoch costs, metrics and checkpoints, once, as in a real run).")
    parser.add_argument("--seed_images", type=int, default=3200, help="PNG files the seed recipe reads per pass.")
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved rounds; medians are reported.")
    parser.add_argument("--seeds", type=int, default=3, help="Default fits (seeds 1..N) for time_to_99; 0 skips them.")
    opts = parser.parse_args()
    data_dir = str(Path(opts.data_dir).resolve())
    images, labels = read_idx_split(Path(data_dir), "train")
    images = images.unsqueeze(1).contiguous()
    if opts.steps is None:
        # The default training split: every image but the data module's validation hold-out.
        val_size = inspect.signature(MNISTDataModule).parameters["val_size"].default
        opts.steps = (len(labels) - val_size) // opts.batch_size

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        files = []
        for i in range(opts.seed_images):
            path = workdir / "png" / f"{i:05d}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(images[i, 0].numpy()).save(path)
            files.append(path)
        seed_labels = labels[: opts.seed_images].tolist()

        contenders = ("raw", "fp32", "nchw", "ours", "seed")
        results: dict[str, dict[str, list[float]]] = {n: {k: [] for k in contenders} for n in NETWORKS}
        for round_ in range(opts.rounds):
            for network in NETWORKS:
                r = results[network]
                r["raw"].append(raw_loop(network, images, labels, opts.batch_size, opts.steps))
                if network == "cnn":  # what the CNNs' channels-last layout buys: the same loop in NCHW
                    r["nchw"].append(raw_loop(network, images, labels, opts.batch_size, opts.steps, contiguous=True))
                if network == "cnn" and BF16:  # what bf16 autocast buys: the same loop in fp32
                    r["fp32"].append(raw_loop(network, images, labels, opts.batch_size, opts.steps, bf16=False))
                r["ours"].append(ours(network, data_dir, opts.batch_size, opts.steps, workdir))
                if network == "mlp":
                    r["seed"].append(seed_recipe(network, files, seed_labels, opts.batch_size, workdir))
                print(f"round {round_ + 1}/{opts.rounds} {network}: "
                      + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in r.items() if v), flush=True)

        median = {n: {k: statistics.median(v) for k, v in r.items() if v} for n, r in results.items()}
        print(f"\nsamples/s (median of {opts.rounds}, batch {opts.batch_size}, torch threads {torch.get_num_threads()})")
        for network, m in median.items():
            line = f"  {network}: raw {m['raw']:,.0f}  ours {m['ours']:,.0f}  ours/raw {m['ours'] / m['raw']:.2f}"
            if "nchw" in m:
                line += f"  raw NCHW {m['nchw']:,.0f} (channels-last {m['raw'] / m['nchw']:.2f}x)"
            if "fp32" in m:
                line += f"  raw fp32 {m['fp32']:,.0f} (bf16/fp32 {m['raw'] / m['fp32']:.2f}x)"
            if "seed" in m:
                reader = "scikit-image" if IMREAD is not None else "PIL"
                line += f"  seed ({reader}) {m['seed']:,.0f}  ours/seed {m['ours'] / m['seed']:.1f}"
            print(line)

        help_s = statistics.median(startup([str(REPO / "cli.py"), "--help"]) for _ in range(3))
        import_s = statistics.median(startup(["-c", "import pytorch_lightning"]) for _ in range(3))
        print(f"startup: cli.py --help {help_s:.2f} s, import pytorch_lightning {import_s:.2f} s, "
              f"ratio {help_s / import_s:.2f}")

        fits = []
        for seed in range(1, opts.seeds + 1):
            fits.append(default_fit(data_dir, workdir, seed))
            f = fits[-1]
            print(f"default config, seed {seed}: test/acc {f['acc']:.4f} after {f['seconds']:.1f} s of training; "
                  f"first step {f['first_step_s']:.2f} s after start; RSS by epoch "
                  f"{', '.join(f'{m:.0f}' for m in f['rss_mb'])} MB, peak {f['peak_rss_mb']:.0f} MB", flush=True)

    t99 = first_step_ratio = peak = float("nan")
    if fits:
        median_s = statistics.median(f["seconds"] for f in fits)
        t99 = median_s if min(f["acc"] for f in fits) >= 0.99 else float("inf")
        first_step_ratio = statistics.median(f["first_step_s"] for f in fits) / import_s
        peak = max(f["peak_rss_mb"] for f in fits)
        print(f"default config over {len(fits)} seeds: median {median_s:.1f} s "
              f"of training, test/acc {min(f['acc'] for f in fits):.4f}-{max(f['acc'] for f in fits):.4f}; "
              f"first step {first_step_ratio:.2f}x import pytorch_lightning; peak RSS {peak:.0f} MB")
    mlp, cnn = median["mlp"], median["cnn"]
    bf16_ratio = cnn["raw"] / cnn["fp32"] if "fp32" in cnn else float("nan")
    print(f"ratio_vs_raw={cnn['ours'] / cnn['raw']:.3f} ratio_vs_seed={mlp['ours'] / mlp['seed']:.1f} "
          f"bf16_vs_fp32={bf16_ratio:.2f} "
          f"time_to_99_s={t99:.1f} first_step_ratio={first_step_ratio:.2f} peak_rss_mb={peak:.0f}")


if __name__ == "__main__":
    main()
