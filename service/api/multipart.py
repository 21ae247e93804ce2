"""Streaming multipart/form-data reader: files go straight to disk under the data
directory's tmp/ with a byte limit enforced as they arrive; names in the upload are
never used as paths. The caller removes the files (``FormParts.cleanup``) on every path."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.api.errors import Problem

FILE_FIELDS = ("video", "audio")
TEXT_FIELDS = ("transcript", "model", "callback_url")


@dataclass
class FormParts:
    """What a multipart request carried: spooled files and small in-memory fields."""

    files: dict[str, Path] = field(default_factory=dict)
    fields: dict[str, bytes] = field(default_factory=dict)

    def cleanup(self) -> None:
        for path in self.files.values():
            path.unlink(missing_ok=True)


class _Reader:
    """python-multipart callbacks writing each part to its destination."""

    def __init__(self, tmp_dir: Path, max_file: int, max_field: dict[str, int]) -> None:
        self.tmp_dir, self.max_file, self.max_field = tmp_dir, max_file, max_field
        self.parts = FormParts()
        self._header_field = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._out: BinaryIO | None = None
        self._size = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: setattr(self, "_header_field", self._header_field + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_header_value", self._header_value + d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._disposition, self._name, self._size = b"", "", 0

    def _header_end(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in FILE_FIELDS + TEXT_FIELDS:
            allowed = ", ".join(FILE_FIELDS + TEXT_FIELDS)
            raise Problem(
                422, "unknown-field", f"unknown form field {name!r} (expected {allowed})", field=name or "form"
            )
        if name in self.parts.files or name in self.parts.fields:
            raise Problem(422, "duplicate-field", f"form field {name!r} appears more than once", field=name)
        self._name = name
        if name in FILE_FIELDS:
            path = self.tmp_dir / f"{uuid.uuid4().hex}.upload"
            self.parts.files[name] = path
            self._out = path.open("wb")
        else:
            self.parts.fields[name] = b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._out is not None:
            if self._size > self.max_file:
                mb = self.max_file / 2**20
                raise Problem(413, "upload-too-large", f"{self._name}: larger than {mb:g} MiB", field=self._name)
            self._out.write(data[start:end])
        else:
            if self._size > self.max_field[self._name]:
                limit = self.max_field[self._name]
                raise Problem(413, "field-too-large", f"{self._name}: larger than {limit} bytes", field=self._name)
            self.parts.fields[self._name] += data[start:end]

    def _part_end(self) -> None:
        self.close()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


async def read_form(request: Request, tmp_dir: Path, max_file: int, max_field: dict[str, int]) -> FormParts:
    """Parse the request body as it streams in; Problem 4xx on bad or oversized input."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise Problem(400, "bad-multipart", "expected multipart/form-data with a boundary", field="Content-Type")
    reader = _Reader(tmp_dir, max_file, max_field)
    parser = MultipartParser(boundary, reader.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except BaseException as e:
        reader.close()
        reader.parts.cleanup()
        if isinstance(e, ClientDisconnect):
            raise Problem(400, "client-disconnected", "the upload ended before the body was complete") from None
        if isinstance(e, Exception) and not isinstance(e, Problem):  # python-multipart's parse errors
            raise Problem(400, "bad-multipart", f"the multipart body is malformed ({e})") from e
        raise
    reader.close()
    return reader.parts
