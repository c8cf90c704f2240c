"""ResultReporter: results ready together go in one signed batch; a lone one goes alone; a
batch refused whole is retried one by one, so only a bad result fails."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from eth_account import Account

from protocol import CompleteRequest, JobState
from protocol.batches import BatchCompleteItem, BatchCompleteRequest, BatchResult, ItemError
from protocol.problems import ProblemError
from protocol.signing import (
    output_sha256,
    recover_result_batch_signer,
    recover_result_signer,
    result_hash,
)
from worker.reporting import ResultReporter

PRICE = 7


def result(job_id: str) -> BatchResult:
    output = {"embeddings": [[0.5]]}
    return BatchResult(
        job_id=job_id,
        attempt=1,
        output=output,
        output_sha256=output_sha256(output),
        price_wei_per_unit=PRICE,
        duration_s=0.1,
        energy_j=1.0,
        energy_source="estimate",
        units=1,
    )


def view(job_id: str, signature: str) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "attempt": 1,
        "state": "succeeded",
        "output_sha256": "00" * 32,
        "signature": signature,
        "worker_address": "0x" + "11" * 20,
        "units": 1,
        "price_wei_per_unit": PRICE,
        "cost_wei": PRICE,
        "duration_s": 0.1,
        "energy_j": 1.0,
        "energy_source": "estimate",
    }


class FakeClient:
    """What the orchestrator would answer; ``refuse_batch`` / ``stale`` script its errors."""

    def __init__(self) -> None:
        self.account = Account.create()
        self.batches: list[BatchCompleteRequest] = []
        self.singles: list[tuple[str, CompleteRequest]] = []
        self.refuse_batch: ProblemError | None = None
        self.stale: set[str] = set()

    async def complete(self, job_id: str, request: CompleteRequest) -> Any:
        from protocol import ResultView

        self.singles.append((job_id, request))
        if job_id in self.stale:
            raise ProblemError(409, "conflict", f"attempt 1 of job {job_id} is stale")
        return ResultView.model_validate(view(job_id, request.signature))

    async def complete_batch(self, request: BatchCompleteRequest) -> list[BatchCompleteItem]:
        self.batches.append(request)
        if self.refuse_batch is not None:
            raise self.refuse_batch
        return [
            BatchCompleteItem(job_id=r.job_id, error=ItemError(status=409, code="c", detail="x"))
            if r.job_id in self.stale
            else BatchCompleteItem(job_id=r.job_id, state=JobState.SUCCEEDED, cost_wei=PRICE)
            for r in request.results
        ]


def run_reports(client: FakeClient, job_ids: list[str]) -> list[Any]:
    async def body() -> list[Any]:
        reporter = ResultReporter(client)  # type: ignore[arg-type]
        tasks = [reporter.report(result(j)) for j in job_ids]
        return await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(body())


def test_results_ready_together_go_in_one_signed_batch_each_answered_alone() -> None:
    client = FakeClient()
    client.stale = {"b"}
    answers = run_reports(client, ["a", "b", "c"])
    assert len(client.batches) == 1 and not client.singles
    (batch,) = client.batches
    hashes = [result_hash(j, 1, result(j).output_sha256, 1, PRICE) for j in "abc"]
    assert recover_result_batch_signer(hashes, batch.signature) == client.account.address
    assert answers[0] == answers[2] == JobState.SUCCEEDED
    assert isinstance(answers[1], ProblemError) and answers[1].status == 409


def test_a_lone_result_goes_alone_with_its_own_signature() -> None:
    client = FakeClient()
    (answer,) = run_reports(client, ["solo"])
    assert not client.batches and [j for j, _ in client.singles] == ["solo"]
    request = client.singles[0][1]
    signer = recover_result_signer("solo", 1, request.output_sha256, 1, PRICE, request.signature)
    assert signer == client.account.address == str(client.account.address)
    assert answer == JobState.SUCCEEDED


@pytest.mark.parametrize("status", [422, 503])
def test_a_batch_refused_whole_is_sent_one_by_one_unless_the_server_is_busy(status: int) -> None:
    client = FakeClient()
    client.refuse_batch = ProblemError(status, "invalid_input", "results[1] cannot be hashed")
    client.stale = {"b"}
    answers = run_reports(client, ["a", "b", "c"])
    if status == 503:  # retryable: every job gets the error and retries (the daemon does)
        assert not client.singles
        assert all(isinstance(a, ProblemError) and a.status == 503 for a in answers)
        return
    assert [j for j, _ in client.singles] == ["a", "b", "c"]
    assert answers[0] == answers[2] == JobState.SUCCEEDED
    assert isinstance(answers[1], ProblemError) and answers[1].status == 409
