"""Draw docs/edit_masks.png: one picture, its mask in each route's convention, and the 28x28 mask as applied.

    python scripts/mask_picture.py docs/edit_masks.png

The native routes (``/edits``) take white = redraw; OpenAI's ``/v1/images/edits`` takes transparent =
redraw (drawn here over a checkerboard). Both map to the same 28x28 mask (``model.images.to_model_mask``),
which every answer returns as ``mask_png``."""

from __future__ import annotations

import sys

import numpy as np
from PIL import Image, ImageDraw

from model.images import to_model_image, to_model_mask

SIDE = 168  # each panel


def garment(h: int = 120, w: int = 90) -> np.ndarray:
    """A dark shirt-like shape photographed on white: (H, W) uint8."""
    img = np.full((h, w), 240, dtype=np.uint8)
    img[20:110, 20:70] = 60
    img[20:50, 5:85] = 60  # sleeves
    img[20:30, 38:52] = 240  # neckline
    return img


def panel(img: Image.Image, title: str) -> Image.Image:
    out = Image.new("RGB", (SIDE, SIDE + 22), "white")
    out.paste(img.convert("RGB").resize((SIDE, SIDE), Image.Resampling.NEAREST), (0, 22))
    ImageDraw.Draw(out).text((4, 4), title, fill="black")
    return out


def main(path: str) -> None:
    picture = garment()
    edit = np.zeros(picture.shape, dtype=bool)
    edit[60:, :] = True  # redraw the bottom half
    native = Image.fromarray(edit.astype(np.uint8) * 255, mode="L")
    checker = (np.indices(picture.shape).sum(0) // 8 % 2 * 60 + 160).astype(np.uint8)
    alpha = np.where(edit, 0, 255).astype(np.uint8)
    openai = np.where(edit, checker, 20).astype(np.uint8)  # transparent shows the checkerboard, opaque is black
    mapped, inverted = to_model_image(picture)
    applied = to_model_mask(edit)
    shown = np.where(applied, 255, mapped // 3).astype(np.uint8)
    panels = [
        panel(Image.fromarray(picture, mode="L"), "the picture"),
        panel(native, "/edits: white = redraw"),
        panel(Image.fromarray(openai, mode="L"), "OpenAI: alpha 0 = redraw"),
        panel(Image.fromarray(mapped, mode="L"), f"28x28, inverted={inverted}"),
        panel(Image.fromarray(shown, mode="L"), "mask_png as applied"),
    ]
    assert (alpha < 128).sum() == edit.sum()
    sheet = Image.new("RGB", (SIDE * len(panels) + 8 * (len(panels) - 1), SIDE + 22), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, (i * (SIDE + 8), 0))
    sheet.save(path)


if __name__ == "__main__":
    main(sys.argv[1])
