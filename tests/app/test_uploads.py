"""Decoding uploaded images: what decodes, and each bad upload's status, code and field."""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from app.uploads import (
    UploadError,
    UploadLimits,
    check_count,
    decode_base64_image,
    decode_base64_images,
    decode_files,
    decode_image,
)
from model.images import png_bytes

LIMITS = UploadLimits()


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixel data: a bomb's calling card."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def digit() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)


def expect(exc_info, status: int, code: str, param: str | None):
    err = exc_info.value
    assert (err.status, err.code, err.param) == (status, code, param)
    assert err.body() == {"error": {"message": str(err), "type": "invalid_request_error", "param": param, "code": code}}


# ---- what decodes -------------------------------------------------------------------------------------------------


def test_a_grayscale_png_round_trips_exactly(digit):
    np.testing.assert_array_equal(decode_image(png_bytes(digit), LIMITS), digit)


def test_base64_and_data_urls_decode_to_the_same_pixels(digit):
    text = base64.b64encode(png_bytes(digit)).decode()
    np.testing.assert_array_equal(decode_base64_image(text, LIMITS), digit)
    np.testing.assert_array_equal(decode_base64_image("data:image/png;base64," + text, LIMITS), digit)
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # MIME-style line breaks
    np.testing.assert_array_equal(decode_base64_image(wrapped, LIMITS), digit)


def test_colour_images_stay_rgb_and_transparency_goes_black():
    rgb = np.zeros((5, 7, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    out = decode_image(encode(Image.fromarray(rgb)), LIMITS)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8 and (out[..., 0] == 200).all()
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[0, 0, 3] = 255  # one opaque white pixel, the rest transparent white
    out = decode_image(encode(Image.fromarray(rgba, mode="RGBA")), LIMITS)
    assert out[0, 0].tolist() == [255, 255, 255] and out.reshape(-1, 3)[1:].max() == 0


def test_sixteen_bit_and_palette_grayscale_become_8_bit_gray():
    wide = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369  # 0 .. 65535
    out = decode_image(encode(Image.fromarray(wide)), LIMITS)
    assert out.shape == (4, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.arange(16).reshape(4, 4) * 17)  # 65535 -> 255, not clipped
    gray = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16).convert("P")
    assert decode_image(encode(gray), LIMITS).shape == (4, 4)


def test_jpeg_decodes(digit):
    out = decode_image(encode(Image.fromarray(digit), "JPEG"), LIMITS)
    assert out.shape == (28, 28) and np.abs(out.astype(int) - digit).mean() < 40


# ---- bad uploads --------------------------------------------------------------------------------------------------


def test_not_an_image_is_422_and_names_the_index(digit):
    good = base64.b64encode(png_bytes(digit)).decode()
    junk = base64.b64encode(b"this is not an image").decode()
    with pytest.raises(UploadError, match="not an image") as err:
        decode_base64_images([good, junk], LIMITS)
    expect(err, 422, "invalid_image", "images[1]")
    with pytest.raises(UploadError) as err:
        decode_files([b""], LIMITS)
    expect(err, 422, "invalid_image", "files[0]")


def test_formats_outside_the_allowed_list_are_not_opened(digit):
    tiff = encode(Image.fromarray(digit), "TIFF")
    with pytest.raises(UploadError, match="accepted formats") as err:
        decode_image(tiff, LIMITS, "file")
    expect(err, 422, "invalid_image", "file")
    np.testing.assert_array_equal(decode_image(tiff, UploadLimits(formats=("TIFF",))), digit)


def test_a_truncated_png_is_a_corrupt_image(digit):
    data = png_bytes(digit)
    with pytest.raises(UploadError, match="corrupt image") as err:
        decode_image(data[: len(data) // 2], LIMITS)
    expect(err, 422, "invalid_image", "image")


def test_over_the_byte_limit_is_413(digit):
    data = png_bytes(digit)
    small = UploadLimits(max_bytes=len(data) - 1)
    with pytest.raises(UploadError, match=f"{len(data)} bytes; at most {len(data) - 1}") as err:
        decode_files([data], small)
    expect(err, 413, "image_too_large", "files[0]")
    decode_image(data, UploadLimits(max_bytes=len(data)))  # exactly at the limit is fine


def test_oversized_base64_is_refused_before_decoding():
    # Not valid base64 at all: the size check must come first, or this would be an invalid_base64 error.
    with pytest.raises(UploadError) as err:
        decode_base64_images(["!" * 4000], UploadLimits(max_bytes=1000))
    expect(err, 413, "image_too_large", "images[0]")


def test_too_many_pixels_is_413_before_any_pixel_is_decoded():
    bomb = png_header_only(20_000, 10_000)  # 200 Mpx claimed in a 100-byte file
    assert len(bomb) < 200
    with pytest.raises(UploadError) as err:
        decode_base64_images([base64.b64encode(bomb).decode()], LIMITS)
    expect(err, 413, "too_many_pixels", "images[0]")
    # Below Pillow's own guard, the service's limit decides, from the header alone.
    with pytest.raises(UploadError, match="2000x1000 = 2000000 pixels; at most 1048576") as err:
        decode_image(png_header_only(2000, 1000), LIMITS)
    expect(err, 413, "too_many_pixels", "image")


def test_a_real_compressed_bomb_is_refused():
    # 4 Mpx of zeros compress to a few kB: small on the wire, large once decoded.
    data = encode(Image.new("L", (2048, 2048)))
    assert len(data) < LIMITS.max_bytes // 100
    with pytest.raises(UploadError) as err:
        decode_image(data, LIMITS)
    expect(err, 413, "too_many_pixels", "image")


def test_too_many_images_and_none_are_422(digit):
    text = base64.b64encode(png_bytes(digit)).decode()
    with pytest.raises(UploadError, match="3 images in one request; at most 2") as err:
        decode_base64_images([text] * 3, UploadLimits(max_images=2))
    expect(err, 422, "too_many_images", "images")
    with pytest.raises(UploadError) as err:
        check_count(0, LIMITS, "files")
    expect(err, 422, "no_images", "files")
    assert len(decode_base64_images([text] * 2, UploadLimits(max_images=2))) == 2


@pytest.mark.parametrize(
    "text", ["not base64!!", "abc", "data:image/png,iVBORw0KGgo=", "data:image/png;base64", 42], ids=repr
)
def test_bad_base64_is_422(text):
    with pytest.raises(UploadError) as err:
        decode_base64_images([text], LIMITS)
    expect(err, 422, "invalid_base64", "images[0]")


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_pixels"):
        UploadLimits(max_pixels=0)
