"""``gpumarket job submit --wait`` as a real process against a real orchestrator process, with a
scripted worker (worker.client over HTTP) that leases and completes the job."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account

from protocol import CompleteRequest, HardwareDescriptor, Offer
from protocol.signing import output_sha256, sign_result
from tests.integration.conftest import OrchestratorProcess
from tests.support import EMBED_MODEL
from worker.client import OrchestratorClient

pytestmark = pytest.mark.slow

CLI_TIMEOUT_S = 120.0
LEASE_DEADLINE_S = 60.0
EMBEDDINGS = {"embeddings": [[0.25, 0.5, 0.75]] * 2}


async def _work_one_job(url: str) -> None:
    worker = OrchestratorClient(url, Account.create())
    try:
        offers = [
            Offer.model_validate(
                {"job_type": "inference", "model": EMBED_MODEL, "price_wei_per_unit": "7"}
            )
        ]
        await worker.register(HardwareDescriptor(cpu_cores=2, ram_mb=1024), offers, 1)
        deadline = time.monotonic() + LEASE_DEADLINE_S
        while time.monotonic() < deadline:
            leased = await worker.lease(max_jobs=1, wait_s=2)
            if leased:
                break
        else:
            raise AssertionError(f"no job leased within {LEASE_DEADLINE_S} s")
        [job] = leased
        await worker.start(job.job_id, job.attempt)
        digest = output_sha256(EMBEDDINGS)
        request = CompleteRequest(
            attempt=job.attempt,
            output=EMBEDDINGS,
            output_sha256=digest,
            signature=sign_result(
                worker.account.key, job.job_id, job.attempt, digest, 2, job.price_wei_per_unit
            ),
            duration_s=0.25,
            energy_j=1.5,
            energy_source="estimate",
            units=2,
        )
        await worker.complete(job.job_id, request)
    finally:
        await worker.aclose()


def _gpumarket(
    proc: OrchestratorProcess, *args: str, api_key: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPUMARKET_URL": proc.url, "GPUMARKET_API_KEY": api_key, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "gpumarket.cli", "job", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


@pytest.fixture
def orchestrator(tmp_path: Path) -> Iterator[OrchestratorProcess]:
    """An orchestrator whose results are final at once (no spot-check re-runs here)."""
    proc = OrchestratorProcess(
        tmp_path / "orchestrator", GPUMARKET_VERIFY_RATE="0", GPUMARKET_VERIFY_RATE_NEW="0"
    )
    proc.start()
    yield proc
    proc.stop()


def test_submit_wait_prints_the_result(orchestrator: OrchestratorProcess) -> None:
    failures: list[BaseException] = []

    def work() -> None:
        try:
            asyncio.run(_work_one_job(orchestrator.url))
        except BaseException as exc:  # reported by the test below, not lost in the thread
            failures.append(exc)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    key = orchestrator.new_client_key()
    args = ["submit", "--model", EMBED_MODEL, "--text", "one", "--text", "two"]
    done = _gpumarket(orchestrator, *args, "--max-price", "1000", "--wait", api_key=key)
    worker.join(timeout=LEASE_DEADLINE_S)
    assert not failures, failures
    assert done.returncode == 0, done.stderr
    assert "2 x 3" in done.stdout  # embeddings: count x dim
    assert "14" in done.stdout  # cost: 2 texts at the worker's 7 wei
    assert "succeeded" in done.stderr

    listed = _gpumarket(orchestrator, "list", api_key=key)
    assert listed.returncode == 0 and "succeeded" in listed.stdout


def test_a_bad_key_exits_1_with_one_line(orchestrator: OrchestratorProcess) -> None:
    refused = _gpumarket(orchestrator, "list", api_key="gmk_wrong")
    assert refused.returncode == 1
    [line] = refused.stderr.strip().splitlines()
    assert "unknown API key" in line and "create-client" in line
    assert refused.stdout == ""
