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
