"""The market's figures for ``/metrics``, read from the store at scrape time.

Everything comes from the tables, never from process memory, so every replica reports the same
figures and a restart loses none. Each scrape runs a handful of aggregate queries over ``jobs``
(one per figure family; the latency histograms are one ``SUM(CASE ...)`` query each), so its
cost grows with the table; with a retention job that deletes old jobs, the "total" figures
would fall back and Prometheus would read that as a counter reset.

Wei sums are exact Python ints: SQL ``SUM`` on PostgreSQL (NUMERIC), row by row in Python on
SQLite, which keeps wei as text and whose ``SUM`` would go through floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from orchestrator.services.workers import DEREGISTERED
from orchestrator.store import Store
from orchestrator.store.models import Job, LedgerEntry, Redemption, Worker
from protocol import Fault, JobState, JobType

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
"""Upper bounds (seconds) of the latency histograms' buckets; ``+Inf`` is added on export."""


@dataclass(frozen=True)
class LatencyHistogram:
    """Durations in seconds: ``cumulative[i]`` of the ``count`` are <= ``LATENCY_BUCKETS_S[i]``."""

    count: int = 0
    sum_s: float = 0.0
    cumulative: tuple[int, ...] = (0,) * len(LATENCY_BUCKETS_S)


@dataclass(frozen=True)
class MarketSnapshot:
    """One consistent-enough read of the market (each figure is its own query)."""

    jobs: dict[tuple[str, str], int]
    """Jobs per (state, type), every pair present (0 when none)."""
    workers_registered: int
    workers_online: int
    wei_owed: int
    """Sum of ``ledger_entries.amount_wei``: what payers owe workers for paid jobs."""
    wei_redeemed: int
    """Sum of confirmed ``redemptions.paid_wei``: what workers received on chain."""
    wei_fees: int
    """Sum of confirmed ``redemptions.fee_wei``: the orchestrator's fee taken at redemption."""
    cost_wei_by_type: dict[str, int]
    """Sum of ``jobs.cost_wei`` of succeeded jobs (units x price), with or without payments."""
    energy_j_by_type: dict[str, float]
    """Joules the workers reported for their results."""
    job_latency: dict[str, LatencyHistogram] = field(default_factory=dict)
    """Succeeded jobs, submission (``created_at``) to result (``finished_at``), per type."""
    dispatch_latency: dict[str, LatencyHistogram] = field(default_factory=dict)
    """Started jobs, submission (``created_at``) to first start (``started_at``), per type."""
    failed: dict[tuple[str, str], int] = field(default_factory=dict)
    """Failed jobs per (type, fault): whose fault, "input" | "worker" | "none" (every pair)."""
    tokens: int = 0
    """Tokens (prompt + completion) of succeeded generate jobs: the units they billed."""
    first_token_latency: dict[str, LatencyHistogram] = field(default_factory=dict)
    """Generate jobs, submission (``created_at``) to first streamed text (``first_token_at``)."""

    @property
    def queue_depth(self) -> int:
        return sum(n for (state, _), n in self.jobs.items() if state == JobState.QUEUED.value)


def read_market_snapshot(store: Store, now: float, online_window_s: float) -> MarketSnapshot:
    """The figures at ``now`` (unix seconds). A worker counts as online when it is not
    deregistered and was seen within ``online_window_s`` seconds (as ``/v1/stats`` has it)."""
    with store.read() as s:
        present = Worker.status != DEREGISTERED
        recent = Worker.last_seen_at >= now - online_window_s
        registered = s.scalar(select(func.count()).select_from(Worker).where(present))
        online = s.scalar(select(func.count()).select_from(Worker).where(present, recent))
        succeeded = Job.state == JobState.SUCCEEDED.value
        confirmed = Redemption.confirmed.is_(True)  # as budgets and /v1/settlement count them
        return MarketSnapshot(
            jobs=_jobs_by_state_and_type(s),
            workers_registered=registered or 0,
            workers_online=online or 0,
            wei_owed=_sum_wei(s, store, LedgerEntry.amount_wei).get("", 0),
            wei_redeemed=_sum_wei(s, store, Redemption.paid_wei, where=[confirmed]).get("", 0),
            wei_fees=_sum_wei(s, store, Redemption.fee_wei, where=[confirmed]).get("", 0),
            cost_wei_by_type=_zero_filled(
                _sum_wei(s, store, Job.cost_wei, by=Job.type, where=[succeeded]), 0
            ),
            energy_j_by_type=_zero_filled(_energy_by_type(s), 0.0),
            job_latency=_latency(s, Job.created_at, Job.finished_at, [succeeded]),
            dispatch_latency=_latency(s, Job.created_at, Job.started_at, []),
            failed=_failed_by_fault(s),
            tokens=int(
                s.scalar(
                    select(func.sum(Job.units)).where(succeeded, Job.type == JobType.GENERATE.value)
                )
                or 0
            ),
            first_token_latency={
                JobType.GENERATE.value: _latency(s, Job.created_at, Job.first_token_at, [])[
                    JobType.GENERATE.value
                ]
            },
        )


