"""multipart/form-data read into memory, with the upload limits checked as the bytes arrive.

Starlette's own form parser spools every file part over 1 MiB to a temporary file before a
route sees it. This reader keeps parts in memory instead and stops at the first part over
its limit (or the first file too many), so nothing is written to disk and no more than the
limits is ever held. It uses python-multipart's streaming parser, as Starlette does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import python_multipart
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from app.uploads import UploadError, UploadLimits

MAX_FIELDS = 1100  # text parts (texts, class): more than any valid request has
MAX_FIELD_BYTES = 64 * 1024  # one text part
MAX_FIELDS_BYTES = 1024 * 1024  # all text parts together


@dataclass
class Form:
    files: dict[str, list[bytes]] = field(default_factory=dict)  # the parts named in ``file_fields``, by name, in order
    fields: dict[str, list[str]] = field(default_factory=dict)  # every other part, by name, decoded as UTF-8

    def files_of(self, name: str) -> list[bytes]:
        return self.files.get(name, [])


def _bad(message: str, param: str | None = None, code: str = "invalid_multipart", status: int = 400) -> UploadError:
    return UploadError(message, param=param, code=code, status=status)


class _Reader:
    """python-multipart callbacks that collect parts, raising UploadError as soon as a limit is passed."""

    def __init__(self, limits: UploadLimits, file_fields: tuple[str, ...]) -> None:
        self.limits = limits
        self.file_fields = file_fields
        self.form = Form()
        self.ended = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._data = bytearray()
        self._n_fields = 0
        self._field_bytes = 0

    def on_part_begin(self) -> None:
        self._disposition, self._name, self._is_file, self._data = b"", "", False, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise _bad('every part needs a Content-Disposition header with a name, e.g. form-data; name="files"')
        self._name = options[b"name"].decode("utf-8", "replace")
        self._is_file = self._name in self.file_fields
        if self._is_file:
            index = len(self.form.files_of(self._name))
            if index >= self.limits.max_images:
                raise UploadError(
                    f"more than {self.limits.max_images} images in one request; at most {self.limits.max_images} "
                    "allowed",
                    param=self._name,
                    code="too_many_images",
                    status=422,
                )
        else:
            self._n_fields += 1
            if self._n_fields > MAX_FIELDS:
                raise _bad(f"more than {MAX_FIELDS} form fields", code="too_many_fields", status=413)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]
        if self._is_file and len(self._data) > self.limits.max_bytes:
            raise UploadError(
                f"image is more than {self.limits.max_bytes} bytes; at most {self.limits.max_bytes} allowed",
                param=f"{self._name}[{len(self.form.files_of(self._name))}]",
                code="image_too_large",
                status=413,
            )
        if not self._is_file:
            self._field_bytes += end - start
            if len(self._data) > MAX_FIELD_BYTES or self._field_bytes > MAX_FIELDS_BYTES:
                raise _bad(
                    f"form field {self._name!r} is too large (at most {MAX_FIELD_BYTES} bytes each, "
                    f"{MAX_FIELDS_BYTES} in all)",
                    param=self._name,
                    code="field_too_large",
                    status=413,
                )

    def on_part_end(self) -> None:
        if self._is_file:
            self.form.files.setdefault(self._name, []).append(bytes(self._data))
            return
        try:
            text = self._data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _bad(f"form field {self._name!r} is not UTF-8 text", param=self._name, status=422) from err
        self.form.fields.setdefault(self._name, []).append(text)

    def on_end(self) -> None:
        self.ended = True


async def read_form(
    chunks: AsyncIterator[bytes], content_type: str, limits: UploadLimits, file_fields: tuple[str, ...] = ("files",)
) -> Form:
    """Parse a multipart/form-data body from its chunks; parts named in ``file_fields`` are the images."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise _bad("multipart/form-data needs a boundary in its Content-Type header")
    reader = _Reader(limits, file_fields)
    callbacks = {
        name: getattr(reader, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_end",
        )
    }
    parser = python_multipart.MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except FormParserError as err:
        raise _bad(f"malformed multipart/form-data body: {err}") from err
    if not reader.ended:
        raise _bad("the multipart/form-data body ended before its closing boundary")
    return reader.form
