"""Streaming multipart uploads: files go straight to storage with a size cap and a sha256.

Starlette's form parser spools file parts to temporary files without any size limit, so
uploads are parsed here with python-multipart's low-level parser instead: every byte is
counted as it arrives, the request is refused with 413 as soon as the cap is passed, and the
parsing and storage writes run in a worker thread so the event loop keeps serving other
clients. Each file part is written to a ``worker.storage.Sink`` (a local file, or an S3
multipart upload); a part that does not end cleanly is aborted, leaving nothing of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError
from worker.storage import Sink

MAX_TEXT_FIELD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class RequestBody:
    """What the write side needs of a request: its declared type and length, and the body as
    a stream of chunks (built by ``api.deps.get_body``). Keeps the job service free of
    Starlette's ``Request``."""

    content_type: str | None
    content_length: str | None
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True)
class ReceivedFile:
    ref: str  # the sink's reference: a local path, or an s3:// URL
    size: int
    sha256: str
    filename: str | None


@dataclass
class ReceivedForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, ReceivedFile] = field(default_factory=dict)


async def guarded_chunks(
    chunks: AsyncIterator[bytes], *, idle_timeout_s: float, min_bytes_per_s: int
) -> AsyncIterator[bytes]:
    """``chunks``, refused with 408 ``request_timeout`` when nothing arrives for
    ``idle_timeout_s`` or, once ``idle_timeout_s`` has passed, when the average rate falls
    below ``min_bytes_per_s``: a client holding uploads open (or trickling them) must not keep
    server connections, disk space and shutdown hostage. The 408 closes the connection."""
    start = time.monotonic()
    received = 0
    iterator = chunks.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(iterator.__anext__(), idle_timeout_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise ApiError(
                "request_timeout",
                f"the request body sent nothing for {idle_timeout_s:g} s",
                headers={"Connection": "close"},
            ) from None
        received += len(chunk)
        elapsed = time.monotonic() - start
        if elapsed > idle_timeout_s and received < min_bytes_per_s * elapsed:
            raise ApiError(
                "request_timeout",
                f"the request body arrives slower than {min_bytes_per_s} bytes/s",
                headers={"Connection": "close"},
            )
        yield chunk


def check_content_length(body: RequestBody, limit: int) -> None:
    """Refuse early when the client announces a body over ``limit`` (chunked bodies are
    still counted as they stream)."""
    declared = body.content_length
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise payload_too_large(limit)


async def read_json_body(body: RequestBody) -> bytes:
    """A JSON request body, refused with 413 past ``MAX_TEXT_FIELD_BYTES`` (announced or
    counted while it streams)."""
    check_content_length(body, MAX_TEXT_FIELD_BYTES)
    raw = bytearray()
    async for chunk in body.chunks:
        raw.extend(chunk)
        if len(raw) > MAX_TEXT_FIELD_BYTES:
            raise ApiError(
                "payload_too_large", f"a JSON body is limited to {MAX_TEXT_FIELD_BYTES} bytes"
            )
    return bytes(raw)


def payload_too_large(limit: int) -> ApiError:
    return ApiError("payload_too_large", f"the request body exceeds the {limit}-byte limit")


class _Receiver:
    """python-multipart callbacks writing file parts to the sink ``file_fields[name]()``."""

    def __init__(
        self,
        file_fields: dict[str, Callable[[], Sink]],
        text_fields: set[str],
        on_text: Callable[[str, str], None] | None,
    ) -> None:
        self.file_fields = file_fields
        self.text_fields = text_fields
        self.on_text = on_text
        self.form = ReceivedForm()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._name: str | None = None
        self._filename: str | None = None
        self._fh: Sink | None = None
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
            self._fh = self.file_fields[name]()
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
            self._fh.commit()
            self.form.files[self._name] = ReceivedFile(
                ref=self._fh.ref,
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
        """Abort a part still being written (the body failed or ended inside it)."""
        if self._fh is not None:
            self._fh.abort()
            self._fh = None


async def receive_multipart(
    body: RequestBody,
    *,
    file_fields: dict[str, Callable[[], Sink]],
    text_fields: set[str],
    max_bytes: int,
    on_text: Callable[[str, str], None] | None = None,
) -> ReceivedForm:
    """Stream a multipart/form-data body into storage.

    ``file_fields`` maps a form field to a factory of the sink it is written to (called when
    the part begins); ``text_fields`` are
    kept in memory (up to 1 MiB each) and passed to ``on_text`` as soon as each one ends, so a
    bad spec sent before the weights is refused before the weights are read. Raises
    ``ApiError`` (413 past ``max_bytes``, 400 on malformed multipart, 422 on unknown fields);
    the caller removes the files of parts already committed on failure.
    """
    content_type, params = parse_options_header(body.content_type)
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError("unsupported_media_type", "expected multipart/form-data with a boundary")
    check_content_length(body, max_bytes)
    receiver = _Receiver(file_fields, text_fields, on_text)
    try:
        parser = MultipartParser(boundary, receiver.callbacks())
    except MultipartParseError as exc:  # e.g. an over-long boundary
        raise ApiError("invalid_multipart", f"malformed multipart body: {exc}") from exc
    received = 0
    try:
        async for chunk in body.chunks:
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
