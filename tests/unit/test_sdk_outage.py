"""The SDK's waits ride out an orchestrator that is away for a while (restarting, a replica
stopping behind a load balancer): they try again after network failures and retryable answers
(429, 5xx) until their own deadline, and raise anything else at once. The orchestrator here is
a script of answers (httpx.MockTransport); tests/integration/test_orchestrator_stop.py waits
across a real orchestrator's restart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from gpumarket import AsyncClient, Client, GpumarketAPIError, _calls

JOB_ID = "0" * 32
RESULT = {"job_id": JOB_ID, "output": {"embeddings": [[1.0]]}, "cost_wei": "7"}
Step = Callable[[httpx.Request], httpx.Response]


def _problem(status: int, code: str) -> httpx.Response:
    body = {"type": f"/problems/{code}", "title": code, "status": status, "code": code}
    body["detail"] = f"{code}, as scripted"
    return httpx.Response(status, json=body, headers={"Content-Type": "application/problem+json"})


def _down(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def _job(state: str) -> Step:
    return lambda request: httpx.Response(200, json={"id": JOB_ID, "state": state})


class Script:
    """Answers requests in order (the last one repeats); keeps what was asked."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.asked: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.asked.append(f"{request.method} {request.url.path}")
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        return step(request)


@pytest.fixture(autouse=True)
def short_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_calls, "RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(_calls, "RETRY_MAX_S", 0.05)


def _restart_then_result() -> Script:
    """Running; then the orchestrator is away (refused, a proxy's 502 and 503); then the job
    has succeeded, and its result comes after one more refused connection."""
    return Script(
        _job("running"),
        _down,
        lambda r: _problem(502, "bad_gateway"),
        lambda r: _problem(503, "unavailable"),
        _job("succeeded"),
        _down,
        lambda r: httpx.Response(200, json=RESULT),
    )


def test_wait_rides_out_an_orchestrator_restart() -> None:
    script = _restart_then_result()
    with Client("http://o.test", "gmk_x", transport=httpx.MockTransport(script)) as client:
        assert client.wait(JOB_ID, timeout_s=30) == RESULT
    assert script.asked[-1] == f"GET /v1/jobs/{JOB_ID}/result"
    assert len(script.asked) == 7


def test_async_wait_rides_out_an_orchestrator_restart() -> None:
    script = _restart_then_result()

    async def main() -> dict[str, Any]:
        transport = httpx.MockTransport(script)
        async with AsyncClient("http://o.test", "gmk_x", transport=transport) as client:
            return await client.wait(JOB_ID, timeout_s=30)

    assert asyncio.run(main()) == RESULT
    assert len(script.asked) == 7


def test_wait_many_rides_out_a_refused_connection() -> None:
    answer = {"states": [{"id": JOB_ID, "state": "succeeded"}], "results": [RESULT], "jobs": []}
    script = Script(_down, _down, lambda r: httpx.Response(200, json=answer))
    with Client("http://o.test", "gmk_x", transport=httpx.MockTransport(script)) as client:
        assert client.wait_many([JOB_ID], timeout_s=30) == [RESULT]
    assert script.asked == ["POST /v1/jobs/wait"] * 3


def test_an_answer_that_is_no_outage_is_raised_at_once() -> None:
    script = Script(_job("running"), lambda r: _problem(404, "not_found"))
    with Client("http://o.test", "gmk_x", transport=httpx.MockTransport(script)) as client:
        with pytest.raises(GpumarketAPIError) as raised:
            client.wait(JOB_ID, timeout_s=30)
    assert raised.value.status == 404
    assert len(script.asked) == 2


def test_an_orchestrator_away_past_the_deadline_is_the_error_not_a_job_timeout() -> None:
    script = Script(_job("running"), _down)
    with Client("http://o.test", "gmk_x", transport=httpx.MockTransport(script)) as client:
        with pytest.raises(httpx.ConnectError):
            client.wait(JOB_ID, timeout_s=0.3)
    assert len(script.asked) > 2  # tried again until the deadline


def test_retry_after_is_honoured_and_pauses_double_up_to_the_cap() -> None:
    outage = _calls.Outage(deadline=float("inf"))
    request = httpx.Request("GET", "http://o.test/v1/jobs/x")
    refused = httpx.ConnectError("refused", request=request)
    pauses = [outage.pause_after(refused) for _ in range(5)]
    assert pauses == [0.01, 0.02, 0.04, 0.05, 0.05]
    busy = GpumarketAPIError.from_body(429, json.dumps({"detail": "slow down"}).encode())
    busy.retry_after_s = 2.0
    assert outage.pause_after(busy) == 2.0
    outage.over()
    assert outage.pause_after(refused) == 0.01
