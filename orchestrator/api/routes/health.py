"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from orchestrator.api.deps import ServicesDep
from orchestrator.api.problems import problem
from orchestrator.api.strict_json import StrictJSONRoute

router = APIRouter(tags=["health"], route_class=StrictJSONRoute)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=None,
    responses={
        200: {"description": "Ready: the database answers, its schema is current"},
        503: {"description": "The database is unreachable or its schema is behind"},
    },
)
def readyz(services: ServicesDep) -> dict[str, str] | JSONResponse:
    """The database answers and its schema is at the newest migration."""
    try:
        services.store.ping()
        current = services.store.schema_is_current()
    except SQLAlchemyError as exc:
        return problem(
            503, "database_unavailable", f"database unreachable: {exc.__class__.__name__}"
        )
    if not current:
        return problem(503, "schema_outdated", "database schema is behind; run migrations")
    return {"status": "ready", "database": services.store.dialect}
