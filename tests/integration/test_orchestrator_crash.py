"""The real orchestrator process survives SIGKILL mid-flow: every job is still there and
finishes after a restart on the same database."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from eth_account import Account

from gpumarket import Client
from protocol import HardwareDescriptor, LeasedJob, Offer
from protocol.signing import output_sha256
from tests.integration.conftest import OrchestratorProcess
from tests.support import EMBED_MODEL
from worker.client import OrchestratorClient

pytestmark = pytest.mark.slow

JOBS = 12


def _fake_embeddings(job: LeasedJob) -> dict[str, object]:
    texts = (job.input or {}).get("texts", [])
    return {"embeddings": [[float(len(t)), 1.0] for t in texts]}


async def _complete(worker: OrchestratorClient, job: LeasedJob) -> None:
    from protocol import CompleteRequest
    from protocol.signing import sign_result

    output = _fake_embeddings(job)
    digest = output_sha256(output)
    await worker.complete(
        job.job_id,
        CompleteRequest(
            attempt=job.attempt,
            output=output,
            output_sha256=digest,
            signature=sign_result(
                worker.account.key,
                job.job_id,
                job.attempt,
                digest,
                len(output["embeddings"]),  # type: ignore[arg-type]
                job.price_wei_per_unit,
            ),
            duration_s=0.01,
            energy_j=0.1,
            energy_source="estimate",
            units=len(output["embeddings"]),  # type: ignore[arg-type]
        ),
    )


def _submit(client: Client, n: int) -> list[str]:
    ids = []
    for i in range(n):
        job = client.submit(
            {
                "type": "inference",
                "model": EMBED_MODEL,
                "input": {"texts": [f"sentence number {i}", "x" * (i + 1)]},
                "max_price_wei_per_unit": "1000",
            },
            idempotency_key=f"job-{i}",
        )
        ids.append(job["id"])
    return ids


def test_sigkill_mid_flow_loses_no_job(orchestrator_process: OrchestratorProcess) -> None:
    proc = orchestrator_process
    with Client(proc.url, proc.new_client_key()) as client:
        _run_crash_scenario(proc, client)


def _run_crash_scenario(proc: OrchestratorProcess, client: Client) -> None:
    ids = _submit(client, JOBS)
    offers = [
        Offer.model_validate(
            {"job_type": "inference", "model": EMBED_MODEL, "price_wei_per_unit": "10"}
        )
    ]

    async def scenario() -> None:
        worker = OrchestratorClient(proc.url, Account.create())
        await worker.register(HardwareDescriptor(cpu_cores=2, ram_mb=1024), offers, 4)
        leased = await worker.lease(max_jobs=4, wait_s=2)
        assert len(leased) == 4
        for job in leased[:2]:
            await worker.start(job.job_id, job.attempt)
            await _complete(worker, job)
        await worker.start(leased[2].job_id, leased[2].attempt)
        in_flight = leased[2:]  # both running (the lease marks them) at the moment of the kill

        proc.kill()
        proc.start()
        states = {job_id: client.get(job_id)["state"] for job_id in ids}
        assert sum(s == "succeeded" for s in states.values()) == 2
        assert [states[j.job_id] for j in in_flight] == ["running", "running"]
        assert _submit(client, JOBS) == ids  # idempotency keys survived the crash

        # The worker's session token is in the database, so it carries on without re-registering.
        async with asyncio.timeout(60):
            for job in in_flight:
                await _complete(worker, job)
            done = 0
            while done < JOBS - 4:
                for job in await worker.lease(max_jobs=4, wait_s=2):
                    await worker.start(job.job_id, job.attempt)
                    await _complete(worker, job)
                    done += 1
        await worker.aclose()

    asyncio.run(scenario())
    for job_id in ids:
        result = client.wait(job_id, timeout_s=10)
        assert result["cost_wei"] == str(10 * result["units"])
        assert result["attempt"] == 1  # nothing ran twice: no lease expired across the restart
    assert len(list(client.list())) == JOBS


def test_sigkill_then_lease_expiry_requeues(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A worker that vanished with the orchestrator loses its lease; another finishes the job."""
    proc = OrchestratorProcess(
        tmp_path / "o",
        GPUMARKET_LEASE_TTL_S="2",
        GPUMARKET_HEARTBEAT_INTERVAL_S="1",
        GPUMARKET_SWEEP_INTERVAL_S="0.2",
    )
    proc.start()
    try:
        client = Client(proc.url, proc.new_client_key())
        [job_id] = _submit(client, 1)
        request.addfinalizer(client.close)
        offers = [
            Offer.model_validate(
                {"job_type": "inference", "model": EMBED_MODEL, "price_wei_per_unit": "10"}
            )
        ]

        async def lost_worker() -> None:
            worker = OrchestratorClient(proc.url, Account.create())
            await worker.register(HardwareDescriptor(), offers, max_concurrency=1)
            [job] = await worker.lease(max_jobs=1, wait_s=2)
            await worker.start(job.job_id, job.attempt)
            await worker.aclose()

        asyncio.run(lost_worker())
        proc.kill()
        proc.start()

        async def rescuer() -> int:
            worker = OrchestratorClient(proc.url, Account.create())
            await worker.register(HardwareDescriptor(), offers, max_concurrency=1)
            async with asyncio.timeout(30):
                while True:
                    jobs = await worker.lease(max_jobs=1, wait_s=2)
                    if jobs:
                        await _complete(worker, jobs[0])
                        await worker.aclose()
                        return jobs[0].attempt

        assert asyncio.run(rescuer()) == 2
        job = client.get(job_id)
        assert job["state"] == "succeeded"
        assert [e["state"] for e in job["history"]] == [
            "queued",
            "assigned",
            "running",
            "queued",
            "assigned",
            "running",
            "succeeded",
        ]
    finally:
        proc.stop()
