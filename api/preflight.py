"""POST /v1/preflight: a job's preflight (``flow_compress.pipeline.preflight``), answered in
seconds.

The request is the body ``POST /v1/jobs`` takes (a ``JobSpec``, as JSON or as the ``spec``
part of a multipart form with an optional ``weights`` file), so ``submit`` checks exactly the
job it is about to send; the dataset is not read. The spec goes through the same static
validation as a job (model names against the workers' catalogue, limits, weights_uri
isolation), then the check runs here, in a child process (``python -m flow_compress.cli check
--config … --json``): the API process never imports torch, and a preflight must not wait
behind a GPU worker's hour-long job on the queue. The image the API runs from is the workers'
(Dockerfile), so the child builds what they build, operators' plug-in packages included when
installed on both.

Bounded: at most ``preflight_concurrency`` children at once per API process; a request that
finds no free slot within ``preflight_queue_s`` is 503 ``preflight_busy`` with Retry-After, and
a child running past ``preflight_timeout_s`` is killed (504 ``timeout``). The uploaded weights
live in a private temporary folder under the API's storage root and are removed when the
answer is sent, whatever it is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.errors import STATUS_BY_CODE, ApiError
from api.jobs import JobService, check_uploaded_weights
from api.schemas import JobSpec
from api.settings import ApiSettings
from api.uploads import RequestBody, read_json_body, receive_multipart
from flow_compress.schema import PreflightReport
from worker.process import die_with_parent
from worker.storage import FileSink

log = logging.getLogger(__name__)


class PreflightService:
    """Runs preflights for the routes (one per API process; see the module docstring)."""

    def __init__(self, settings: ApiSettings, jobs: JobService) -> None:
        self.settings = settings
        self.jobs = jobs
        self._slots = asyncio.Semaphore(settings.preflight_concurrency)

    async def run(self, body: RequestBody, owner: str) -> PreflightReport:
        """Check the job ``body`` describes; raises ``ApiError`` for a bad request, a busy
        service, a timeout or a check that could not run."""
        try:
            await asyncio.wait_for(self._slots.acquire(), self.settings.preflight_queue_s)
        except TimeoutError:
            raise ApiError(
                "preflight_busy",
                f"{self.settings.preflight_concurrency} preflight(s) already running; retry",
                headers={"Retry-After": str(max(1, round(self.settings.preflight_queue_s)))},
            ) from None
        # A throwaway id: a weights_uri naming the caller's own earlier upload is linked into
        # uploads/<id>/ exactly as for a job, and removed with the answer.
        scratch_id = uuid.uuid4().hex
        storage = self.jobs.storage
        work = Path(tempfile.mkdtemp(prefix="preflight-", dir=storage.root))
        try:
            spec, weights = await self._receive(body, owner, scratch_id, work)
            return await self._check(spec, weights, work)
        finally:
            self._slots.release()
            shutil.rmtree(work, ignore_errors=True)
            await run_in_threadpool(storage.remove_uploads, scratch_id)

    async def _receive(
        self, body: RequestBody, owner: str, scratch_id: str, work: Path
    ) -> tuple[JobSpec, Path | None]:
        content_type = (body.content_type or "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            specs: list[JobSpec] = []
            form = await receive_multipart(
                body,
                file_fields={"weights": lambda: FileSink(work / "weights.bin")},
                text_fields={"spec"},
                max_bytes=self.settings.max_upload_bytes,
                on_text=lambda _name, text: specs.append(self.jobs.parse_spec(text, "spec")),
            )
            if not specs:
                raise ApiError("validation_error", "the spec form field is required", field="spec")
            spec, prefix = specs[0], "spec."
            uploaded = form.files.get("weights")
            check_uploaded_weights(spec, uploaded)
            if uploaded is not None:
                return spec, Path(uploaded.ref)
        elif content_type == "application/json":
            spec, prefix = self.jobs.parse_spec(await read_json_body(body), ""), ""
        else:
            raise ApiError(
                "unsupported_media_type",
                "send multipart/form-data (with a weights file) or application/json",
            )
        if spec.weights_uri:
            found = await self.jobs.weights.resolve(
                spec.weights_uri, owner, scratch_id, f"{prefix}weights_uri"
            )
            return spec, found.path
        # No weights: the answer still covers the architecture, MACs, caps and export, and
        # says weights "not_given" (pretrained ones come from the caches, as in a job).
        return spec, None

    async def _check(self, spec: JobSpec, weights: Path | None, work: Path) -> PreflightReport:
        config_file = work / "config.json"
        config_file.write_text(spec.config.model_dump_json())
        argv = [sys.executable, "-m", "flow_compress.cli", "check", "--config", str(config_file)]
        if weights is not None:
            argv += ["--weights", str(weights)]
        # Deployments are checked against the workers (JobService.check_deployment).
        argv += ["--json", "--no-deployment-check"]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=work,
            preexec_fn=die_with_parent(),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.settings.preflight_timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ApiError(
                "timeout",
                f"the preflight ran past {self.settings.preflight_timeout_s:g} s and was stopped",
            ) from None
        except asyncio.CancelledError:  # the client went away: do not leave the child running
            proc.kill()
            await proc.wait()
            raise
        return _answer(proc.returncode, out, err)


def _answer(returncode: int | None, out: bytes, err: bytes) -> PreflightReport:
    """The child's stdout as a report (exit 0 or 1: checks passed or failed) or as the error
    it names (exit 2); anything else is an internal error, logged with its stderr."""
    try:
        parsed = json.loads(out)
    except ValueError:
        parsed = None
    if returncode in (0, 1) and isinstance(parsed, dict) and "error" not in parsed:
        try:
            return PreflightReport.model_validate(parsed)
        except ValidationError:
            pass
    elif returncode == 2 and isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        code = str(parsed["error"].get("code", ""))
        message = str(parsed["error"].get("message", ""))
        if code in STATUS_BY_CODE and code != "internal_error":
            raise ApiError(code, message)
    log.error(
        "preflight child exited %s; stderr: %s",
        returncode,
        err.decode(errors="replace")[-2000:],
    )
    raise ApiError("internal_error", "the preflight could not run; the operator's log says why")


__all__ = ["PreflightService"]
