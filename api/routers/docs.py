"""The API documentation: the OpenAPI document, Swagger UI and ReDoc.

Served here rather than by FastAPI's defaults for two reasons: with API keys configured the
three pages need a key like any /v1 route (``FLOW_COMPRESS_PUBLIC_DOCS=true`` opens them), and
Swagger UI's and ReDoc's scripts come from the ``fastapi-offline`` package, not a CDN, so an
installation without internet access has working docs. The scripts themselves are public:
they are the same for every installation and say nothing about this one.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from api.deps import DocsAccessDep, OpenApiDep
from api.errors import ApiError

ASSETS = Path(str(files("fastapi_offline") / "static"))
_ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
_STATIC = "/docs/static"
TITLE = "flow-compress API"

router = APIRouter(include_in_schema=False)


@router.get("/openapi.json")
def openapi_document(_: DocsAccessDep, schema: OpenApiDep) -> JSONResponse:
    return JSONResponse(schema)


@router.get("/docs")
def swagger_ui(_: DocsAccessDep) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=TITLE,
        swagger_js_url=f"{_STATIC}/swagger-ui-bundle.js",
        swagger_css_url=f"{_STATIC}/swagger-ui.css",
        swagger_favicon_url=f"{_STATIC}/favicon.png",
    )


@router.get("/redoc")
def redoc(_: DocsAccessDep) -> HTMLResponse:
    return get_redoc_html(
        openapi_url="/openapi.json",
        title=TITLE,
        redoc_js_url=f"{_STATIC}/redoc.standalone.js",
        redoc_favicon_url=f"{_STATIC}/favicon.png",
        with_google_fonts=False,
    )


@router.get("/docs/static/{name}")
def docs_asset(name: str) -> FileResponse:
    media_type = _ASSET_TYPES.get(name)
    if media_type is None:
        raise ApiError("not_found", f"no documentation asset {name!r}")
    # The same files for every installation: cacheable, unlike the API's answers.
    return FileResponse(
        ASSETS / name, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"}
    )
