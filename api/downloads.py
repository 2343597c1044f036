"""Serving a published artifact: from the local folder, streamed from S3, or a redirect.

All three answer with the same headers (``ETag`` = the manifest's sha256 in quotes,
``X-Content-SHA256``, ``Content-Disposition: attachment``, ``Accept-Ranges: bytes``), and
byte ranges behave alike: the local folder goes through Starlette's ``FileResponse``; the S3
stream parses ``Range`` with the same Starlette parser and asks the store for that one range
(a multi-range request is answered with the whole file, which RFC 9110 allows); ``If-Range``
with a different ETag gets the whole file. A malformed Range is a 400 ``invalid_range`` and
one past the end a 416 ``range_not_satisfiable``, in the API's JSON error shape. Artifacts never
change once published, so the manifest's sha256 is a strong ETag and ``If-None-Match`` naming it
answers 304. With ``download_redirect`` a remote store answers 307 to a presigned URL instead,
so the bytes never pass through the API.
"""

from __future__ import annotations

import mimetypes
from urllib.parse import quote

from fastapi import Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from api.errors import ApiError
from api.settings import ApiSettings
from worker.storage import ManifestEntry, Storage


def _disposition(name: str) -> str:
    # Starlette's FileResponse spelling, so local and remote downloads name files alike.
    quoted = quote(name)
    if quoted != name:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{name}"'


def _etag_matches(header: str, etag: str) -> bool:
    """RFC 9110 If-None-Match: ``*`` or a list of (weak or strong) entity tags."""
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


def _ranges(header: str, size: int) -> list[tuple[int, int]]:
    """Starlette's own Range parser (so what passes here is what FileResponse serves), with
    its plain-text refusals turned into the API's errors."""
    try:
        return FileResponse._parse_range_header(header, size)
    except MalformedRangeHeader as exc:
        raise ApiError("invalid_range", f"invalid Range header: {exc.content}") from None
    except RangeNotSatisfiable:
        raise ApiError(
            "range_not_satisfiable",
            f"the range lies outside the artifact ({size} bytes)",
            headers={"Content-Range": f"bytes */{size}"},
        ) from None


def _headers(entry: ManifestEntry) -> dict[str, str]:
    return {
        "ETag": f'"{entry.sha256}"',
        "X-Content-SHA256": entry.sha256,
        "Cache-Control": "private, no-cache",
    }


def artifact_response(
    storage: Storage, settings: ApiSettings, job_id: str, name: str, request_headers: Headers
) -> Response:
    """The response for ``GET /v1/jobs/{job_id}/artifacts/{name}`` (404 unless the
    manifest lists ``name``)."""
    path = None
    if storage.remote:
        entry = storage.artifact_entry(job_id, name)
    else:
        found = storage.artifact_file(job_id, name)
        path, entry = found if found is not None else (None, None)
    if entry is None:
        raise ApiError("not_found", f"job {job_id} has no artifact {name!r}")
    headers = _headers(entry)
    if_none_match = request_headers.get("if-none-match")
    if if_none_match is not None and _etag_matches(if_none_match, headers["ETag"]):
        return Response(status_code=304, headers=headers)
    if path is not None:
        wanted = request_headers.get("range")
        if wanted is not None and request_headers.get("if-range") in (None, headers["ETag"]):
            _ranges(wanted, entry.size)  # refuse a bad range in the API's error shape
        media_type = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, filename=entry.name, headers=headers)
    if settings.download_redirect:
        url = storage.presigned_url(
            job_id, entry.name, settings.presign_ttl_s, _disposition(entry.name)
        )
        return RedirectResponse(url, status_code=307, headers=headers)
    return _stream(storage, job_id, entry, request_headers)


def _stream(
    storage: Storage, job_id: str, entry: ManifestEntry, request_headers: Headers
) -> Response:
    headers = _headers(entry) | {
        "Accept-Ranges": "bytes",
        "Content-Disposition": _disposition(entry.name),
    }
    etag = headers["ETag"]
    media_type = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
    wanted = request_headers.get("range")
    if_range = request_headers.get("if-range")
    byte_range: tuple[int, int] | None = None
    if wanted is not None and (if_range is None or if_range == etag):
        ranges = _ranges(wanted, entry.size)
        if len(ranges) == 1:
            byte_range = ranges[0]
    body = storage.open_artifact(job_id, entry.name, byte_range)
    if byte_range is None:
        headers["Content-Length"] = str(entry.size)
        return StreamingResponse(body, media_type=media_type, headers=headers)
    start, end = byte_range
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
    headers["Content-Length"] = str(end - start)
    return StreamingResponse(body, status_code=206, media_type=media_type, headers=headers)
