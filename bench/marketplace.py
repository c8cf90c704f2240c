"""(a) Marketplace overhead: embedding throughput through the whole marketplace against bare
torch on the same model and machine.

    python -m bench.run --only a [--quick]

Baseline: the built-in all-MiniLM-L6-v2 loaded in this process exactly as the worker loads it
(``ModelRegistry``, fp32, CPU, the worker's torch thread count), fed batches of
``BASELINE_BATCH`` sentences back to back: sentences per second, measured before and after the
marketplace run and averaged.

Marketplace: one orchestrator process (SQLite, no verification, no payments) and one worker
process (``--job-type inference``, ``--max-concurrency CONCURRENCY``), both real, over
loopback HTTP. A client in this process keeps ``CONCURRENCY`` one-sentence jobs in flight
through the batch paths: it submits the free places' worth in one request
(``AsyncClient.submit_many``: ``POST /v1/jobs/batch``), waits on every job in flight with one
long-poll (``AsyncClient.wait_any``: ``POST /v1/jobs/wait``, answered at the first final job,
with the signed results), and refills. The worker leases many jobs per poll, runs them through
its dynamic batcher and reports each batch's results in one request under one signature.
Figure:
results received per second over the measuring window, after a warm-up. All three processes
share this machine's cores, as they would on one box.

Ratio = marketplace / bare; the goal is >= 0.9.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.cpu_profile import OrchestratorProfile
from bench.processes import Orchestrator, Worker, cores_used, free_port, process_usage
from bench.stats import percentile
from bench.table import Row, ratio

SECTION = "a"
MODEL = "all-MiniLM-L6-v2"
CONCURRENCY = 64
BASELINE_BATCH = 32
LONG_POLL_S = 5.0
"""The longest one wait on the jobs in flight lasts (seconds); it ends at the first result."""
MAX_PRICE_WEI = "1000000000"
GOAL_RATIO = 0.9
JOB_TIMEOUT_S = 120.0
BATCH_SIZE_METRIC = "gpumarket_worker_batch_size"
WORKER_READY_TIMEOUT_S = 180.0
"""The worker registers after importing torch and loading and warming the model."""


@dataclass(frozen=True)
class Sizes:
    """Durations in seconds."""

    bare_s: float
    warm_up_s: float
    window_s: float
    profile_s: float
    """After the measuring window, the load goes on this long under py-spy, for the
    orchestrator's CPU by component (the sampler takes CPU of its own, so never while timed)."""


FULL = Sizes(bare_s=20.0, warm_up_s=10.0, window_s=30.0, profile_s=10.0)
QUICK = Sizes(bare_s=2.0, warm_up_s=2.0, window_s=4.0, profile_s=2.0)

_SUBJECTS = (
    "The new library",
    "A small GPU cluster",
    "Our quarterly report",
    "The city council",
    "This recipe",
    "A volunteer team",
    "The night train",
    "Her latest paper",
)
_PREDICATES = (
    "cuts inference costs for startups across the region",
    "was delayed by a week because of a supply problem",
    "explains why the model drifts after fine-tuning",
    "needs fresh basil, garlic and a good olive oil",
    "will open to the public next spring",
    "measures energy per job on every worker",
    "crossed the border just after midnight",
    "compares cosine similarity across three precisions",
)


def sentences(count: int) -> list[str]:
    """``count`` distinct single sentences of 8-13 words, the same on every run."""
    pairs = itertools.cycle(itertools.product(_SUBJECTS, _PREDICATES))
    return [f"{s} {p} ({i})." for i, (s, p) in zip(range(count), pairs, strict=False)]


# ---- the baseline: bare torch in this process ----------------------------------------------


def bare_sentences_per_s(duration_s: float, batch: int = BASELINE_BATCH) -> float:
    """Sentences per second of the worker's own model object, batches of ``batch`` run back
    to back for about ``duration_s`` seconds after two warm-up batches."""
    from worker.executors.inference import ModelRegistry

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as the worker sets it
    model = ModelRegistry().get(MODEL, "fp32")
    texts = sentences(batch * 8)
    batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    for warm in batches[:2]:
        model.run_batch(warm)
    done = 0
    started = time.perf_counter()
    for texts_batch in itertools.cycle(batches):
        model.run_batch(texts_batch)
        done += len(texts_batch)
        if time.perf_counter() - started >= duration_s:
            break
    return done / (time.perf_counter() - started)


# ---- through the marketplace ----------------------------------------------------------------


class CountingTransport(httpx.AsyncHTTPTransport):
    """The SDK's transport, counting the client's requests by kind (submit, status, result)."""

    def __init__(self, limits: httpx.Limits) -> None:
        super().__init__(limits=limits)
        self.counts: Counter[str] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path in ("/v1/jobs", "/v1/jobs/batch"):
            self.counts["submit"] += 1
        elif path.endswith("/result"):
            self.counts["result"] += 1
        else:
            self.counts["wait"] += 1
        return await super().handle_async_request(request)


@dataclass
class Window:
    """What the measuring window saw. Latencies in seconds (submit -> result in hand), CPU in
    cores per process, requests per completed job by kind, mean items per model call."""

    start: float  # monotonic seconds
    end: float  # the measuring window's end (the load goes on after it, profiled)
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cores: dict[str, float] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    batch_size: float | None = None
    profile: OrchestratorProfile | None = None


async def _submitter(
    client: Any, texts: list[str], stop_at: float, window: Window, concurrency: int
) -> None:
    """Keep ``concurrency`` one-sentence jobs in flight: submit the free places' worth in one
    batch request, wait on all in flight with one long-poll, take the results, refill."""
    lines = itertools.cycle(texts)
    in_flight: dict[str, float] = {}  # job id -> monotonic submit time
    while in_flight or time.monotonic() < stop_at:
        free = concurrency - len(in_flight)
        if free > 0 and time.monotonic() < stop_at:
            specs = [
                {
                    "type": "inference",
                    "model": MODEL,
                    "input": {"texts": [next(lines)]},
                    "max_price_wei_per_unit": MAX_PRICE_WEI,
                }
                for _ in range(free)
            ]
            submitted = time.monotonic()
            for item in await client.submit_many(specs):
                if item["error"] is not None:
                    window.errors.append(str(item["error"]))
                else:
                    in_flight[item["job"]["id"]] = submitted
        answer = await client.wait_any(list(in_flight), wait_s=LONG_POLL_S)
        now = time.monotonic()
        for result in answer["results"]:
            submitted = in_flight.pop(result["job_id"])
            if len(result["output"]["embeddings"]) != 1:
                window.errors.append(f"job {result['job_id']}: expected one embedding")
            elif window.start <= now < window.end:
                window.latencies_s.append(now - submitted)
        for job in answer["jobs"]:  # final without a result
            in_flight.pop(job["id"], None)
            window.errors.append(f"job {job['id']} {job['state']}: {job.get('failure_reason')}")


async def _batch_counts(metrics_url: str) -> tuple[float, float]:
    """(items, model calls) so far, from the worker's batch-size histogram."""
    async with httpx.AsyncClient(timeout=10.0) as http:
        text = (await http.get(metrics_url)).raise_for_status().text
    found = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for suffix in found:
            if line.startswith(f"{BATCH_SIZE_METRIC}_{suffix}{{"):
                found[suffix] += float(line.rsplit(" ", 1)[1])
    return found["sum"], found["count"]


async def _watch(
    window: Window,
    sizes: Sizes,
    pids: dict[str, int],
    metrics_url: str,
    transport: CountingTransport,
) -> None:
    """Read CPU, requests and batches at the window's start and end, into ``window``; then
    sample the orchestrator's stacks while the load goes on (``sizes.profile_s``)."""
    await asyncio.sleep(max(0.0, window.start - time.monotonic()))
    before = {name: process_usage(pid) for name, pid in pids.items()}
    items_before, calls_before = await _batch_counts(metrics_url)
    requests_before = Counter(transport.counts)
    await asyncio.sleep(sizes.window_s)
    window.cores = {
        name: cores_used(before[name], process_usage(pid)) for name, pid in pids.items()
    }
    window.requests = transport.counts - requests_before
    items, calls = await _batch_counts(metrics_url)
    if calls > calls_before:
        window.batch_size = (items - items_before) / (calls - calls_before)
    with OrchestratorProfile(pids["orchestrator"]) as profile:
        await asyncio.sleep(sizes.profile_s)
    window.profile = profile


