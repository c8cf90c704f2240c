"""The operator dashboard's figures in one call: workers, recent jobs, money and energy.

Wei columns are text on SQLite (see ``WeiAmount``), where SUM would go through floats, so
every wei total here is summed in Python ints.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

from sqlalchemy import Row, func, select
from sqlalchemy.orm import Session

from orchestrator.exceptions import InvalidInput
from orchestrator.services.jobs import maybe_ts, ts
from orchestrator.services.settlement import Payments
from orchestrator.services.workers import DEREGISTERED, WorkerService, job_state_counts
from orchestrator.store import Store
from orchestrator.store.models import Job, LedgerEntry, Redemption, Worker
from protocol import HardwareDescriptor, JobState, JobType, WorkerView
from protocol.dashboard import (
    Dashboard,
    DashboardBucket,
    DashboardGeneration,
    DashboardJob,
    DashboardSeries,
    DashboardTotals,
    DashboardWorker,
)

DEFAULT_WINDOW_S = 30 * 60
DEFAULT_BUCKET_S = 60
DEFAULT_RECENT_JOBS = 50
MAX_BUCKETS = 720
SUCCEEDED = JobState.SUCCEEDED.value
FAILED = JobState.FAILED.value
CLIENT_JOB = "job"  # Job.kind of a client's job; "check" is a verification re-run
ESTIMATE = "estimate"  # Job.energy_source when the worker had no power meter
OFFLINE = "offline"  # the status WorkerService shows for a worker not heard from in a lease


def hardware_summary(hw: HardwareDescriptor) -> str:
    """One line, like a spec sheet: the biggest GPU and how many ("2x NVIDIA A100 (80 GiB)"),
    or for a CPU-only worker its CPU ("AMD EPYC 7B13 (16 cores)")."""
    if hw.gpus:
        gpu = max(hw.gpus, key=lambda g: g.vram_mb)
        count = f"{len(hw.gpus)}x " if len(hw.gpus) > 1 else ""
        return f"{count}{gpu.name} ({round(gpu.vram_mb / 1024, 1):g} GiB)"
    return f"{hw.cpu_model} ({hw.cpu_cores} cores)"


def _sum_by(rows: Iterable[Row[str | None, int | None]]) -> dict[str, int]:
    """Wei per key, from (key, amount) rows."""
    totals: dict[str, int] = defaultdict(int)
    for key, amount in rows:
        if key is not None:
            totals[key] += amount or 0
    return totals


class DashboardService:
    def __init__(self, store: Store, payments: Payments, workers: WorkerService) -> None:
        self._store = store
        self._payments = payments
        # Status, online and reputation are the worker service's rules; the dashboard reuses them.
        self._worker_views = workers

    def snapshot(
        self,
        now: float,
        *,
        window_s: int = DEFAULT_WINDOW_S,
        bucket_s: int = DEFAULT_BUCKET_S,
        recent_jobs: int = DEFAULT_RECENT_JOBS,
    ) -> Dashboard:
        """Everything the dashboard shows; series cover the last ``window_s`` seconds in
        buckets of ``bucket_s`` seconds aligned to the epoch (so they do not shift per poll)."""
        buckets = math.ceil(window_s / bucket_s)
        if buckets > MAX_BUCKETS:
            raise InvalidInput(
                f"{window_s}s in buckets of {bucket_s}s makes {buckets} buckets; the most is "
                f"{MAX_BUCKETS}: widen bucket_s or shorten the window"
            )
        end = (math.floor(now / bucket_s) + 1) * bucket_s
        start = end - buckets * bucket_s
        views = self._worker_views.list(now, include_gone=True)
        with self._store.read() as s:
            settled = _sum_by(s.execute(select(LedgerEntry.payee, LedgerEntry.amount_wei)))
            redeemed = _sum_by(
                s.execute(
                    select(Redemption.payee, Redemption.paid_wei).where(
                        Redemption.confirmed.is_(True)  # as /metrics and /v1/settlement count
                    )
                )
            )
            workers = self._workers(s, views, settled, redeemed)
            totals = self._totals(s, workers, settled, redeemed)
            jobs = self._recent_jobs(s, recent_jobs)
            series = self._series(s, start, bucket_s, buckets)
            generation = _generation(s, start)
        return Dashboard(
            generated_at=ts(now),
            payments=self._payments.enabled,
            totals=totals,
            workers=workers,
            jobs=jobs,
            series=series,
            generation=generation,
        )

    def _workers(
        self,
        s: Session,
        views: list[WorkerView],
        settled: dict[str, int],
        redeemed: dict[str, int],
    ) -> list[DashboardWorker]:
        billed = _sum_by(
            s.execute(
                select(Job.worker_id, Job.cost_wei).where(
                    Job.state == SUCCEEDED, Job.worker_id.is_not(None)
                )
            )
        )
        shown = [
            _worker(w, billed.get(w.id, 0), settled.get(w.address, 0), redeemed.get(w.address, 0))
            for w in views
        ]
        # A worker that left stays on the board while it has anything to show for its time.
        return [w for w in shown if w.status != DEREGISTERED or _has_a_record(w)]

    def _totals(
        self,
        s: Session,
        workers: list[DashboardWorker],
        settled: dict[str, int],
        redeemed: dict[str, int],
    ) -> DashboardTotals:
        by_state = job_state_counts(s, kind=CLIENT_JOB)
        succeeded = Job.state == SUCCEEDED
        costs = s.scalars(select(Job.cost_wei).where(succeeded, Job.cost_wei.is_not(None)))
        energy = s.scalar(select(func.coalesce(func.sum(Job.energy_j), 0.0)).where(succeeded))
        estimated = s.scalar(
            select(func.coalesce(func.sum(Job.energy_j), 0.0)).where(
                succeeded, Job.energy_source == ESTIMATE
            )
        )
        entries = s.scalar(select(func.count()).select_from(LedgerEntry)) or 0
        return DashboardTotals(
            workers_registered=sum(1 for w in workers if w.status != DEREGISTERED),
            workers_online=sum(1 for w in workers if w.online),
            jobs_by_state=by_state,
            queue_depth=by_state[JobState.QUEUED.value],
            wei_billed_total=sum(c or 0 for c in costs),
            wei_settled_total=sum(settled.values()),
            wei_redeemed_total=sum(redeemed.values()),
            ledger_entries=entries,
            energy_j_total=float(energy or 0.0),
            energy_j_estimated=float(estimated or 0.0),
        )

    def _recent_jobs(self, s: Session, limit: int) -> list[DashboardJob]:
        rows = s.execute(
            select(Job, Worker.address)
            .outerjoin(Worker, Worker.id == Job.worker_id)
            .order_by(Job.updated_at.desc(), Job.created_at.desc(), Job.id)
            .limit(limit)
        )
        return [_job(job, address) for job, address in rows]

    def _series(self, s: Session, start: float, bucket_s: int, buckets: int) -> DashboardSeries:
        succeeded, failed = [0] * buckets, [0] * buckets
        billed, settled = [0] * buckets, [0] * buckets

        def index(at: float) -> int | None:
            i = math.floor((at - start) / bucket_s)
            return i if 0 <= i < buckets else None

        finished = s.execute(
            select(Job.finished_at, Job.state, Job.cost_wei).where(
                Job.finished_at >= start, Job.state.in_([SUCCEEDED, FAILED])
            )
        )
        for at, state, cost in finished:
            i = index(at) if at is not None else None
            if i is None:
                continue
            if state == SUCCEEDED:
                succeeded[i] += 1
                billed[i] += cost or 0
            else:
                failed[i] += 1
        ledger = s.execute(
            select(LedgerEntry.created_at, LedgerEntry.amount_wei).where(
                LedgerEntry.created_at >= start
            )
        )
        for at, amount in ledger:
            i = index(at)
            if i is not None:
                settled[i] += amount
        return DashboardSeries(
            bucket_s=bucket_s,
            buckets=[
                DashboardBucket(
                    start=ts(start + i * bucket_s),
                    jobs_succeeded=succeeded[i],
                    jobs_failed=failed[i],
                    wei_billed=billed[i],
                    wei_settled=settled[i],
                )
                for i in range(buckets)
            ],
        )


def _generation(s: Session, since: float) -> DashboardGeneration:
    """Tokens, tokens per second and time to first token of client generate jobs since
    ``since`` (unix seconds); see ``DashboardGeneration`` for what each figure counts."""
    generate = (Job.type == JobType.GENERATE.value, Job.kind == CLIENT_JOB)
    finished = s.execute(
        select(Job.units, Job.prompt_units, Job.started_at, Job.finished_at).where(
            *generate, Job.state == SUCCEEDED, Job.finished_at >= since
        )
    )
    jobs = prompt = completion = 0
    running_s = 0.0
    for units, prompt_units, started_at, finished_at in finished:
        jobs += 1
        prompt += prompt_units or 0
        completion += max(0, (units or 0) - (prompt_units or 0))
        if started_at is not None and finished_at is not None:
            running_s += max(0.0, finished_at - started_at)
    first_token_at = s.execute(
        select(Job.created_at, Job.first_token_at).where(*generate, Job.first_token_at >= since)
    )
    # As /metrics: a first text a hair before submission (clocks) is no wait at all.
    first_token_s = sorted(
        max(0.0, first - created) for created, first in first_token_at if first is not None
    )
    return DashboardGeneration(
        since=ts(since),
        jobs=jobs,
        prompt_tokens=prompt,
        completion_tokens=completion,
        completion_tokens_per_s=completion / running_s if running_s > 0 else None,
        first_token_jobs=len(first_token_s),
        first_token_p50_s=_nearest_rank(first_token_s, 0.50),
        first_token_p99_s=_nearest_rank(first_token_s, 0.99),
    )


def _nearest_rank(ordered: list[float], q: float) -> float | None:
    """The ``q`` quantile (0 < q <= 1) of ascending ``ordered`` by nearest rank; None if empty."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _worker(w: WorkerView, billed: int, settled: int, redeemed: int) -> DashboardWorker:
    hw = w.hardware
    biggest = max(hw.gpus, key=lambda g: g.vram_mb, default=None)
    return DashboardWorker(
        id=w.id,
        address=w.address,
        status=w.status,
        online=w.status not in (OFFLINE, DEREGISTERED),
        hardware_summary=hardware_summary(hw),
        gpu_name=biggest.name if biggest else None,
        gpu_count=len(hw.gpus),
        vram_mb=hw.vram_mb,
        cpu_model=hw.cpu_model,
        cpu_cores=hw.cpu_cores,
        running_jobs=w.running_jobs,
        max_concurrency=w.max_concurrency,
        load=w.running_jobs / w.max_concurrency if w.max_concurrency else 0.0,
        reputation=w.reputation,
        jobs_succeeded=w.jobs_succeeded,
        jobs_failed=w.jobs_failed,
        billed_wei=billed,
        settled_wei=settled,
        redeemed_wei=redeemed,
        last_seen_at=w.last_seen_at,
    )


def _has_a_record(w: DashboardWorker) -> bool:
    """Did this worker run anything or earn anything?"""
    return bool(w.jobs_succeeded or w.jobs_failed or w.billed_wei or w.settled_wei)


def _job(job: Job, worker_address: str | None) -> DashboardJob:
    latency = job.finished_at - job.created_at if job.finished_at is not None else None
    return DashboardJob(
        id=job.id,
        type=JobType(job.type),
        model=job.model,
        state=JobState(job.state),
        attempt=job.attempt,
        worker_id=job.worker_id,
        worker_address=worker_address,
        created_at=ts(job.created_at),
        finished_at=maybe_ts(job.finished_at),
        latency_s=latency,
        duration_s=job.duration_s,
        units=job.units,
        cost_wei=job.cost_wei,
        energy_j=job.energy_j,
        energy_source=job.energy_source,
    )
