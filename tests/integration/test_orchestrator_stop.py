"""The real orchestrator process stops promptly on SIGTERM with long-polls open: a worker
waiting for work gets an empty answer and the process exits, with no request cancelled by
uvicorn's graceful-shutdown timeout; and a client waiting on a job across the restart gets its
result once the orchestrator is back."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from eth_account import Account

from gpumarket import Client
from orchestrator.server import GRACEFUL_SHUTDOWN_S
from protocol import HardwareDescriptor, Offer
from tests.integration.conftest import OrchestratorProcess
from tests.support import EMBED_MODEL, completion
from worker.client import OrchestratorClient

pytestmark = pytest.mark.slow

OFFERS = [
    Offer.model_validate(
        {"job_type": "inference", "model": EMBED_MODEL, "price_wei_per_unit": "10"}
    )
]


def test_sigterm_answers_an_idle_worker_poll_and_exits(
    orchestrator_process: OrchestratorProcess,
) -> None:
    proc = orchestrator_process

    async def scenario() -> list[object]:
        worker = OrchestratorClient(proc.url, Account.create())
        await worker.register(HardwareDescriptor(), OFFERS, max_concurrency=1)
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


def test_a_client_waiting_across_a_restart_gets_its_result(
    orchestrator_process: OrchestratorProcess,
) -> None:
    proc = orchestrator_process
    with Client(proc.url, proc.new_client_key()) as client:
        job = client.submit(
            {
                "type": "inference",
                "model": EMBED_MODEL,
                "input": {"texts": ["waiting across a restart"]},
                "max_price_wei_per_unit": "10",
            }
        )
        outcome: list[dict[str, Any] | BaseException] = []

        def wait() -> None:
            try:
                outcome.append(client.wait(job["id"], timeout_s=60))
            except BaseException as exc:  # the test reads it below
                outcome.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.5)  # its long-poll is open
        proc.stop()  # SIGTERM: the poll is answered, then the connection is refused
        time.sleep(1.0)  # the client finds no orchestrator for a while
        proc.start()  # the same port and database

        async def work() -> None:
            worker = OrchestratorClient(proc.url, Account.create())
            await worker.register(HardwareDescriptor(), OFFERS, max_concurrency=1)
            [leased] = await worker.lease(max_jobs=1, wait_s=10)
            output = {"embeddings": [[0.5, 0.25]]}
            price = leased.price_wei_per_unit
            done = completion(worker, leased.job_id, 1, output, 1, price_wei_per_unit=price)
            await worker.complete(leased.job_id, done)
            await worker.aclose()

        asyncio.run(work())
        waiter.join(timeout=60)
    [result] = outcome
    assert isinstance(result, dict), result
    assert result["job_id"] == job["id"] and result["state"] == "succeeded"
