"""Decoding user-supplied images (base64 strings in JSON, or uploaded files) into uint8 arrays, safely.

Every limit is checked before the work it protects: the byte size before base64 decoding, the
pixel count from the image header before pixels are decoded (decompression bombs), the count of
images before any is read. Only a few raster formats are opened (Pillow would otherwise also try
formats such as EPS, which runs Ghostscript). Nothing is written to disk.

Each problem raises ``UploadError`` with an HTTP status, an error code and the offending field,
which the app turns into its ``{"error": {"message", "type", "param", "code"}}`` body.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.errors import ApiError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


@dataclass(frozen=True)
class UploadLimits:
    max_images: int = 64  # images in one request
    max_bytes: int = 1024 * 1024  # bytes of one encoded file; at most Starlette's 1 MiB spool size, or parts hit disk
    max_pixels: int = 1024 * 1024  # width * height of one image, read from its header before decoding
    formats: tuple[str, ...] = FORMATS  # Pillow format names that are opened at all

    def __post_init__(self):
        for name in ("max_images", "max_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class UploadError(ApiError):
    """A bad upload: ``status`` (400/413/422), ``code`` (machine-readable) and ``param`` (the field, with index).
    An ``ApiError``, so a route that lets it through answers in the one error shape."""

    def __init__(self, message: str, *, param: str | None, code: str, status: int):
        super().__init__(status, message, code=code, param=param, type="invalid_request_error")

    def body(self) -> dict[str, Any]:
        return self.payload()


def check_count(n: int, limits: UploadLimits, param: str = "images") -> None:
    """At least one image, at most ``limits.max_images``."""
    if n < 1:
        raise UploadError("no images given: send at least one", param=param, code="no_images", status=422)
    if n > limits.max_images:
        raise UploadError(
            f"{n} images in one request; at most {limits.max_images} allowed",
            param=param,
            code="too_many_images",
            status=422,
        )


def decode_image(data: bytes, limits: UploadLimits, param: str = "image") -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W) for grayscale sources, (H, W, 3) otherwise.

    Transparent pixels are composited onto black (Fashion-MNIST's background). Animated images
    give their first frame. 16-bit grayscale is scaled to 8 bits.
    """
    return _decode(data, limits, param, _to_array)


def decode_alpha(data: bytes, limits: UploadLimits, param: str = "mask") -> np.ndarray:
    """Encoded image bytes -> its uint8 (H, W) alpha channel (255 everywhere for an image without one)."""
    return _decode(data, limits, param, _alpha)


def _decode(data: bytes, limits: UploadLimits, param: str, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Open within the limits (bytes first, then the header's pixel count before any pixel is decoded),
    decode, and ``convert``."""
    if len(data) > limits.max_bytes:
        raise _too_large(len(data), limits, param)
    if not data:
        raise UploadError("empty image", param=param, code="invalid_image", status=422)
    try:
        # Image.open reads only the header; pixels are decoded by load(), after the size check below.
        img = Image.open(io.BytesIO(data), formats=limits.formats)
    except Image.DecompressionBombError as err:  # Pillow's own guard, above 2 * Image.MAX_IMAGE_PIXELS
        raise UploadError(str(err), param=param, code="too_many_pixels", status=413) from err
    except UnidentifiedImageError as err:
        raise UploadError(
            f"not an image, or not one of the accepted formats ({', '.join(limits.formats)})",
            param=param,
            code="invalid_image",
            status=422,
        ) from err
    with img:
        width, height = img.size
        if width * height > limits.max_pixels:
            raise UploadError(
                f"image is {width}x{height} = {width * height} pixels; at most {limits.max_pixels} allowed",
                param=param,
                code="too_many_pixels",
                status=413,
            )
        try:
            img.load()
            return convert(img)
        except (OSError, SyntaxError, ValueError, EOFError) as err:  # truncated or corrupt pixel data
            raise UploadError(f"corrupt image: {err}", param=param, code="invalid_image", status=422) from err


def decode_base64_image(text: str, limits: UploadLimits, param: str = "image") -> np.ndarray:
    """A base64 string (optionally a ``data:image/...;base64,`` URL) -> uint8 array, as ``decode_image``."""
    if not isinstance(text, str):
        raise UploadError("expected a base64 string", param=param, code="invalid_base64", status=422)
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise UploadError(
                "a data URL must look like data:image/png;base64,...", param=param, code="invalid_base64", status=422
            )
    # 4 base64 characters carry 3 bytes: refuse oversized payloads before decoding them.
    if (len(text) // 4) * 3 - 3 > limits.max_bytes:
        raise _too_large((len(text) // 4) * 3, limits, param, approx=True)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise UploadError(f"not valid base64: {err}", param=param, code="invalid_base64", status=422) from err
    return decode_image(data, limits, param)


def decode_base64_images(items: Sequence[str], limits: UploadLimits, field: str = "images") -> list[np.ndarray]:
    """A JSON list of base64 images -> arrays; errors name ``field[i]``."""
    check_count(len(items), limits, field)
    return [decode_base64_image(item, limits, f"{field}[{i}]") for i, item in enumerate(items)]


def decode_files(files: Sequence[bytes], limits: UploadLimits, field: str = "files") -> list[np.ndarray]:
    """The bytes of uploaded files -> arrays; errors name ``field[i]``."""
    check_count(len(files), limits, field)
    return [decode_image(data, limits, f"{field}[{i}]") for i, data in enumerate(files)]


def _to_array(img: Image.Image) -> np.ndarray:
    gray = img.mode in GRAY_MODES or (img.mode in ("P", "PA") and _gray_palette(img))
    if img.mode.startswith("I") or img.mode == "F":  # 16-bit (or wider) grayscale: scale, don't clip
        wide = np.asarray(img, dtype=np.float64)
        top = 65535.0 if wide.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        return np.clip(np.rint(wide * (255.0 / top)), 0, 255).astype(np.uint8)
    if img.mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        rgba = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        out = rgba.convert("L" if gray else "RGB")
    else:
        out = img.convert("L" if gray else "RGB")
    return np.array(out, dtype=np.uint8)  # (H, W) or (H, W, 3)


def _alpha(img: Image.Image) -> np.ndarray:
    if img.mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in img.info:
        return np.array(img.convert("RGBA").getchannel("A"), dtype=np.uint8)
    return np.full((img.height, img.width), 255, dtype=np.uint8)


def _gray_palette(img: Image.Image) -> bool:
    palette = img.getpalette() or []
    rgb = np.asarray(palette, dtype=np.int64).reshape(-1, 3) if len(palette) % 3 == 0 else None
    return rgb is not None and bool((rgb[:, 0] == rgb[:, 1]).all() and (rgb[:, 1] == rgb[:, 2]).all())


def _too_large(size: int, limits: UploadLimits, param: str, approx: bool = False) -> UploadError:
    size_text = f"about {size}" if approx else str(size)
    return UploadError(
        f"image is {size_text} bytes; at most {limits.max_bytes} allowed",
        param=param,
        code="image_too_large",
        status=413,
    )
