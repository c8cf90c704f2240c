"""Map every error to an RFC 9457 problem document: {type, title, status, code, detail}."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from contracts.chain import ChainError
from orchestrator.exceptions import GpumarketError
from orchestrator.store.engine import is_transient

log = logging.getLogger("gpumarket.orchestrator.api")
PROBLEM_JSON = "application/problem+json"
CHAIN_RETRY_AFTER_S = 5
DATABASE_RETRY_AFTER_S = 1
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {
        "type": f"/problems/{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "code": code,
        "detail": detail,
        **extra,
    }
    all_headers = dict(headers or {})
    if status == 401:
        all_headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=all_headers)


def _allowed_methods(request: Request) -> str:
    """Every method some route takes on this path. Starlette's own Allow header names only
    the first route that matched the path (GET and POST /v1/jobs are two routes)."""
    allowed = []
    for method in HTTP_METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


def _routing_problem(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The router's bare "Not Found" / "Method Not Allowed", told with what to do instead."""
    code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    asked = f"{request.method} {request.url.path}"
    if exc.status_code == 405:
        allowed = _allowed_methods(request) or (exc.headers or {}).get("Allow", "")
        detail = f"{asked} is not allowed; this path takes {allowed}"
        return problem(405, code, detail, headers={**(exc.headers or {}), "Allow": allowed})
    detail = f"no route for {asked}; the API is described at /docs and /openapi.json"
    return problem(exc.status_code, code, detail, headers=exc.headers)


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "request"


def _validation_problem(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            return problem(
                400,
                "malformed_json",
                f"request body is not valid JSON: {ctx.get('error', err.get('msg'))}",
            )
    items = [
        {"field": _location(tuple(e.get("loc", ()))), "message": str(e.get("msg"))} for e in errors
    ]
    detail = "; ".join(f"{i['field']}: {i['message']}" for i in items)
    return problem(422, "invalid_input", detail, errors=items)


OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")
"""Routes of the OpenAI dialect: their errors take OpenAI's shape, not a problem document."""


def _dialect(request: Request, response: JSONResponse) -> JSONResponse:
    """``response`` as OpenAI's ``{"error": {message, type, code}}`` on the OpenAI routes."""
    if request.url.path.rstrip("/") not in OPENAI_PATHS:
        return response
    body = json.loads(bytes(response.body))
    headers = {k: v for k, v in response.headers.items() if k.lower() in ("www-authenticate",)}
    return JSONResponse(
        openai_error_body(body["status"], body["code"], body["detail"]),
        status_code=response.status_code,
        headers=headers,
    )


def openai_error_body(status: int, code: str, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
    default = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind.get(status, default), "code": code}}


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(GpumarketError)
    async def _domain(request: Request, exc: GpumarketError) -> JSONResponse:
        answer = problem(exc.status, exc.code, exc.detail, headers=exc.headers, **exc.extra)
        return _dialect(request, answer)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _dialect(request, _validation_problem(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _dialect(request, _http_problem(request, exc))

    def _http_problem(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = HTTPStatus(exc.status_code).phrase
        if exc.status_code in (404, 405) and exc.detail == phrase:
            return _routing_problem(request, exc)
        if isinstance(exc.__cause__, GpumarketError):  # raised where FastAPI reads the body
            cause = exc.__cause__
            return problem(cause.status, cause.code, cause.detail, **cause.extra)
        code = phrase.lower().replace(" ", "_")
        return problem(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        # Left after the service's own re-runs (store.retry_transient): busy or failing over,
        # nothing was committed by the failed transaction. Anything else is a bug: re-raised.
        if not is_transient(exc):
            raise exc
        log.warning("database busy on %s %s: %s", request.method, request.url.path, exc.orig)
        return problem(
            503,
            "database_busy",
            "the database could not finish this request now; nothing was changed by it, "
            "retry shortly",
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
        )

    @app.exception_handler(ChainError)
    async def _chain(request: Request, exc: ChainError) -> JSONResponse:
        # The chain (RPC) is a dependency like the database: down for now, not our bug.
        log.warning("chain unavailable on %s %s: %s", request.method, request.url.path, exc)
        return problem(
            503,
            "chain_unavailable",
            "the payment chain did not answer; nothing was changed, retry shortly",
            headers={"Retry-After": str(CHAIN_RETRY_AFTER_S)},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "internal_error", "internal error; it has been logged")
