"""Schemathesis, short run: requests generated from the OpenAPI spec never get a 5xx, and
every answer conforms to the spec: a status code the operation lists, a media type it lists
for that status (``application/problem+json`` for errors), a body matching its schema, and
the headers it documents (``Retry-After`` on 429 and 503).

A few examples per operation, derandomized so ``make test`` sees the same requests every
time; the long, random run is in ``make faults`` (tests/faults/test_api_fuzz_long.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import settings

from orchestrator.store import Store
from tests.fuzzing import CHECKS, HEALTH_CHECKS_OFF, FuzzTarget, build_target, openapi_schema

MAX_EXAMPLES = 3

schema = openapi_schema()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    root = tmp_path_factory.mktemp("fuzz")
    store = Store(f"sqlite:///{root / 'orchestrator.db'}")
    try:
        yield build_target(root / "data", store)
    finally:
        store.dispose()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=HEALTH_CHECKS_OFF,
)
def test_no_server_errors_and_answers_as_documented(
    case: schemathesis.Case, target: FuzzTarget
) -> None:
    response = target.call(case)
    case.validate_response(response, checks=CHECKS)


def test_the_fuzzer_reached_the_handlers(target: FuzzTarget) -> None:
    """Runs after the cases above (file order): they sent requests, and with credentials
    that let most of them past authentication."""
    assert target.requests > 0, "no request was generated"
    assert target.statuses[401] < target.requests / 2, target.statuses
    assert not any(status >= 500 for status in target.statuses), target.statuses
