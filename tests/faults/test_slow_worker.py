"""Trial: a slow worker's lease expires, another worker finishes the job, and the slow worker's
late completion is refused.

The slow worker is the cheaper one, so cost-preferring jobs go to it first; its jobs take three
lease TTLs and its heartbeats are lost on the way (paced_worker's lossy link), so its lease runs
out mid-job. The job is queued again as the next attempt and the fast worker completes it. When
the slow worker finally reports, the orchestrator answers 409 and changes nothing: the client
sees the fast worker's result, and only the fast worker is paid. The test then sends the slow
worker's stale completion itself once more, and must get 409 again.
"""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from protocol import CompleteRequest, HardwareDescriptor, Offer
from protocol.signing import output_sha256, sign_result
from tests.faults.checks import check_exactly_once
from tests.faults.conftest import TrialReport, repeat_count
from tests.faults.market import (
    INFERENCE_PRICE_WEI,
    LEASE_TTL_S,
    Market,
    PacedWorker,
    inference_spec,
    until,
)
from tests.faults.paced_worker import EMBED_MODEL, embedding
from worker.client import OrchestratorClient, OrchestratorError

pytestmark = [pytest.mark.faults, pytest.mark.slow]

SLOW_JOB_S = 3 * LEASE_TTL_S
FAST_JOB_S = 0.2


def _late_completion_refused(worker: PacedWorker, job_id: str, attempt: int) -> str:
    """The slow worker's line saying its completion of ``job_id`` got a 409."""
    for line in worker.log().splitlines():
        if f"job {job_id}: orchestrator refused (409" in line and f"attempt {attempt})" in line:
            return line
    return ""


def _waiting_for_work(market: Market, worker: PacedWorker) -> bool:
    """The worker holds no job and has a lease poll open: a job submitted now can go to it."""
    assert market.orchestrator is not None
    with market.orchestrator.operator() as op:
        views = op.get("/v1/workers").json()
    [view] = [v for v in views if v["address"] == worker.address]
    return bool(view["running_jobs"] == 0 and view["free_slots"] > 0)


def _stale_completion(url: str, key: str, job: dict[str, Any], attempt: int) -> int:
    """Send the slow worker's signed result for ``attempt`` again; returns the HTTP status."""
    texts = job["texts"]
    output = {"embeddings": [embedding(t) for t in texts]}
    digest = output_sha256(output)

    async def send() -> int:
        client = OrchestratorClient(url, Account.from_key(key))
        offer = Offer.model_validate(
            {"job_type": "inference", "model": EMBED_MODEL, "price_wei_per_unit": "1"}
        )
        await client.register(HardwareDescriptor(), [offer], max_concurrency=1)
        request = CompleteRequest(
            attempt=attempt,
            output=output,
            output_sha256=digest,
            # Stale: refused (409) before the signature or the price is looked at.
            signature=sign_result(client.account.key, job["id"], attempt, digest, len(texts), 1),
            duration_s=SLOW_JOB_S,
            energy_j=1.0,
            energy_source="estimate",
            units=len(texts),
        )
        try:
            await client.complete(job["id"], request)
        except OrchestratorError as exc:
            return exc.status
        finally:
            await client.aclose()
        return 200

    return asyncio.run(send())


@pytest.mark.timeout(900)
def test_slow_worker_lease_expires(tmp_path: Path, trial_report: TrialReport) -> None:
    rounds = repeat_count("SLOW_WORKER_ROUNDS", 3)
    with Market(tmp_path) as market:
        assert market.orchestrator is not None
        slow = market.add_worker(
            "slow",
            job_s=SLOW_JOB_S,
            inference_price_wei=INFERENCE_PRICE_WEI // 2,
            max_concurrency=1,
            lose_heartbeats=True,
        )
        fast = market.add_worker("fast", job_s=FAST_JOB_S)
        market.wait_for_workers()
        late_refused = stale_refused = tries = 0
        while late_refused < rounds:
            tries += 1
            assert tries <= 3 * rounds, "the slow worker was hardly ever matched"
            until(lambda: _waiting_for_work(market, slow), "the slow worker to ask for work")
            spec = inference_spec(f"slow-{tries}", preference="cost")
            job_id = market.submit(f"slow-{tries}", spec)
            job = until(partial(market.job_in, job_id, "running"), "the job to start")
            if job["worker_address"] != slow.address:
                continue  # matching picked the fast worker this time: no lease to lose
            slow_attempt = job["attempt"]
            done = until(
                partial(market.job_in, job_id, "succeeded"), "another worker to finish the job"
            )
            assert done["attempt"] > slow_attempt and done["worker_address"] == fast.address
            before = market.api.result(job_id)
            until(
                partial(_late_completion_refused, slow, job_id, slow_attempt),
                "the slow worker's late completion to be refused",
                SLOW_JOB_S + 30,
            )
            late_refused += 1
            stale = {"id": job_id, "texts": spec["input"]["texts"]}
            key = (slow.root / "worker.key").read_text().strip()
            assert _stale_completion(market.orchestrator.url, key, stale, slow_attempt) == 409
            stale_refused += 1
            assert market.api.result(job_id) == before  # nothing changed
        counts = check_exactly_once(market)
        assert counts["jobs_succeeded"] == counts["jobs"]
        trial_report.record(
            leases_expired=late_refused,
            late_completions_refused_409=late_refused + stale_refused,
            **counts,
        )
