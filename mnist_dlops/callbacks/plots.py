"""Matplotlib figures of a classifier's results: confusion matrix, ROC and PR curves, a gallery of mistakes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only, never a window: runs on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


class Curve(NamedTuple):
    """One curve of a ROC or PR plot: its label, x and y points, and its area (AUC or average precision)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    area: float


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Counts (left) and the same rows normalized to recall (right), each cell labeled with its value."""
    matrix = np.asarray(matrix)
    totals = matrix.sum(axis=1, keepdims=True)
    normalized = np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=float), where=totals > 0)
    n = len(class_names)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * n, 1.6 + 0.55 * n), layout="constrained")
    for ax, values, title, fmt in (
        (axes[0], matrix, "Confusion matrix (counts)", "{:d}"),
        (axes[1], normalized, "Normalized by true class", "{:.2f}"),
    ):
        ax.imshow(values, cmap="Blues")
        ax.set(title=title, xlabel="predicted", ylabel="true", xticks=range(n), yticks=range(n))
        ax.set_xticklabels(class_names)
        ax.set_yticklabels(class_names)
        threshold = values.max() / 2 if values.max() > 0 else 1
        for i in range(n):
            for j in range(n):
                value = int(values[i, j]) if fmt == "{:d}" else float(values[i, j])
                color = "white" if values[i, j] > threshold else "black"
                ax.text(j, i, fmt.format(value), ha="center", va="center", color=color, fontsize=8)
    return fig


def curves_figure(curves: Sequence[Curve], kind: str) -> Figure:
    """ROC (``kind="roc"``: TPR over FPR, with the AUC) or precision-recall (``"pr"``, with average precision)."""
    fig, ax = plt.subplots(figsize=(6, 5), layout="constrained")
    area = "AUC" if kind == "roc" else "AP"
    for curve in curves:
        ax.plot(curve.x, curve.y, label=f"{curve.name} ({area} {curve.area:.4f})", linewidth=1.2)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
        ax.set(title="ROC", xlabel="false positive rate", ylabel="true positive rate")
    else:
        ax.set(title="Precision-recall", xlabel="recall", ylabel="precision")
    ax.set(xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=7)
    return fig


def gallery_figure(
    images: np.ndarray, true: Sequence[int], predicted: Sequence[int], confidence: Sequence[float],
    class_names: Sequence[str],
) -> Figure:
    """A grid of digits, each titled ``true -> predicted (confidence)``."""
    n = max(len(images), 1)
    cols = min(8, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, t, p, c in zip(axes.flat, images, true, predicted, confidence):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{class_names[t]} -> {class_names[p]}\n({c:.2f})", fontsize=8)
    if not len(images):
        axes.flat[0].set_title("no mistakes", fontsize=9)
    fig.suptitle("Most confident mistakes: true -> predicted", fontsize=9)
    return fig


def to_rgb(fig: Figure) -> np.ndarray:
    """Render a figure to an ``[H, W, 3]`` uint8 array and close it."""
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb
