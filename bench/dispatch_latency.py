"""(c) Dispatch latency: how long a job waits between submit and running, at a fixed moderate
rate with idle workers waiting.

    python -m bench.run --only c [--quick]

One orchestrator process (SQLite, no verification, no payments) and ``WORKERS`` scripted
workers in this process (``bench.scripted_worker``: real HTTP, real signatures, no model),
each holding a lease long-poll open with ``SLOTS_PER_WORKER`` free slots and finishing every
job at once. A client submits one-sentence embedding jobs open-loop at ``RATE_PER_S`` (each
on its own schedule, not waiting for the previous one) for the run's duration.

Figure: submit -> running per job, as the orchestrator recorded it: ``started_at`` minus
``created_at`` from ``GET /v1/jobs/{id}``, both stamped by the orchestrator's clock (created
when the submit request is handled; started when the lease hands it to the waiting long-poll,
which marks it running: matching, the wake-up and the lease transaction, with no ``start``
round trip since the start was folded into the lease). p50 and p99 in milliseconds.
The note adds what the client side saw: from sending the submit to the worker holding the
lease, on this process's monotonic clock.

Baseline (context, not a goal): the round trip of ``GET /healthz`` (no database) measured
sequentially just before, p50 and p99: the floor any dispatch over HTTP pays.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from bench.processes import Orchestrator
from bench.scripted_worker import ScriptedWorker
from bench.stats import percentile
from bench.table import Row, ratio

SECTION = "c"
RATE_PER_S = 20.0
WORKERS = 4
SLOTS_PER_WORKER = 16
WARM_UP_JOBS = 20
GOAL_P99_MS = 25.0
MODEL = "all-MiniLM-L6-v2"
SETTLE_TIMEOUT_S = 30.0
"""Longest wait after the last submit for every job to have been started."""
HTTP_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


@dataclass(frozen=True)
class Sizes:
    duration_s: float
    healthz_samples: int


FULL = Sizes(duration_s=30.0, healthz_samples=500)
QUICK = Sizes(duration_s=2.0, healthz_samples=50)


@dataclass(frozen=True)
class Latencies:
    """Milliseconds, one entry per job (or per health check)."""

    submit_to_running_ms: list[float]
    submit_to_lease_ms: list[float]
    healthz_ms: list[float]


def _job_spec(i: int) -> dict[str, object]:
    return {
        "type": "inference",
        "model": MODEL,
        "input": {"texts": [f"Dispatch latency probe sentence number {i}."]},
        "max_price_wei_per_unit": "1000000000",
    }


def _iso_s(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


async def _healthz_ms(http: httpx.AsyncClient, samples: int) -> list[float]:
    times = []
    for _ in range(samples):
        began = time.perf_counter()
        (await http.get("/healthz")).raise_for_status()
        times.append((time.perf_counter() - began) * 1000)
    return times


async def _submit_at_rate(
    client: httpx.AsyncClient, count: int, rate_per_s: float, sent: dict[str, float]
) -> list[str]:
    """Submit ``count`` jobs, the i-th at i / rate after the start; returns their ids.
    ``sent`` gets each job's send time (monotonic seconds)."""
    started = time.monotonic()

    async def one(i: int) -> str:
        await asyncio.sleep(max(0.0, started + i / rate_per_s - time.monotonic()))
        began = time.monotonic()
        response = await client.post("/v1/jobs", json=_job_spec(i))
        response.raise_for_status()
        job_id = str(response.json()["id"])
        sent[job_id] = began
        return job_id

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def _wait_started(client: httpx.AsyncClient, job_ids: list[str]) -> list[float]:
    """submit -> running per job (ms, orchestrator clock), once every job has started."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    latencies: dict[str, float] = {}
    while len(latencies) < len(job_ids):
        for job_id in job_ids:
            if job_id in latencies:
                continue
            job = (await client.get(f"/v1/jobs/{job_id}")).raise_for_status().json()
            if job["started_at"] is not None:
                latencies[job_id] = (_iso_s(job["started_at"]) - _iso_s(job["created_at"])) * 1000
        if len(latencies) < len(job_ids):
            if time.monotonic() > deadline:
                missing = len(job_ids) - len(latencies)
                raise RuntimeError(f"{missing} jobs not started {SETTLE_TIMEOUT_S:g} s after")
            await asyncio.sleep(0.2)
    return [latencies[job_id] for job_id in job_ids]


async def _measure(url: str, api_key: str, sizes: Sizes, rate_per_s: float) -> Latencies:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with (
        httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT, limits=limits) as worker_http,
        httpx.AsyncClient(
            base_url=url,
            timeout=HTTP_TIMEOUT,
            limits=limits,
            headers={"Authorization": f"Bearer {api_key}"},
        ) as client,
    ):
        healthz = await _healthz_ms(client, sizes.healthz_samples)
        leased: dict[str, float] = {}

        def on_lease(job_id: str) -> None:
            leased[job_id] = time.monotonic()

        workers = [ScriptedWorker(worker_http, SLOTS_PER_WORKER, on_lease) for _ in range(WORKERS)]
        for worker in workers:
            await worker.register()
        stop = asyncio.Event()
        running = [asyncio.create_task(worker.run(stop)) for worker in workers]
        try:
            sent: dict[str, float] = {}
            warm = await _submit_at_rate(client, WARM_UP_JOBS, rate_per_s, sent)
            await _wait_started(client, warm)
            count = max(1, round(sizes.duration_s * rate_per_s))
            timed = await _submit_at_rate(client, count, rate_per_s, sent)
            to_running = await _wait_started(client, timed)
        finally:
            stop.set()
            await asyncio.gather(*running, return_exceptions=True)
    to_lease = [(leased[j] - sent[j]) * 1000 for j in timed if j in leased]
    return Latencies(to_running, to_lease, healthz)


def dispatch_latencies(
    sizes: Sizes, rate_per_s: float = RATE_PER_S, workdir: Path | None = None
) -> Latencies:
    with tempfile.TemporaryDirectory(prefix="gpumarket-bench-c-", dir=workdir) as tmp:
        with Orchestrator(Path(tmp) / "orchestrator") as orchestrator:
            api_key = orchestrator.new_client_key()
            return asyncio.run(_measure(orchestrator.url, api_key, sizes, rate_per_s))


def measure(quick: bool) -> list[Row]:
    sizes = QUICK if quick else FULL
    found = dispatch_latencies(sizes)
    jobs = len(found.submit_to_running_ms)
    rows = []
    for q in (50, 99):
        value = percentile(found.submit_to_running_ms, q)
        base = percentile(found.healthz_ms, q)
        client = percentile(found.submit_to_lease_ms, q) if found.submit_to_lease_ms else None
        note = f"{jobs} jobs at {RATE_PER_S:g}/s, {WORKERS} idle workers x {SLOTS_PER_WORKER} slots"
        if client is not None:
            note += f"; client-side submit -> lease received p{q} {client:.1f} ms"
        goal_met = value <= GOAL_P99_MS if q == 99 else None
        rows.append(
            Row(
                section=SECTION,
                name=f"dispatch latency p{q}, submit -> running",
                value=value,
                unit="ms",
                baseline_name=f"GET /healthz round trip p{q}, ms",
                baseline_value=base,
                ratio=ratio(value, base),
                goal=f"<= {GOAL_P99_MS:g} ms" if q == 99 else "",
                met=goal_met,
                note=note,
            )
        )
    return rows
