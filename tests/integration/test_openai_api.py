"""The OpenAI-compatible API with the official ``openai`` client (sync and async, streaming and
not), against a real orchestrator process and a real worker process generating with the
built-in SmolLM2 (and embedding with MiniLM), over loopback HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gpumarket import Client
from tests.integration.conftest import OrchestratorProcess, WorkerProcess, wait_for_workers
from tests.support import EMBED_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LLM = "SmolLM2-135M-Instruct"
TOKEN_PRICE = 100_000_000  # wei per token: the worker's default
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    root = tmp_path_factory.mktemp("openai")
    orchestrator = OrchestratorProcess(root / "orchestrator")
    orchestrator.start()
    worker = WorkerProcess(
        root / "worker",
        orchestrator.url,
        "--job-type",
        "generate",
        "--job-type",
        "inference",
        "--max-concurrency",
        "4",
    )
    worker.start()
    try:
        wait_for_workers(orchestrator, 1, timeout_s=120)
        yield orchestrator.url, orchestrator.new_client_key()
    finally:
        worker.stop()
        orchestrator.stop()


@pytest.fixture
def client(market: tuple[str, str]) -> Iterator[openai.OpenAI]:
    url, key = market
    with openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as c:
        yield c


def test_chat_completion_answers_with_usage_cost_and_worker(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=LLM, messages=CAPITAL, max_tokens=20, temperature=0
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 20
    extras = (reply.model_extra or {})["gpumarket"]
    # Charged exactly the tokens used, at the worker's price per token.
    assert int(extras["cost_wei"]) == usage.total_tokens * TOKEN_PRICE
    assert extras["worker_address"].startswith("0x") and extras["energy_j"] >= 0
    assert extras["energy_j_per_output_token"] == extras["energy_j"] / usage.completion_tokens


def test_streamed_chat_arrives_in_pieces_ending_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=LLM,
        messages=[{"role": "user", "content": "Write three sentences about graphics cards."}],
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    usage = None
    finish = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens == 48 and finish == "length"
    assert len(pieces) >= 3  # streamed while produced, not one block at the end
    plain = client.chat.completions.create(
        model=LLM,
        messages=[{"role": "user", "content": "Write three sentences about graphics cards."}],
        max_tokens=48,
        temperature=0,
    )
    assert "".join(pieces) == plain.choices[0].message.content  # greedy: same


def test_async_completions_streaming_and_not(market: tuple[str, str]) -> None:
    url, key = market

    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as c:
            whole = await c.completions.create(
                model=LLM, prompt="The capital of France is", max_tokens=6, temperature=0
            )
            parts = []
            async for chunk in await c.completions.create(
                model=LLM,
                prompt="The capital of France is",
                max_tokens=6,
                temperature=0,
                stream=True,
            ):
                parts.append(chunk.choices[0].text if chunk.choices else "")
            return whole.choices[0].text, "".join(parts)

    whole, streamed = asyncio.run(run())
    assert "Paris" in whole
    assert streamed == whole


def test_embeddings_and_models(client: openai.OpenAI) -> None:
    one = client.embeddings.create(model=EMBED_MODEL, input="a cat sat on the mat")
    two = client.embeddings.create(
        model=EMBED_MODEL, input=["a cat sat on the mat", "GPUs"], encoding_format="float"
    )
    assert len(one.data) == 1 and len(two.data) == 2 and len(two.data[0].embedding) == 384
    # base64 (the client's default) and float carry the same vector.
    assert one.data[0].embedding == pytest.approx(two.data[0].embedding, abs=1e-6)
    models = {m.id: m for m in client.models.list().data}
    assert {LLM, EMBED_MODEL} <= set(models)
    offered = (models[LLM].model_extra or {})["gpumarket"]
    assert offered["context_tokens"] == 8192
    assert offered["units_per_s"] > 1  # the worker's own tokens/s, measured at warm-up


@pytest.mark.parametrize(
    ("request_body", "status", "code"),
    [
        ({"model": "no-such-model", "messages": CAPITAL}, 404, "model_not_found"),
        ({"model": LLM, "messages": []}, 400, "invalid_request"),
        ({"model": LLM, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_role"),
        ({"model": LLM, "messages": [{"role": "user", "content": " "}]}, 400, "invalid_request"),
        ({"model": LLM, "messages": CAPITAL, "max_tokens": 0}, 400, "invalid_request"),
        ({"model": LLM, "messages": CAPITAL, "max_tokens": 10**9}, 400, "invalid_request"),
        (
            {"model": LLM, "messages": CAPITAL, "max_price_wei_per_token": "1"},
            503,
            "no_worker_under_max_price",
        ),
    ],
)
def test_bad_requests_get_openai_shaped_errors(
    client: openai.OpenAI, request_body: dict, status: int, code: str
) -> None:
    body = dict(request_body)
    extra = {k: body.pop(k) for k in ("max_price_wei_per_token",) if k in body}
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**body, extra_body=extra or None)
    assert caught.value.status_code == status
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == code and error["message"]


def test_a_prompt_longer_than_the_context_is_refused_as_the_clients_fault(
    client: openai.OpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=LLM, prompt="word " * 9000, max_tokens=4)
    assert "context" in str(caught.value.body)


def test_raw_http_errors_are_openai_shaped(market: tuple[str, str]) -> None:
    url, key = market
    bad_key = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": LLM, "messages": CAPITAL},
        headers={"Authorization": "Bearer nope"},
    )
    assert bad_key.status_code == 401 and bad_key.json()["error"]["type"]
    not_utf8 = httpx.post(
        f"{url}/v1/chat/completions",
        content=b'{"model": "\xff"}',
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    assert not_utf8.status_code == 400 and not_utf8.json()["error"]["code"] == "invalid_encoding"


def test_a_client_leaving_mid_stream_cancels_its_job_and_pays_nothing(
    market: tuple[str, str],
) -> None:
    url, key = market
    body = {
        "model": LLM,
        "messages": [{"role": "user", "content": "Tell me a long story about a GPU."}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        job_id = r.headers["X-Gpumarket-Job-Id"]
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # one real piece of text, then hang up
    with Client(url, key) as sdk:
        deadline = time.monotonic() + 30
        while (job := sdk.get(job_id))["state"] != "cancelled":
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["cost_wei"] in (None, "0")


def test_a_client_that_times_out_and_retries_pays_for_nothing_it_abandoned(
    market: tuple[str, str],
) -> None:
    """The official client gives up on a slow answer after its timeout and sends the request
    again (its default retries): each abandoned job is cancelled when the client hangs up, so
    a retried request is never charged twice, nor for an answer no one received."""
    url, key = market
    with Client(url, key) as sdk:
        before = {job["id"] for job in sdk.list(limit=200)}
    with openai.OpenAI(base_url=f"{url}/v1", api_key=key, timeout=1.0, max_retries=1) as c:
        with pytest.raises(openai.APITimeoutError):
            c.chat.completions.create(
                model=LLM,
                messages=[{"role": "user", "content": "Tell me a long story about a GPU."}],
                max_tokens=400,
                temperature=0,
            )
    with Client(url, key) as sdk:
        tried = [job for job in sdk.list(limit=200) if job["id"] not in before]
        assert len(tried) == 2, tried  # the request and its retry
        deadline = time.monotonic() + 30
        while any(job["state"] != "cancelled" for job in tried):
            assert time.monotonic() < deadline, tried
            time.sleep(0.2)
            tried = [sdk.get(job["id"]) for job in tried]
        assert [job["cost_wei"] in (None, "0") for job in tried] == [True, True]


def test_sdk_generate_and_stream(market: tuple[str, str]) -> None:
    url, key = market
    with Client(url, key) as sdk:
        result = sdk.generate(
            LLM, messages=CAPITAL, max_tokens=20, max_price_wei_per_unit=TOKEN_PRICE
        )
        assert "Paris" in result["output"]["text"]
        usage = result["output"]["usage"]
        assert result["units"] == usage["prompt_tokens"] + usage["completion_tokens"]
        job = sdk.submit(
            {
                "type": "generate",
                "model": LLM,
                "generation": {"prompt": "Graphics cards are", "max_tokens": 24},
                "max_price_wei_per_unit": str(TOKEN_PRICE),
            }
        )
        pieces = list(sdk.stream(job["id"]))
        assert len(pieces) >= 2
        assert "".join(pieces) == sdk.result(job["id"])["output"]["text"]


def test_the_cli_streams_a_generation(market: tuple[str, str], tmp_path: Path) -> None:
    import subprocess
    import sys

    url, key = market
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpumarket.cli",
            "job",
            "submit",
            "--orchestrator",
            url,
            "--api-key",
            key,
            "--model",
            LLM,
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "6",
            "--max-price",
            str(TOKEN_PRICE),
            "--stream",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout.splitlines()[0] or "Paris" in done.stdout
    assert "cost wei" in done.stdout
