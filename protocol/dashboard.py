"""The operator dashboard's wire type: one snapshot of workers, recent jobs, totals and
per-bucket series. Money in wei (decimal strings on the wire), energy in joules, time in
seconds, instants in UTC."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from protocol.jobs import JobState, JobType
from protocol.units import Wei


class DashboardWorker(BaseModel):
    """A worker as the operator sees it. ``load`` is running jobs / ``max_concurrency``.

    ``settled_wei`` sums the ledger entries paying this worker; ``redeemed_wei`` what it has
    drawn on chain (after the orchestrator's fee); ``billed_wei`` what its succeeded jobs cost,
    which is the figure to read on an orchestrator without on-chain payments.
    """

    id: str
    address: str
    status: str
    online: bool
    hardware_summary: str
    gpu_name: str | None
    gpu_count: int
    vram_mb: int
    cpu_model: str
    cpu_cores: int
    running_jobs: int
    max_concurrency: int
    load: float
    reputation: float
    jobs_succeeded: int
    jobs_failed: int
    billed_wei: Wei
    settled_wei: Wei
    redeemed_wei: Wei
    last_seen_at: datetime


class DashboardJob(BaseModel):
    """A recent job. ``latency_s`` runs from submission to the final state; ``duration_s`` is
    the worker's own measure of the run."""

    id: str
    type: JobType
    model: str
    state: JobState
    attempt: int
    worker_id: str | None
    worker_address: str | None
    created_at: datetime
    finished_at: datetime | None
    latency_s: float | None
    duration_s: float | None
    units: int | None
    cost_wei: Wei | None
    energy_j: float | None
    energy_source: str | None  # nvml | rapl | estimate


class DashboardTotals(BaseModel):
    """Whole-market figures (all time, deregistered workers included in the money). Jobs
    are the clients' own: verification re-runs (checks) are not counted."""

    workers_registered: int
    workers_online: int
    jobs_by_state: dict[str, int]
    queue_depth: int
    wei_billed_total: Wei
    wei_settled_total: Wei
    wei_redeemed_total: Wei
    ledger_entries: int
    energy_j_total: float
    # The part of energy_j_total workers estimated (no power meter readable), joules.
    energy_j_estimated: float = 0.0


class DashboardBucket(BaseModel):
    """One fixed bucket ``[start, start + bucket_s)``: jobs that reached a final state in it
    (by ``finished_at``) and wei written to the ledger in it."""

    start: datetime
    jobs_succeeded: int
    jobs_failed: int
    wei_billed: Wei
    wei_settled: Wei


class DashboardSeries(BaseModel):
    """Buckets aligned to multiples of ``bucket_s`` since the epoch, oldest first; the last one
    holds now and is still filling."""

    bucket_s: int
    buckets: list[DashboardBucket]


class DashboardGeneration(BaseModel):
    """Generate jobs (the clients' own) over the series' window, from ``since`` to now.

    Tokens are those of generate jobs that succeeded in the window (by ``finished_at``): what
    they billed, prompt and completion apart. ``completion_tokens_per_s`` is their completion
    tokens over the seconds they ran (lease to result, summed over the jobs): the rate one
    stream sees, not the market's. Time to first token runs from submission (``created_at``)
    to the job's first streamed text, for jobs whose first text came in the window, nearest
    rank percentiles. A figure with nothing to show is null (never NaN): ``jobs`` and
    ``first_token_jobs`` say how many jobs each rests on.
    """

    since: datetime
    jobs: int
    prompt_tokens: int
    completion_tokens: int
    completion_tokens_per_s: float | None
    first_token_jobs: int
    first_token_p50_s: float | None
    first_token_p99_s: float | None


class Dashboard(BaseModel):
    generated_at: datetime
    payments: bool
    totals: DashboardTotals
    workers: list[DashboardWorker]
    jobs: list[DashboardJob]
    series: DashboardSeries
    generation: DashboardGeneration
