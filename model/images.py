"""Turning uint8 image batches into PNGs and grids (Pillow only)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image


def grid(images: np.ndarray, ncol: int, pad: int = 2, scale: int = 1, background: int = 0) -> Image.Image:
    """uint8 (N, H, W) -> one grayscale image, ``ncol`` tiles per row, ``pad`` pixels between tiles."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    n, h, w = images.shape
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad), background, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    out = Image.fromarray(canvas, mode="L")
    return out.resize((out.width * scale, out.height * scale), Image.Resampling.NEAREST) if scale > 1 else out


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """Encode one uint8 (H, W) array or a PIL image as PNG, deterministically."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, mode="L")
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def grid_png(images: np.ndarray) -> bytes:
    """uint8 (N, H, W) -> one PNG of a near-square grid."""
    return png_bytes(grid(images, ncol=math.ceil(math.sqrt(len(images)))))


# --- inputs: any picture of a garment -> the model's 28x28 light-on-black grayscale --------------------

SIDE = 28  # Fashion-MNIST's images are 28x28
INVERT_CHOICES = ("auto", "yes", "no")


def to_gray(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) -> uint8 (H, W): ITU-R 601-2 luma (Pillow's "L"), as Fashion-MNIST's grayscale."""
    if pixels.ndim == 2:
        return pixels
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return np.asarray(Image.fromarray(pixels, mode="RGB").convert("L"), dtype=np.uint8)
    raise ValueError(f"expected uint8 (H, W) or (H, W, 3) pixels, got {pixels.shape}")


def border(gray: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels of a (H, W) image."""
    return np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])


def dark_background(gray: np.ndarray) -> bool:
    """Whether the picture is already light on dark, as Fashion-MNIST is: its border's mean is below mid-grey."""
    return float(border(gray).mean()) < 128


def fit_square(gray: np.ndarray, fill: int) -> np.ndarray:
    """Pad a (H, W) image to a centred square with ``fill``, keeping its aspect ratio (nothing is cropped)."""
    h, w = gray.shape
    side = max(h, w)
    out = np.full((side, side), fill, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = gray
    return out


def resize(gray: np.ndarray, side: int = SIDE) -> np.ndarray:
    """A square (S, S) uint8 image -> (side, side) with Lanczos resampling (Pillow antialiases when it shrinks)."""
    if gray.shape == (side, side):
        return gray
    return np.asarray(Image.fromarray(gray, mode="L").resize((side, side), Image.Resampling.LANCZOS), dtype=np.uint8)


def to_model_image(pixels: np.ndarray, invert: str = "auto") -> tuple[np.ndarray, bool]:
    """Any decoded picture -> the model's uint8 (28, 28) light garment on black, and whether it was inverted.

    The rule: grayscale by ITU-R 601-2 luma; padded to a centred square with its border's median (so a
    photo's background extends, never a black bar); resized to 28x28 with Lanczos; then inverted when
    ``invert`` is "yes", or "auto" and the border is light (a dark garment photographed on white becomes a
    light garment on black, as Fashion-MNIST draws them)."""
    if invert not in INVERT_CHOICES:
        raise ValueError(f"invert must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
    gray = to_gray(pixels)
    square = fit_square(gray, int(np.median(border(gray))))
    small = resize(square)
    flip = invert == "yes" or (invert == "auto" and not dark_background(small))
    return (255 - small if flip else small), flip


def to_model_mask(edit: np.ndarray) -> np.ndarray:
    """A (H, W) boolean mask of the region to edit, in the picture's own pixels -> bool (28, 28), by the same
    square padding (the padding is kept, never edited) and resizing as ``to_model_image``: a model pixel is
    edited when at least half of what it covers is."""
    if edit.ndim != 2:
        raise ValueError(f"expected a (H, W) mask, got {edit.shape}")
    square = fit_square(edit.astype(np.uint8) * 255, 0)
    side = square.shape[0]
    if side == SIDE:
        return square >= 128
    covered = Image.fromarray(square, mode="L").resize((SIDE, SIDE), Image.Resampling.BOX)  # area average
    return np.asarray(covered, dtype=np.uint8) >= 128
