"""The keyboard page at ``/``: one static HTML page whose script types against the session
WebSocket (``service/api/static/``). It ships inside the package and loads nothing from another origin
(no build step, no CDN, no web fonts), so it works offline. Not part of the API: hidden from the
OpenAPI document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

# The page must never depend on another origin; the policy makes the browser enforce that (a
# stray CDN link fails in the end-to-end test instead of silently working online only).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/", include_in_schema=False)
async def keyboard_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


class _RevalidatedStaticFiles(StaticFiles):
    """Static files the browser revalidates (ETag → 304) on every load, so a new release's script
    is never run against an old page or the other way round."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def mount_static(app: FastAPI) -> None:
    """Serve the page's script and stylesheet under ``/static/``."""
    app.mount("/static", _RevalidatedStaticFiles(directory=STATIC_DIR), name="static")