async def _drive(
    url: str, api_key: str, sizes: Sizes, concurrency: int, pids: dict[str, int], metrics_url: str
) -> Window:
    from gpumarket import AsyncClient

    texts = sentences(1024)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    transport = CountingTransport(limits)
    async with AsyncClient(url, api_key, transport=transport) as client:
        start = time.monotonic() + sizes.warm_up_s
        window = Window(start=start, end=start + sizes.window_s)
        stop_at = window.end + sizes.profile_s
        await asyncio.gather(
            _watch(window, sizes, pids, metrics_url, transport),
            _submitter(client, texts, stop_at, window, concurrency),
        )
    return window


def marketplace_window(
    sizes: Sizes, concurrency: int = CONCURRENCY, workdir: Path | None = None
) -> Window:
    """Run ``concurrency`` submitters against a real orchestrator and worker; what the
    measuring window saw."""
    with tempfile.TemporaryDirectory(prefix="gpumarket-bench-a-", dir=workdir) as tmp:
        root = Path(tmp)
        metrics_port = free_port()
        flags = (*worker_flags(concurrency), "--metrics-port", str(metrics_port))
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        with Orchestrator(root / "orchestrator") as orchestrator:
            with Worker(root / "worker", orchestrator.url, *flags) as worker:
                orchestrator.wait_for_workers(1, WORKER_READY_TIMEOUT_S)
                api_key = orchestrator.new_client_key()
                pids = {
                    "orchestrator": orchestrator.pid,
                    "worker": worker.pid,
                    "client": os.getpid(),
                }
                return asyncio.run(
                    _drive(orchestrator.url, api_key, sizes, concurrency, pids, metrics_url)
                )


def worker_flags(concurrency: int) -> tuple[str, ...]:
    return ("--job-type", "inference", "--max-concurrency", str(concurrency))


def _describe(window: Window, window_s: float) -> str:
    jobs = len(window.latencies_s)
    parts = [f"{jobs} jobs in {window_s:g} s, {CONCURRENCY} in flight"]
    if jobs:
        p50 = percentile(window.latencies_s, 50) * 1000
        p99 = percentile(window.latencies_s, 99) * 1000
        parts.append(f"submit -> result p50 {p50:.0f} ms, p99 {p99:.0f} ms")
        per_job = ", ".join(f"{n / jobs:.2f} {kind}" for kind, n in sorted(window.requests.items()))
        parts.append(f"client requests per job (batch submit, batch wait): {per_job}")
        cpu = ", ".join(
            f"{name} {cores * window_s / jobs * 1000:.1f}" for name, cores in window.cores.items()
        )
        parts.append(f"CPU ms per job: {cpu}")
        if window.profile is not None and "orchestrator" in window.cores:
            cpu_s = window.cores["orchestrator"] * window_s
            parts.append(window.profile.describe(cpu_s, jobs))
    if window.batch_size is not None:
        parts.append(f"worker's mean batch {window.batch_size:.1f} items")
    if window.errors:
        parts.append(f"{len(window.errors)} errors, first: {window.errors[0]}")
    return "; ".join(parts)


def measure(quick: bool) -> list[Row]:
    sizes = QUICK if quick else FULL
    # Bare torch before and after: on a shared machine the load from other work drifts, and
    # the mean of the two is fairer to both than either alone.
    bare_before = bare_sentences_per_s(sizes.bare_s / 2)
    window = marketplace_window(sizes)
    bare_after = bare_sentences_per_s(sizes.bare_s / 2)
    bare = (bare_before + bare_after) / 2
    market = len(window.latencies_s) / sizes.window_s
    share = ratio(market, bare)
    note = (
        f"{_describe(window, sizes.window_s)}; bare torch {bare_before:.0f} sentences/s "
        f"before and {bare_after:.0f} after (baseline: the mean)"
    )
    return [
        Row(
            section=SECTION,
            name=f"marketplace overhead: 1-sentence embedding jobs/s at concurrency {CONCURRENCY}",
            value=market,
            unit="jobs/s",
            baseline_name=f"bare torch, batch {BASELINE_BATCH}, sentences/s",
            baseline_value=bare,
            ratio=share,
            goal=f"ratio >= {GOAL_RATIO}",
            met=None if share is None else share >= GOAL_RATIO,
            note=note,
        )
    ]
