"""The operator dashboard: its figures as JSON (operator token) and the page that shows them.

The page (``/``) and its two assets are package files; the page asks for the operator token
itself, so serving it needs no credentials and reveals nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from orchestrator.api.deps import OperatorDep, ServicesDep
from orchestrator.api.openapi import problems
from orchestrator.api.strict_json import StrictJSONRoute
from orchestrator.exceptions import NotFound
from orchestrator.services.dashboard import DEFAULT_BUCKET_S, DEFAULT_RECENT_JOBS
from protocol.dashboard import Dashboard

router = APIRouter(tags=["operator"], route_class=StrictJSONRoute)

PAGE_DIR = Path(__file__).resolve().parents[2] / "dashboard"
ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
# The page talks to this origin only: no CDN, no inline script, nothing framed.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@router.get("/v1/dashboard", responses=problems(401, 422, 503))
def dashboard(
    _: OperatorDep,
    services: ServicesDep,
    minutes: Annotated[int, Query(ge=1, le=24 * 60, description="series window")] = 30,
    bucket_s: Annotated[int, Query(ge=1, le=3600, description="series bucket width")] = (
        DEFAULT_BUCKET_S
    ),
    jobs: Annotated[int, Query(ge=0, le=500, description="recent jobs listed")] = (
        DEFAULT_RECENT_JOBS
    ),
) -> Dashboard:
    """Workers, recent jobs, totals and per-bucket series over the last ``minutes``.
    Wei as decimal strings, energy in joules, latency in seconds."""
    return services.dashboard.snapshot(
        services.now(), window_s=minutes * 60, bucket_s=bucket_s, recent_jobs=jobs
    )


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(PAGE_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/dashboard/{name}", include_in_schema=False)
def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no dashboard asset {name!r}; the dashboard is at /")
    return FileResponse(PAGE_DIR / name, media_type=media_type, headers=PAGE_HEADERS)
