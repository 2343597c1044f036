"""A small HTTP client of the service, used by ``flow-compress submit/status/download/cancel``.

Torch-free and independent of the server's code paths: it speaks only the public /v1 API.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")
SIGNATURE_HEADER = "Flow-Compress-Signature"


def verify_signature(
    secret: str,
    body: bytes,
    signature_header: str,
    *,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> bool:
    """Whether a webhook request is authentic: ``signature_header`` (the
    ``Flow-Compress-Signature`` header, ``t=<unix time>,v1=<hex>``) carries an HMAC-SHA256 of
    ``"<t>.<body>"`` keyed by ``secret``, and ``t`` is within ``tolerance_s`` of ``now`` (a
    replayed old request fails). ``body`` must be the raw bytes received, not re-encoded JSON.
    """
    timestamp: int | None = None
    signatures: list[str] = []
    for part in signature_header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    # Every v1 entry is checked (a sender rotating secrets may send two), in constant time.
    return any(hmac.compare_digest(expected, sig) for sig in signatures)


class ApiClientError(Exception):
    """The server refused a request (``code`` from its error body) or could not be reached."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.status = status


class Client:
    def __init__(
        self,
        server: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            err = response.json()["error"]
            code, message = err["code"], err["message"]
            if err.get("field"):
                message = f"{err['field']}: {message}"
        except (ValueError, KeyError, TypeError):
            code, message = f"http_{response.status_code}", response.text[:500]
        raise ApiClientError(code, message, response.status_code)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiClientError("connection_failed", f"{self.http.base_url}: {exc}") from exc
        self._raise_for(response)
        return response

    # ------------------------------------------------------------------ calls
    def submit(
        self,
        spec: dict[str, Any],
        *,
        weights: Path | None = None,
        dataset_archive: Path | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """POST /v1/jobs: multipart when uploading files, JSON otherwise."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if weights is None and dataset_archive is None:
            return self._request("POST", "/v1/jobs", json=spec, headers=headers).json()  # type: ignore[no-any-return]
        with contextlib.ExitStack() as stack:
            # spec first: the server validates it before reading the (large) files.
            files: dict[str, Any] = {"spec": (None, json.dumps(spec), "application/json")}
            if weights is not None:
                fh = stack.enter_context(weights.open("rb"))
                files["weights"] = (weights.name, fh, "application/octet-stream")
            if dataset_archive is not None:
                fh = stack.enter_context(dataset_archive.open("rb"))
                files["dataset"] = (dataset_archive.name, fh, "application/octet-stream")
            return self._request("POST", "/v1/jobs", files=files, headers=headers).json()  # type: ignore[no-any-return]

    def preflight(self, spec: dict[str, Any], *, weights: Path | None = None) -> dict[str, Any]:
        """POST /v1/preflight with the spec (and weights) ``submit`` would send: the report,
        whose ``ok`` says whether every check passed."""
        if weights is None:
            return self._request("POST", "/v1/preflight", json=spec).json()  # type: ignore[no-any-return]
        with weights.open("rb") as fh:
            files: dict[str, Any] = {
                "spec": (None, json.dumps(spec), "application/json"),
                "weights": (weights.name, fh, "application/octet-stream"),
            }
            return self._request("POST", "/v1/preflight", files=files).json()  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/jobs/{job_id}").json()  # type: ignore[no-any-return]

    def report(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}/report").json()  # type: ignore[no-any-return]

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/v1/jobs/{job_id}/artifacts").json()["files"]  # type: ignore[no-any-return]

    def download(self, job_id: str, dest: Path, names: list[str] | None = None) -> list[Path]:
        """Stream artifacts into ``dest``, checking each sha256 against the manifest; a file
        appears under its name only once complete and verified."""
        dest.mkdir(parents=True, exist_ok=True)
        entries = self.artifacts(job_id)
        if names:
            unknown = set(names) - {e["name"] for e in entries}
            if unknown:
                raise ApiClientError("not_found", f"no artifact(s) {', '.join(sorted(unknown))}")
            entries = [e for e in entries if e["name"] in names]
        written = []
        for entry in entries:
            target = dest / entry["name"]
            partial = target.with_name(target.name + ".part")
            digest = hashlib.sha256()
            try:
                # A server with presigned downloads answers 307 to its object store; httpx
                # drops the API key when a redirect leaves the API's origin.
                with self.http.stream("GET", entry["url"], follow_redirects=True) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._raise_for(response)
                    with partial.open("wb") as fh:
                        for chunk in response.iter_bytes(1 << 20):
                            fh.write(chunk)
                            digest.update(chunk)
            except httpx.TransportError as exc:
                partial.unlink(missing_ok=True)
                raise ApiClientError("connection_failed", str(exc)) from exc
            if digest.hexdigest() != entry["sha256"]:
                partial.unlink(missing_ok=True)
                raise ApiClientError("checksum_mismatch", f"{entry['name']} sha256 differs")
            partial.replace(target)
            written.append(target)
        return written

    def wait(
        self,
        job_id: str,
        *,
        poll_interval: float = 2.0,
        timeout: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job ends; brief connection failures (an API restart) are retried."""
        deadline = None if timeout is None else time.monotonic() + timeout
        failures = 0
        for job in self._poll(job_id, poll_interval):
            if job is None:
                failures += 1
                if failures > 10:
                    raise ApiClientError("connection_failed", "the server stopped answering")
            else:
                failures = 0
                if on_update is not None:
                    on_update(job)
                if job["state"] in TERMINAL:
                    return job
            if deadline is not None and time.monotonic() > deadline:
                raise ApiClientError("wait_timeout", f"job {job_id} still running after {timeout}s")
        raise AssertionError("unreachable")

    def _poll(self, job_id: str, interval: float) -> Iterator[dict[str, Any] | None]:
        while True:
            try:
                yield self.job(job_id)
            except ApiClientError as exc:
                if exc.code != "connection_failed" and exc.status not in (502, 503, 504):
                    raise
                yield None
            time.sleep(interval)
