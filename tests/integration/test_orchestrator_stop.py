"""The real orchestrator process stops promptly on SIGTERM with long-polls open: a worker
waiting for work gets an empty answer and the process exits, with no request cancelled by
uvicorn's graceful-shutdown timeout."""

from __future__ import annotations

import asyncio

import pytest
from eth_account import Account

from orchestrator.server import GRACEFUL_SHUTDOWN_S
from protocol import HardwareDescriptor, Offer
from tests.integration.conftest import OrchestratorProcess
from tests.support import EMBED_MODEL
from worker.client import OrchestratorClient

pytestmark = pytest.mark.slow


def test_sigterm_answers_an_idle_worker_poll_and_exits(
    orchestrator_process: OrchestratorProcess,
) -> None:
    proc = orchestrator_process
    offers = [
        Offer.model_validate(
            {"job_type": "inference", "model": EMBED_MODEL, "price_wei_per_unit": "10"}
        )
    ]

    async def scenario() -> list[object]:
        worker = OrchestratorClient(proc.url, Account.create())
        await worker.register(HardwareDescriptor(), offers, max_concurrency=1)
        poll = asyncio.create_task(worker.lease(max_jobs=1, wait_s=30))
        with proc.operator() as operator:
            while operator.get("/v1/workers").json()[0]["free_slots"] != 1:
                await asyncio.sleep(0.05)
        assert proc.proc is not None
        proc.proc.terminate()
        async with asyncio.timeout(GRACEFUL_SHUTDOWN_S):  # answered before uvicorn's cut-off
            leased = await poll
        await worker.aclose()
        return list(leased)

    assert asyncio.run(scenario()) == []
    assert proc.proc is not None
    proc.proc.wait(timeout=10)
    log = proc.log_path.read_text()
    assert "graceful shutdown exceeded" not in log, log
    assert "Traceback" not in log, log
