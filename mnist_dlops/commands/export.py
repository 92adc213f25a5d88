"""``mnist-dlops export``: a checkpoint as TorchScript and ONNX for serving without this project, each checked
against it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from mnist_dlops.errors import ConfigError, command
from mnist_dlops.files import free_name, replacing
from mnist_dlops.model.formats import FORMATS, ExportFormat, available
from mnist_dlops.model.reference import Reference, training_reference
from mnist_dlops.module import MNISTModule, Probabilities, rebuild
from mnist_dlops.rundir.run import resolve_ckpt


def sample_images(n: int = 256) -> Tensor:
    """Inputs to compare the exports on: MNIST-shaped uint8 images, seeded."""
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def export(
    ckpt_path: str,
    formats: Optional[Sequence[ExportFormat]] = None,
    out_dir: Optional[str] = None,
    runs_dir: str = "lightning_logs",
    tolerance: float = 1e-5,
) -> dict[str, float]:
    """Export the checkpoint's network and check that each export gives the checkpoint's outputs.

    Args:
        ckpt_path: A .ckpt file, a run folder, or ``last``/``best`` of the newest run under ``runs_dir``.
        formats: Which exports to write: ``torchscript`` (``model.pt``) and/or ``onnx`` (``model.onnx``); default
            both, or TorchScript alone when ONNX's packages are not installed (it says so).
        out_dir: Where to write them; default ``<run>/export`` beside the checkpoint's folder (``export-1``,
            ``export-2``... when it exists: an export never replaces an earlier one).
        runs_dir: Folder of the runs, for ``last``/``best``.
        tolerance: Largest absolute difference in probabilities allowed between an export and the checkpoint.

    Returns:
        The largest absolute difference measured, per format.
    """
    # Every argument is checked, and every package found, before anything is written.
    install = 'pip install -c constraints.txt -e ".[export]"'
    if formats is None:
        formats = [name for name in FORMATS if available(name)]
        for name in [name for name in FORMATS if name not in formats]:  # in the table's order
            print(f"{name}: skipped ({install} for {FORMATS[name].file} too)")
    if not formats or len(set(formats)) != len(formats):
        raise ConfigError(f"formats={list(formats)}: name {' and/or '.join(FORMATS)}, each once")
    for name in formats:
        if not available(name):
            raise ConfigError(f"formats={name}: needs {', '.join(FORMATS[name].packages)}: {install}")
    if not tolerance >= 0:
        raise ConfigError(f"tolerance={tolerance}: must be >= 0")
    path = resolve_ckpt(ckpt_path, Path(runs_dir))
    module = rebuild(path)
    model = Probabilities(module).eval()
    out = Path(out_dir) if out_dir else free_name(path.resolve().parent.parent, "export", "")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out_dir={out}: already holds an export or other files; choose another folder (nothing is overwritten)")
    # Written into a hidden folder beside it, renamed into place once every export has been checked: an export that
    # fails (a mismatch, a full disk, Ctrl-C) leaves nothing, and the next one gets the same name.
    reference = training_reference(path, model)
    with replacing(out, "out_dir") as staging:
        errors = _write(module, model, formats, tolerance, staging, reference)
    for fmt in formats:
        print(f"{fmt}: {out / FORMATS[fmt].file} "
              f"(max |difference| from the checkpoint {errors[fmt]:.1e}: ok)")
    return errors


def _write(module: MNISTModule, model: Probabilities, formats: Sequence[ExportFormat], tolerance: float,
           out: Path, reference: Optional[Reference] = None) -> dict[str, float]:
    """Each export, ``classes.txt`` and the drift reference into ``out``, each export checked against the
    checkpoint's own outputs."""
    (out / "classes.txt").write_text("\n".join(model.class_names) + "\n")
    if reference is not None:
        reference.save(out)
    images = sample_images()
    with torch.no_grad():
        # The reference is the checkpoint's module itself, not the wrapper: the wrapper is what is being checked.
        expected = module(images).softmax(-1)
    errors: dict[str, float] = {}
    for fmt in formats:
        FORMATS[fmt].save(model, images, out / FORMATS[fmt].file)
        outputs = FORMATS[fmt].load(out / FORMATS[fmt].file)(images)  # as the server will load it
        errors[fmt] = float((outputs - expected).abs().max())
        if errors[fmt] > tolerance:
            raise ConfigError(f"tolerance={tolerance}: the {fmt} export differs from the checkpoint by "
                              f"{errors[fmt]:.2e}; nothing was written")
    return errors


def main(argv: Optional[list[str]] = None) -> None:
    """``mnist-dlops export``: parse the flags of ``export`` and run it, with one-line errors."""
    command(export, argv, "export", as_positional=False)
