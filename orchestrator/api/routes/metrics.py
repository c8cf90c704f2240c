"""Prometheus scrape endpoint (unauthenticated, like /healthz; not in the OpenAPI schema)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import SQLAlchemyError

from orchestrator.api.problems import problem
from orchestrator.metrics import CONTENT_TYPE, render

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """The market's figures, read from the store now (see ``orchestrator.metrics``)."""
    registry: CollectorRegistry = request.app.state.metrics_registry
    try:
        body = render(registry)
    except SQLAlchemyError as exc:
        return problem(
            503, "database_unavailable", f"database unreachable: {exc.__class__.__name__}"
        )
    return Response(content=body, media_type=CONTENT_TYPE)