def _jobs_by_state_and_type(s: Session) -> dict[tuple[str, str], int]:
    counts = {(state.value, kind.value): 0 for state in JobState for kind in JobType}
    rows = s.execute(select(Job.state, Job.type, func.count()).group_by(Job.state, Job.type))
    for state, kind, n in rows:
        counts[(state, kind)] = n
    return counts


def _failed_by_fault(s: Session) -> dict[tuple[str, str], int]:
    counts = {(kind.value, fault.value): 0 for kind in JobType for fault in Fault}
    rows = s.execute(
        select(Job.type, Job.fault, func.count())
        .where(Job.state == JobState.FAILED.value, Job.fault.is_not(None))
        .group_by(Job.type, Job.fault)
    )
    for kind, fault, n in rows:
        counts[(kind, str(fault))] = n
    return counts


def _zero_filled(by_type: dict[str, Any], zero: Any) -> dict[str, Any]:
    return {kind.value: zero for kind in JobType} | by_type


def _sum_wei(
    s: Session,
    store: Store,
    column: InstrumentedAttribute[Any],
    *,
    by: InstrumentedAttribute[str] | None = None,
    where: Sequence[ColumnElement[bool]] = (),
) -> dict[str, int]:
    """Exact sum of a wei column per value of ``by``, or under the key ``""`` without one."""
    keys = [by] if by is not None else []
    filters = [column.is_not(None), *where]
    if store.is_postgres:  # NUMERIC sums exactly in the database
        query = select(*keys, func.sum(column)).where(*filters).group_by(*keys)
        return {(row[0] if by is not None else ""): int(row[-1] or 0) for row in s.execute(query)}
    totals: dict[str, int] = {}
    for row in s.execute(select(*keys, column).where(*filters)):
        key = row[0] if by is not None else ""
        totals[key] = totals.get(key, 0) + int(row[-1])
    return totals


def _energy_by_type(s: Session) -> dict[str, float]:
    rows = s.execute(
        select(Job.type, func.sum(Job.energy_j)).where(Job.energy_j.is_not(None)).group_by(Job.type)
    )
    return {kind: float(total or 0.0) for kind, total in rows}


def _latency(
    s: Session,
    start: InstrumentedAttribute[float],
    end: InstrumentedAttribute[float | None],
    where: Sequence[ColumnElement[bool]],
) -> dict[str, LatencyHistogram]:
    """Histograms of ``end - start`` per job type, in one aggregate query over ``jobs``."""
    duration = end - start
    # A start back-dated by the worker's own duration can fall a hair before creation.
    clamped = case((duration < 0, 0.0), else_=duration)
    buckets = [func.sum(case((duration <= bound, 1), else_=0)) for bound in LATENCY_BUCKETS_S]
    query = (
        select(Job.type, func.count(), func.sum(clamped), *buckets)
        .where(end.is_not(None), *where)
        .group_by(Job.type)
    )
    histograms = {kind.value: LatencyHistogram() for kind in JobType}
    for kind, count, total, *cumulative in s.execute(query):
        histograms[kind] = LatencyHistogram(
            count=int(count),
            sum_s=float(total or 0.0),
            cumulative=tuple(int(n or 0) for n in cumulative),
        )
    return histograms
