"""(g) Replicas: orchestrator replicas on one PostgreSQL database, measured with scripted
workers so that the orchestrators' own cost is what is measured.

    python -m bench.run --only g [--quick]

For 1, 2 and 3 replicas (one database made for each run, one shared blob folder): scripted
workers (``bench.scripted_worker``: real HTTP and signatures, no model) hold their lease
long-polls on the *last* replica, while a client submits one-sentence embedding jobs on the
*first* one, open-loop at ``RATE_PER_S``. With two or more replicas every job therefore
crosses replicas: committed on one, woken (LISTEN/NOTIFY) and leased on another.

Figures:
- cross-replica dispatch p99: submit -> running as the orchestrators recorded it (created on
  the first replica, started on the last; one machine, one clock), in ms. Baseline: the same
  figure with one replica (no crossing).
- orchestrator CPU per job: the CPU seconds all replica processes spent during the timed run,
  divided by the jobs, in ms. Baseline: one replica. The aim is a flat figure: work spread over
  more processes, not more work per job, so throughput can grow with cores.

On this 2-core machine the replicas, PostgreSQL, the workers and the client share the cores:
the run shows the design's cost, not a speed-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.control_plane import fresh_pg_database, pg_unreachable_reason
from bench.dispatch_latency import _submit_at_rate, _wait_started
from bench.processes import Orchestrator, process_usage
from bench.scripted_worker import ScriptedWorker
from bench.stats import percentile
from bench.table import Row, ratio

SECTION = "g"
RATE_PER_S = 20.0
WORKERS = 4
SLOTS_PER_WORKER = 16
WARM_UP_JOBS = 20
REPLICA_COUNTS = (1, 2, 3)
GOAL_P99_MS = 25.0
HTTP_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


@dataclass(frozen=True)
class Sizes:
    duration_s: float


FULL = Sizes(duration_s=20.0)
QUICK = Sizes(duration_s=2.0)


@dataclass(frozen=True)
class ReplicaRun:
    replicas: int
    jobs: int
    submit_to_running_ms: list[float]
    cpu_ms_per_job: float


@contextlib.contextmanager
def _replicas(count: int, db_url: str, root: Path) -> Iterator[list[Orchestrator]]:
    token = "bench-" + secrets.token_urlsafe(24)
    env = {"GPUMARKET_DB_URL": db_url, "GPUMARKET_BLOB_DIR": str(root / "blobs")}
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(Orchestrator(root / f"replica{i}", operator_token=token, **env))
            for i in range(count)
        ]


async def _measure(replicas: list[Orchestrator], sizes: Sizes) -> tuple[list[float], float, int]:
    first, last = replicas[0], replicas[-1]
    api_key = first.new_client_key()
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with (
        httpx.AsyncClient(base_url=last.url, timeout=HTTP_TIMEOUT, limits=limits) as worker_http,
        httpx.AsyncClient(
            base_url=first.url,
            timeout=HTTP_TIMEOUT,
            limits=limits,
            headers={"Authorization": f"Bearer {api_key}"},
        ) as client,
    ):
        workers = [ScriptedWorker(worker_http, SLOTS_PER_WORKER) for _ in range(WORKERS)]
        for worker in workers:
            await worker.register()
        stop = asyncio.Event()
        running = [asyncio.create_task(worker.run(stop)) for worker in workers]
        try:
            sent: dict[str, float] = {}
            warm = await _submit_at_rate(client, WARM_UP_JOBS, RATE_PER_S, sent)
            await _wait_started(client, warm)
            before = [process_usage(r.pid).cpu_s for r in replicas]
            count = max(1, round(sizes.duration_s * RATE_PER_S))
            timed = await _submit_at_rate(client, count, RATE_PER_S, sent)
            to_running = await _wait_started(client, timed)
            after = [process_usage(r.pid).cpu_s for r in replicas]
        finally:
            stop.set()
            await asyncio.gather(*running, return_exceptions=True)
    cpu_s = sum(after) - sum(before)
    return to_running, cpu_s * 1000 / count, count


def replica_runs(sizes: Sizes) -> list[ReplicaRun]:
    runs = []
    for count in REPLICA_COUNTS:
        with (
            tempfile.TemporaryDirectory(prefix="gpumarket-bench-g-") as tmp,
            fresh_pg_database() as db_url,
            _replicas(count, db_url, Path(tmp)) as replicas,
        ):
            to_running, cpu_ms, jobs = asyncio.run(_measure(replicas, sizes))
        runs.append(ReplicaRun(count, jobs, to_running, cpu_ms))
    return runs


def measure(quick: bool) -> list[Row]:
    reason = pg_unreachable_reason()
    if reason is not None:
        return [
            Row(
                section=SECTION,
                name="replicas on PostgreSQL",
                value=None,
                unit="",
                note=f"PostgreSQL unreachable: {reason}",
            )
        ]
    runs = replica_runs(QUICK if quick else FULL)
    single = runs[0]
    rows = []
    for run in runs:
        note = (
            f"{run.jobs} jobs at {RATE_PER_S:g}/s submitted on replica 1, "
            f"{WORKERS} workers x {SLOTS_PER_WORKER} slots polling replica {run.replicas}"
        )
        p99 = percentile(run.submit_to_running_ms, 99)
        one_p99 = percentile(single.submit_to_running_ms, 99)
        rows.append(
            Row(
                section=SECTION,
                name=f"dispatch p99, {run.replicas} replica(s), submit -> running",
                value=p99,
                unit="ms",
                baseline_name="the same with 1 replica, ms",
                baseline_value=one_p99,
                ratio=ratio(p99, one_p99),
                goal=f"<= {GOAL_P99_MS:g} ms",
                met=p99 <= GOAL_P99_MS,
                note=note + f"; p50 {percentile(run.submit_to_running_ms, 50):.1f} ms",
            )
        )
        rows.append(
            Row(
                section=SECTION,
                name=f"orchestrator CPU per job, {run.replicas} replica(s)",
                value=run.cpu_ms_per_job,
                unit="ms",
                baseline_name="the same with 1 replica, ms",
                baseline_value=single.cpu_ms_per_job,
                ratio=ratio(run.cpu_ms_per_job, single.cpu_ms_per_job),
                goal="flat as replicas grow",
                met=None,
                note="all replica processes together; " + note,
            )
        )
    return rows
