"""The OpenAPI document: problem responses on every route, examples on the main schemas.

What the API really answers is checked against the document by schemathesis
(tests/api/test_api_fuzz.py); this checks the document's shape and that its examples are
valid inputs and outputs of the models they illustrate.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator.api.openapi import Problem
from protocol import CompleteRequest, JobSpec, JobView, Offer, RegisterRequest, ResultView
from protocol.workers import AccountView, ChallengeRequest, LeaseRequest, WorkerView
from tests.fuzzing import openapi_schema

PROBLEM_JSON = "application/problem+json"
EXAMPLED = [
    JobSpec,
    JobView,
    ResultView,
    Offer,
    ChallengeRequest,
    RegisterRequest,
    LeaseRequest,
    CompleteRequest,
    WorkerView,
    AccountView,
    Problem,
]


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    raw: dict[str, Any] = openapi_schema().raw_schema
    return raw


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    ]


def test_every_error_response_is_a_documented_problem(document: dict[str, Any]) -> None:
    for method, path, operation in _operations(document):
        where = f"{method} {path}"
        responses = operation["responses"]
        errors = {s: r for s, r in responses.items() if s.isdigit() and int(s) >= 400}
        if path != "/readyz":  # answers 503 when not ready; "/healthz" never fails
            assert errors or path == "/healthz", f"{where} documents no error response"
        for status, response in errors.items():
            content = response.get("content", {})
            if path == "/readyz":
                continue
            assert list(content) == [PROBLEM_JSON], f"{where} {status}: {list(content)}"
            assert content[PROBLEM_JSON]["schema"] == {"$ref": "#/components/schemas/Problem"}
        if operation.get("security"):
            assert "401" in responses, f"{where} takes credentials but documents no 401"
        if "requestBody" in operation or operation.get("parameters"):
            assert "422" in responses, f"{where} takes input but documents no 422"
        if "{" in path:
            assert "404" in responses, f"{where} names a resource but documents no 404"
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # FastAPI's 422 is replaced by the problem


def test_rate_limited_and_chain_routes_document_retry_after(document: dict[str, Any]) -> None:
    seen = 0
    for method, path, operation in _operations(document):
        for status in ("429", "503"):
            response = operation["responses"].get(status)
            if response is not None and path != "/readyz":
                assert "Retry-After" in response.get("headers", {}), f"{method} {path} {status}"
                seen += 1
    assert seen >= 3
    register = document["paths"]["/v1/workers/register"]["post"]["responses"]
    assert "429" in register


@pytest.mark.parametrize("model", EXAMPLED, ids=lambda m: m.__name__)
def test_main_schemas_carry_examples_that_are_valid(
    model: type[BaseModel], document: dict[str, Any]
) -> None:
    schemas = document["components"]["schemas"]
    schema = schemas.get(model.__name__) or schemas.get(f"{model.__name__}-Input")
    assert schema is not None, f"{model.__name__} is not in the document"
    examples = schema.get("examples")
    assert examples, f"{model.__name__} has no examples"
    for example in examples:
        model.model_validate(example)  # a wrong example would raise here
