"""Token streams across replicas: two `gpumarket orchestrator serve` processes on one PostgreSQL
database; a client streams a chat from replica A while a scripted worker sends the job's text
to replica B. The text reaches the client through A while the job still runs (relayed over
LISTEN/NOTIFY), in order and once, and the stream ends with the job's signed result."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from protocol import HardwareDescriptor, LeasedJob, Offer
from protocol.generation import StreamChunk
from tests.integration.conftest import OrchestratorProcess
from tests.support import completion
from worker.client import OrchestratorClient

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

LLM = "SmolLM2-135M-Instruct"
PRICE = 10**9  # wei per token
# A chunk far past one NOTIFY payload (8000 bytes): it crosses in parts, whole and in order.
LONG = "".join(f"{i % 10}é\n" for i in range(3000))
PIECES = ["Hello", ", wor", "ld", LONG]
PROMPT_TOKENS = 3
STEP_TIMEOUT_S = 30.0


@pytest.fixture
def replicas(tmp_path: Path, pg_database: str) -> Iterator[tuple[OrchestratorProcess, ...]]:
    procs = tuple(
        OrchestratorProcess(
            tmp_path / name, pg_database, GPUMARKET_BLOB_DIR=str(tmp_path / "shared-blobs")
        )
        for name in ("a", "b")
    )
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def _output(text: str, completion_tokens: int) -> dict[str, Any]:
    return {
        "text": text,
        "token_ids": list(range(completion_tokens)),
        "finish_reason": "length",
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion_tokens},
    }


async def _complete(worker: OrchestratorClient, job: LeasedJob, text: str, tokens: int) -> None:
    request = completion(
        worker,
        job.job_id,
        job.attempt,
        _output(text, tokens),
        PROMPT_TOKENS + tokens,
        price_wei_per_unit=job.price_wei_per_unit,
        prompt_price_wei_per_unit=job.prompt_price_wei_per_unit or 0,
    )
    await worker.complete(job.job_id, request)


async def _read_stream(resp: httpx.Response, texts: list[str], seen: asyncio.Event) -> None:
    """Collect the chat stream's text deltas; ``seen`` once they add up to all of PIECES."""
    async for line in resp.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        body = json.loads(line[len("data: ") :])
        for choice in body.get("choices", []):
            content = choice.get("delta", {}).get("content")
            if content:
                texts.append(content)
        if "".join(texts) == "".join(PIECES):
            seen.set()


def test_a_chat_read_on_one_replica_gets_the_text_its_worker_sends_to_another(
    replicas: tuple[OrchestratorProcess, OrchestratorProcess],
) -> None:
    a, b = replicas
    key = a.new_client_key()
    final = "".join(PIECES) + "!"

    async def run() -> list[str]:
        worker = OrchestratorClient(b.url, Account.from_key(Account.create().key))
        hardware = HardwareDescriptor.model_validate(
            {"cpu_model": "test cpu", "cpu_cores": 2, "ram_mb": 4096}
        )
        offer = Offer.model_validate(
            {
                "job_type": "generate",
                "model": LLM,
                "price_wei_per_unit": str(PRICE),
                "context_tokens": 8192,
            }
        )
        texts: list[str] = []
        seen = asyncio.Event()
        try:
            await worker.register(hardware, [offer], max_concurrency=1)
            async with httpx.AsyncClient(base_url=a.url, timeout=STEP_TIMEOUT_S) as http:
                chat = {
                    "model": LLM,
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 64,
                    "stream": True,
                }
                headers = {"Authorization": f"Bearer {key}"}
                request = http.build_request(
                    "POST", "/v1/chat/completions", json=chat, headers=headers
                )
                opened = asyncio.create_task(http.send(request, stream=True))
                async with asyncio.timeout(STEP_TIMEOUT_S):
                    jobs: list[LeasedJob] = []
                    while not jobs:
                        jobs = await worker.lease(max_jobs=1, wait_s=1)
                [job] = jobs
                for seq, piece in enumerate(PIECES):
                    await worker.stream(
                        job.job_id, StreamChunk(attempt=1, seq=seq, text=piece, tokens=1)
                    )
                # resent: taken once on B, so relayed once to A
                await worker.stream(
                    job.job_id, StreamChunk(attempt=1, seq=0, text="Hello", tokens=1)
                )
                resp = await asyncio.wait_for(opened, STEP_TIMEOUT_S)
                assert resp.status_code == 200, await resp.aread()
                reading = asyncio.create_task(_read_stream(resp, texts, seen))
                # every piece reaches A's reader while the job is still running on B
                await asyncio.wait_for(seen.wait(), STEP_TIMEOUT_S)
                view = (await http.get(f"/v1/jobs/{job.job_id}", headers=headers)).json()
                assert view["state"] == "running"
                await _complete(worker, job, final, tokens=len(PIECES) + 1)
                await asyncio.wait_for(reading, STEP_TIMEOUT_S)
                await resp.aclose()
        finally:
            await worker.aclose()
        return texts

    texts = asyncio.run(run())
    # in order, once, and the stream's end brings what the signed result adds
    assert "".join(texts) == final
    assert texts[-1] == "!"
