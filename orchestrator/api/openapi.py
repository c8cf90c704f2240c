"""The OpenAPI document: every route's problem responses, as the API really sends them.

Routes declare the error statuses they can answer with ``responses=problems(401, 404, ...)``;
each is documented as an RFC 9457 problem document (``application/problem+json``, schema
``Problem``), which is what api/problems.py sends. FastAPI's own 422 entry (a JSON
``HTTPValidationError``) is replaced by the problem document the validation handler sends.
tests/api/test_openapi_conformance.py runs schemathesis with its conformance checks against
the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.api.problems import PROBLEM_JSON

PROBLEM_REF = "#/components/schemas/Problem"

# What each status means on this API (the description in the document).
DESCRIPTIONS: dict[int, str] = {
    400: "The body is not valid JSON (`malformed_json`)",
    401: "Missing or unknown credentials (`unauthorized`); send `Authorization: Bearer ...`",
    402: "No payer linked, or not enough authorised funds for the job's most possible cost",
    403: "Credentials fine, but the resource is not yours (`forbidden`)",
    404: "No such resource, or not one you may see (`not_found`)",
    409: "The resource's state does not allow it now (`conflict`): a stale attempt, a job "
    "that is final or still running",
    413: "The body is over the size limit (`payload_too_large`, with `limit_bytes`)",
    422: "A field is invalid (`invalid_input`, with `errors` per field) or a signature does "
    "not recover the sender (`bad_signature`)",
    429: "Too many requests from this address (`too_many_requests`); the `Retry-After` "
    "header (and `retry_after_s`) says when to try again",
    503: "The payment chain did not answer (`chain_unavailable`); nothing was changed, "
    "retry after `Retry-After` seconds",
    507: "The blob store's disk is full (`insufficient_storage`)",
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem document; extra members depend on the problem (``errors`` for
    invalid input, ``current_attempt`` for a stale attempt, ``limit_bytes``,
    ``retry_after_s``, ``derived_units``)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": "/problems/invalid_input",
                    "title": "Unprocessable Content",
                    "status": 422,
                    "code": "invalid_input",
                    "detail": "max_price_wei_per_unit: Value error, wei must be a whole number, "
                    "as an integer or a decimal string like '1000'",
                    "errors": [
                        {
                            "field": "max_price_wei_per_unit",
                            "message": "Value error, wei must be a whole number, as an "
                            "integer or a decimal string like '1000'",
                        }
                    ],
                },
                {
                    "type": "/problems/conflict",
                    "title": "Conflict",
                    "status": 409,
                    "code": "conflict",
                    "detail": "attempt 1 of job 4f0c2d0e9b7a4c4e8a1f2b3c4d5e6f70 is stale; the "
                    "current attempt is 2",
                    "current_attempt": 2,
                },
            ]
        },
    )

    type: str = Field(description="A URI reference naming the problem: /problems/CODE")
    title: str = Field(description="The HTTP status phrase")
    status: int = Field(ge=400, le=599)
    code: str = Field(description="Machine-readable problem code")
    detail: str = Field(description="What went wrong and what to do about it, for a person")
    errors: list[FieldError] | None = None


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for these error statuses, each a problem document."""
    entries: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "description": DESCRIPTIONS[status],
            "content": {PROBLEM_JSON: {"schema": {"$ref": PROBLEM_REF}}},
        }
        if status in (429, 503):
            entry["headers"] = RETRY_AFTER
        entries[status] = entry
    return entries


def _as_problems(document: dict[str, Any]) -> None:
    """Every error response is a problem document; FastAPI's JSON 422 becomes one too."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                if str(status).isdigit() and int(status) >= 400:
                    response["content"] = {PROBLEM_JSON: {"schema": {"$ref": PROBLEM_REF}}}
                    response["description"] = DESCRIPTIONS.get(
                        int(status), response.get("description", "")
                    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(problem.pop("$defs", {}))
    schemas["Problem"] = problem


def install_openapi(app: FastAPI) -> None:
    """Serve the document with problem responses (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _as_problems(document)
            app.openapi_schema = document
        return app.openapi_schema

    setter: Callable[[], dict[str, Any]] = openapi
    app.openapi = setter  # type: ignore[method-assign]
