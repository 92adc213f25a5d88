"""Images as the model sees them, one module for training, predict and the server: a PNG tree read into tensors,
any photo or upload turned into an MNIST digit (decoded safely, grayscale, 28x28, white on black), normalized."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from mnist_dlops.errors import DataError

# Mean and standard deviation of MNIST's training pixels, in [0, 1] units.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (0-255) as every network here takes them: in [0, 1], centred and scaled by MNIST's statistics."""
    return (images.float() / 255.0 - MNIST_MEAN) / MNIST_STD


def read_png_split(root: Path, split: str, class_of: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``root/<split>/<class>/*.png`` into tensors; ``class_of`` maps class-folder names to labels.

    Images of any size or mode are converted the way MNIST is stored: 8-bit grayscale, 28x28.
    """
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: missing (expected {root}/{{train,test}}/<class>/*.png)")
    class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not class_dirs:
        raise DataError(f"{split_dir}: holds no class folders")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for class_dir in class_dirs:
        if class_dir.name not in class_of:
            raise DataError(f"{class_dir}: class folder name not understood (expected one of {sorted(class_of)})")
        files = sorted(p for p in class_dir.iterdir() if p.is_file())
        if not files:
            raise DataError(f"{class_dir}: empty class folder")
        for file in files:
            images.append(read_png(file))
            labels.append(class_of[class_dir.name])
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


# An upload larger than this is refused before it is decoded: a small file can claim 20000x20000 pixels (a
# decompression bomb) and take gigabytes once decoded. A 16-megapixel phone photo still passes.
MAX_PIXELS = 4096 * 4096


def to_mnist_image(img) -> np.ndarray:  # img: a PIL.Image; untyped to keep Pillow an on-demand import
    """Convert any PIL image to MNIST's format: a white digit on black, uint8 ``[28, 28]``.

    A dark digit on a light background is inverted. A 28x28 image is otherwise kept as it is (MNIST's own digits
    written as PNG stay bit-identical). Any other size is treated as a photo or a scan and normalized as MNIST was
    made: the paper's own level (a plane fitted to the border) is removed; the digit is found by Otsu's threshold on
    a reduced, median-filtered copy (so that specks of noise do not widen it) and stretched to full contrast; its
    bounding box is scaled to fit 20x20 and placed so that its center of mass is at the center of the 28x28 image.
    The server runs this for every upload: it works on numpy arrays, with Pillow only where C does the pixel work.
    """
    from PIL import Image, ImageFilter

    pixels = np.asarray(img if img.mode == "L" else img.convert("L"))
    if _median(_border(pixels)) > 160:  # clearly light paper, dark ink (MNIST borders are 0; noise averages 128)
        pixels = 255 - pixels
    if pixels.shape == (28, 28):
        return pixels
    # The digit is found on a copy reduced to at most ~64 pixels a side (box averages of k x k pixels: cheap, and
    # they calm the noise), then cut out of the full-resolution image, so that a small digit keeps its detail.
    # Unreduced, a median filter does the calming, so that specks of noise do not widen the digit's box.
    k = max(1, max(pixels.shape) // 64)
    small = Image.fromarray(pixels).reduce(k)
    small = np.asarray(small.filter(ImageFilter.MedianFilter(3)) if k < 3 else small, dtype=np.float32)
    a, b, c = _paper(small)
    smooth = np.clip(small - _plane(a, b, c, 0, 0, *small.shape), 0, 255)
    if smooth.max() < 16:  # a blank page: nothing to find
        return np.zeros((28, 28), dtype=np.uint8)
    # Otsu splits ink from paper; a small digit on a large page is too few pixels for it, hence the floor.
    threshold = max(_otsu(smooth), smooth.max() / 4)
    rows, cols = np.nonzero(smooth > threshold)
    top, left = rows.min() * k, cols.min() * k
    crop = pixels[top : (rows.max() + 1) * k, left : (cols.max() + 1) * k].astype(np.float32)
    # The same plane at full resolution: a reduced pixel (i, j) is the mean of the k x k block around k*i + (k-1)/2.
    shift = (k - 1) / 2
    ink = np.clip(crop - _plane(a, b / k, c / k, top - shift, left - shift, *crop.shape), 0, 255)
    ink[ink < threshold / 2] = 0  # what is left of the paper's texture inside the box
    strokes = ink[ink > threshold]
    peak = _quantile(strokes, 0.9) if strokes.size else ink.max()
    ink = np.clip(ink * (255.0 / max(peak, 1.0)), 0, 255)  # the ink at full contrast, as MNIST's strokes are
    h, w = ink.shape
    scale = 20 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # reducing_gap: Pillow box-averages by a whole factor first and resamples only the last step (at most 2x) with
    # Lanczos; Pillow documents 2.0 as indistinguishable from fair resampling, at a fraction of its cost here.
    digit = Image.fromarray(ink.astype(np.uint8)).resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    digit = np.asarray(digit, dtype=np.float32)
    mass = float(digit.sum()) or 1.0
    cy = float(digit.sum(axis=1) @ np.arange(digit.shape[0], dtype=np.float32)) / mass
    cx = float(digit.sum(axis=0) @ np.arange(digit.shape[1], dtype=np.float32)) / mass
    top = min(max(round(13.5 - cy), 0), 28 - digit.shape[0])
    left = min(max(round(13.5 - cx), 0), 28 - digit.shape[1])
    canvas = np.zeros((28, 28), dtype=np.uint8)
    canvas[top : top + digit.shape[0], left : left + digit.shape[1]] = digit.astype(np.uint8)
    return canvas


def _border(pixels: np.ndarray) -> np.ndarray:
    """The outermost rows and columns, in the order ``_paper`` fits them: top, bottom, left, right."""
    return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def _quantile(values: np.ndarray, q: float) -> float:
    """The ``q`` quantile of ``values`` (the nearest value below it): np.partition, far cheaper than np.percentile."""
    index = int(q * (values.size - 1))
    return float(np.partition(values.ravel(), index)[index])


def _median(values: np.ndarray) -> float:
    return _quantile(values, 0.5)


def _paper(pixels: np.ndarray) -> tuple[float, float, float]:
    """The paper's own level: a plane ``a + b*row + c*col`` fitted to the border (robust to a digit touching it),
    so that uneven lighting across a photo is removed with it."""
    h, w = pixels.shape
    ys = np.concatenate([np.zeros(w), np.full(w, h - 1), np.arange(h), np.arange(h)])
    xs = np.concatenate([np.arange(w), np.arange(w), np.zeros(h), np.full(h, w - 1)])
    values = _border(pixels).astype(np.float64)
    keep = values <= _quantile(values, 0.75)  # the darkest three quarters: ink reaching the border is bright
    design = np.stack([np.ones(len(values)), ys, xs], axis=1)[keep]
    (a, b, c), *_ = np.linalg.lstsq(design, values[keep], rcond=None)
    return float(a), float(b), float(c)


def _plane(a: float, b: float, c: float, top: float, left: float, h: int, w: int) -> np.ndarray:
    """The plane ``a + b*row + c*col`` over the ``h`` x ``w`` block whose first pixel is at (``top``, ``left``)."""
    rows = np.arange(h, dtype=np.float32)[:, None] + np.float32(top)
    cols = np.arange(w, dtype=np.float32)[None, :] + np.float32(left)
    return np.float32(a) + np.float32(b) * rows + np.float32(c) * cols


def _otsu(pixels: np.ndarray) -> float:
    """Otsu's threshold of 0-255 values: the level that best splits them into two classes (ink and paper)."""
    counts = np.bincount(pixels.astype(np.uint8).ravel(), minlength=256).astype(np.float64)  # pixels are 0-255
    weight = np.cumsum(counts)
    mean = np.cumsum(counts * np.arange(256))
    total, total_mean = weight[-1], mean[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * weight - mean * total) ** 2 / (weight * (total - weight))
    return float(np.argmax(np.where(np.isfinite(between[:-1]), between[:-1], -1.0)))


# The image formats accepted (Pillow's names): photos and drawings. Pillow opens some forty more (DDS, EPS...), each
# decoder a surface for crafted files; Image.open(formats=...) never hands the bytes to any other.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """An encoded image (PNG, JPEG, BMP, GIF, TIFF or WebP) as an MNIST-format uint8 ``[28, 28]`` array: what
    ``predict`` and the server both use. Another format, not an image, cut short, or over ``MAX_PIXELS``: a DataError
    naming ``name``."""
    from PIL import Image, UnidentifiedImageError  # only the PNG sources and the server need Pillow

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:  # the header only: size known before decoding
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise ImageTooLarge(f"{name}: {width}x{height} pixels, more than the {MAX_PIXELS:,} accepted")
            img.load()
            return to_mnist_image(img)
    except Image.DecompressionBombError as err:  # Pillow's own guard, at open, for the most extreme sizes
        raise ImageTooLarge(f"{name}: more pixels than the {MAX_PIXELS:,} accepted ({err})") from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not a readable image (accepted: {', '.join(IMAGE_FORMATS)})") from None
    except ImageTooLarge:
        raise
    except Exception as err:  # noqa: BLE001 - a crafted file makes a decoder fail in any way (NotImplementedError...)
        raise DataError(f"{name}: not a readable image ({err.__class__.__name__})") from None


class ImageTooLarge(DataError):
    """An image with more pixels than ``MAX_PIXELS``."""


def read_png_folder(folder: Path) -> tuple[torch.Tensor, list[Path]]:
    """Every ``*.png`` under ``folder`` (recursively, sorted) as uint8 ``[N, 28, 28]``, with the files' paths."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of PNG images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() == ".png")
    if not files:
        raise DataError(f"{folder}: holds no .png files")
    return torch.from_numpy(np.stack([read_png(file) for file in files])), files


def read_png(file: Path) -> np.ndarray:
    """One image file as an MNIST-format uint8 ``[28, 28]`` array; a file that is not an image is a DataError."""
    try:
        data = file.read_bytes()
    except OSError as err:
        raise DataError(f"{file}: cannot be read ({err.strerror})") from err
    return decode_image(data, str(file))
