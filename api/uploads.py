"""Streaming multipart uploads: files go straight to disk with a size cap and a sha256.

Starlette's form parser spools file parts to temporary files without any size limit, so
uploads are parsed here with python-multipart's low-level parser instead: every byte is
counted as it arrives, the request is refused with 413 as soon as the cap is passed, and the
parsing and disk writes run in a worker thread so the event loop keeps serving other clients.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError

MAX_TEXT_FIELD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ReceivedFile:
    path: Path
    size: int
    sha256: str
    filename: str | None


@dataclass
class ReceivedForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, ReceivedFile] = field(default_factory=dict)


def check_content_length(request: Request, limit: int) -> None:
    """Refuse early when the client announces a body over ``limit`` (chunked bodies are
    still counted as they stream)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise payload_too_large(limit)


def payload_too_large(limit: int) -> ApiError:
    return ApiError("payload_too_large", f"the request body exceeds the {limit}-byte limit")


class _Receiver:
    """python-multipart callbacks writing file parts to ``dest / file_fields[name]``."""

    def __init__(
        self,
        dest: Path,
        file_fields: dict[str, str],
        text_fields: set[str],
        on_text: Callable[[str, str], None] | None,
    ) -> None:
        self.dest = dest
        self.file_fields = file_fields
        self.text_fields = text_fields
        self.on_text = on_text
        self.form = ReceivedForm()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._name: str | None = None
        self._filename: str | None = None
        self._fh: IO[bytes] | None = None
        self._digest: hashlib._Hash | None = None
        self._size = 0
        self._text = bytearray()
        self.in_part = False

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self.in_part = True
        self._headers = {}
        self._name = self._filename = None
        self._size = 0
        self._text = bytearray()

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).decode("latin-1").lower()] = bytes(
            self._header_value
        )
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get("content-disposition"))
        if disposition != b"form-data" or b"name" not in params:
            raise ApiError("invalid_multipart", "a part lacks Content-Disposition: form-data")
        name = params[b"name"].decode("utf-8", "replace")
        if name in self.form.fields or name in self.form.files:
            raise ApiError("invalid_multipart", f"field {name!r} appears twice", field=name)
        self._name = name
        raw_filename = params.get(b"filename")
        self._filename = raw_filename.decode("utf-8", "replace") if raw_filename else None
        if name in self.file_fields:
            self._fh = (self.dest / self.file_fields[name]).open("xb")
            self._digest = hashlib.sha256()
        elif name not in self.text_fields:
            expected = sorted({*self.file_fields, *self.text_fields})
            raise ApiError(
                "validation_error",
                f"unexpected form field {name!r}; expected: {', '.join(expected)}",
                field=name,
            )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._fh is not None and self._digest is not None:
            self._fh.write(chunk)
            self._digest.update(chunk)
            self._size += len(chunk)
        else:
            self._text.extend(chunk)
            if len(self._text) > MAX_TEXT_FIELD_BYTES:
                raise ApiError(
                    "payload_too_large",
                    f"form field {self._name!r} exceeds {MAX_TEXT_FIELD_BYTES} bytes",
                    field=self._name,
                )

    def _part_end(self) -> None:
        self.in_part = False
        assert self._name is not None
        if self._fh is not None and self._digest is not None:
            self._fh.close()
            self.form.files[self._name] = ReceivedFile(
                path=self.dest / self.file_fields[self._name],
                size=self._size,
                sha256=self._digest.hexdigest(),
                filename=self._filename,
            )
            self._fh = None
            self._digest = None
        else:
            try:
                text = self._text.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(
                    "validation_error", "form field is not UTF-8", field=self._name
                ) from None
            self.form.fields[self._name] = text
            if self.on_text is not None:
                self.on_text(self._name, text)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


async def receive_multipart(
    request: Request,
    dest: Path,
    *,
    file_fields: dict[str, str],
    text_fields: set[str],
    max_bytes: int,
    on_text: Callable[[str, str], None] | None = None,
) -> ReceivedForm:
    """Stream a multipart/form-data body into ``dest``.

    ``file_fields`` maps a form field to the file name it is written to; ``text_fields`` are
    kept in memory (up to 1 MiB each) and passed to ``on_text`` as soon as each one ends, so a
    bad spec sent before the weights is refused before the weights are read. Raises
    ``ApiError`` (413 past ``max_bytes``, 400 on malformed multipart, 422 on unknown fields);
    the caller removes ``dest`` on failure.
    """
    content_type, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError("unsupported_media_type", "expected multipart/form-data with a boundary")
    check_content_length(request, max_bytes)
    receiver = _Receiver(dest, file_fields, text_fields, on_text)
    try:
        parser = MultipartParser(boundary, receiver.callbacks())
    except MultipartParseError as exc:  # e.g. an over-long boundary
        raise ApiError("invalid_multipart", f"malformed multipart body: {exc}") from exc
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise payload_too_large(max_bytes)
            if chunk:
                await run_in_threadpool(parser.write, chunk)
        await run_in_threadpool(parser.finalize)
        if receiver.in_part:
            raise ApiError("invalid_multipart", "the body ended inside a part (truncated upload)")
    except MultipartParseError as exc:
        raise ApiError("invalid_multipart", f"malformed multipart body: {exc}") from exc
    finally:
        receiver.close()
    return receiver.form
