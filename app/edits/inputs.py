"""Uploaded pictures and masks -> what the model edits: a 28x28 light-on-black image and a 28x28 mask.

The picture's rule is ``model.images.to_model_image`` (luma, padded square, Lanczos to 28x28, inverted when
its border is light). Masks come in two conventions, one per API, because users of each expect its own:

- native routes (``/edits``): a grayscale picture, white (>= 128) where the model draws, as Stable
  Diffusion, LocalAI and vLLM-omni take it;
- OpenAI's ``/v1/images/edits``: a PNG whose fully or mostly transparent pixels (alpha < 128) mark the area to
  edit, as OpenAI documents it.

Either way the mask must have the picture's size in pixels, and after mapping to 28x28 it must leave some
pixels to draw and some to keep; every answer carries the 28x28 mask as applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from app.errors import ApiError
from app.uploads import UploadLimits, decode_alpha, decode_image
from model.images import to_gray, to_model_image, to_model_mask

MaskConvention = Literal["white", "transparent"]


@dataclass(frozen=True)
class EditInput:
    image: np.ndarray  # uint8 (28, 28), light on black
    inverted: bool
    mask: np.ndarray | None = None  # bool (28, 28): True where the model draws


def read_picture(
    data: bytes, limits: UploadLimits, invert: str, param: str = "image"
) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """Encoded picture -> (its 28x28 as the model sees it, whether it was inverted, its own (H, W))."""
    pixels = decode_image(data, limits, param)
    image, inverted = to_model_image(pixels, invert)
    return image, inverted, pixels.shape[:2]


def read_mask(
    data: bytes, limits: UploadLimits, size: tuple[int, int], convention: MaskConvention, param: str = "mask"
) -> np.ndarray:
    """Encoded mask -> bool (28, 28), True where the model draws, refusing one of another size than the picture
    and one that leaves nothing to draw or nothing to keep."""
    if convention == "white":
        edit = to_gray(decode_image(data, limits, param)) >= 128
    else:
        edit = decode_alpha(data, limits, param) < 128
    if edit.shape != size:
        raise ApiError(
            400,
            f"{param}: the mask is {edit.shape[1]}x{edit.shape[0]} pixels; it must be the image's size, "
            f"{size[1]}x{size[0]}",
            code="mask_size",
            param=param,
        )
    mask = to_model_mask(edit)
    marks = "white (>= 128)" if convention == "white" else "transparent (alpha < 128)"
    if not mask.any():
        raise ApiError(
            400,
            f"{param}: the mask edits nothing at 28x28: mark the area to redraw {marks}",
            code="mask_empty",
            param=param,
        )
    if edit.all() or mask.all():  # the whole picture (its square padding aside) is no inpainting
        raise ApiError(
            400,
            f"{param}: the mask edits the whole image: leave some of it unmarked, or send no mask for a variation",
            code="mask_full",
            param=param,
        )
    return mask


def read_edit(
    image: bytes,
    mask: bytes | None,
    limits: UploadLimits,
    invert: str,
    convention: MaskConvention,
    image_param: str = "image",
) -> EditInput:
    picture, inverted, size = read_picture(image, limits, invert, image_param)
    return EditInput(picture, inverted, None if mask is None else read_mask(mask, limits, size, convention))
