"""The web page: server-rendered shells (Jinja2) whose scripts read the JSON API.

The HTML carries no job data and no secret: the scripts (``api/web/static``) fetch everything
from /v1 with the API key the user typed, kept in the tab's ``sessionStorage`` and sent as a
header. Pages and static files are same-origin only, with a Content-Security-Policy that allows
no inline script or style, no framing and no third-party origin (the page works offline).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.templating import Jinja2Templates
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from flow_compress.arch import list_architectures
from flow_compress.refs import BUILTIN_DATASETS
from worker.jobs import JobState
from worker.storage import JOB_ID

WEB = Path(__file__).resolve().parents[1] / "web"

# blob: images are the report's plots, fetched with the key header (an <img src> cannot send
# one); data: is for none of ours but keeps the browser's own icons working.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

templates = Jinja2Templates(directory=WEB / "templates")
router = APIRouter(include_in_schema=False)


def _page(request: Request, name: str, status: int = 200, **context: object) -> Response:
    response = templates.TemplateResponse(request, name, context, status_code=status)
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = "no-cache"
    return response


@router.get("/")
def jobs_page(request: Request) -> Response:
    return _page(request, "jobs.html", states=[s.value for s in JobState])


@router.get("/submit")
def submit_page(request: Request) -> Response:
    datasets = [d for d in BUILTIN_DATASETS if d != "imagefolder"] + ["imagefolder:NAME"]
    return _page(request, "submit.html", architectures=list_architectures(), datasets=datasets)


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str) -> Response:
    if not JOB_ID.match(job_id):
        return _page(request, "missing.html", status=404, job_id=job_id)
    return _page(request, "job.html", job_id=job_id)


class StaticWithHeaders(StaticFiles):
    """Starlette's static files, with the pages' security headers on every answer."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def static_files() -> StaticWithHeaders:
    return StaticWithHeaders(directory=WEB / "static")
