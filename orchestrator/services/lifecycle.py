"""The job state machine: the only place that changes ``Job.state``.

    QUEUED -> ASSIGNED -> RUNNING -> SUCCEEDED
       ^         |           +-> VERIFYING -> SUCCEEDED   (sampled: re-run elsewhere first)
       +---------+-----------+   lease expired / retryable failure (attempt + 1)
    any non-final state but VERIFYING -> FAILED | CANCELLED | EXPIRED

A VERIFYING job's work is done: it is neither cancelled nor expired, only resolved by its
checks (services/verification.py).

Every change appends a ``JobEvent`` in the same transaction. The events of a transaction are
written together: ``record_event`` notes each one in the session, and the store writes what
is noted in one multi-row INSERT after each flush (``store.engine.write_pending_events``),
so any read in the transaction (which flushes first) sees them, and a rollback drops them
with the rest. One INSERT per event, through the ORM, had cost more than the state change
it recorded.
"""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy.orm import Session

from orchestrator.exceptions import Conflict
from orchestrator.store.engine import PENDING_EVENTS
from orchestrator.store.models import Job
from protocol import FINAL_STATES, Fault, JobState
from protocol.jobs import LEASED_STATES

CHANGED_JOBS = "changed_jobs"  # key in Session.info: {job id: its new state} of changed jobs

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset(
        {JobState.ASSIGNED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED}
    ),
    JobState.ASSIGNED: frozenset(
        {
            JobState.RUNNING,
            JobState.SUCCEEDED,
            JobState.VERIFYING,
            JobState.QUEUED,
            JobState.FAILED,
            JobState.CANCELLED,
            JobState.EXPIRED,
        }
    ),
    JobState.RUNNING: frozenset(
        {
            JobState.SUCCEEDED,
            JobState.VERIFYING,
            JobState.QUEUED,
            JobState.FAILED,
            JobState.CANCELLED,
            JobState.EXPIRED,
        }
    ),
    JobState.VERIFYING: frozenset({JobState.SUCCEEDED}),
}


def record_transition(
    session: Session,
    job_id: str,
    attempt: int,
    current: JobState,
    to: JobState,
    now: float,
    worker_id: str | None,
    detail: str | None = None,
) -> None:
    """The bookkeeping of ``transition`` for a job changed by a set-based UPDATE (which set
    its state and ``updated_at`` from ``current``, checked by its WHERE clause or under the
    row's lock): the event, and the note that wakes those waiting on it. Of the final states
    only SUCCEEDED, whose UPDATE also set ``finished_at``."""
    final = to in FINAL_STATES and to is not JobState.SUCCEEDED
    if to not in ALLOWED.get(current, frozenset()) or final:
        raise Conflict(f"job {job_id} is {current}; it cannot become {to} here")
    session.info.setdefault(CHANGED_JOBS, {})[job_id] = to.value
    record_event(
        session,
        job_id=job_id,
        attempt=attempt,
        state=to,
        worker_id=worker_id,
        detail=detail,
        at=now,
    )


def transition(
    session: Session,
    job: Job,
    to: JobState,
    now: float,
    *,
    detail: str | None = None,
    worker_id: str | None = None,
) -> None:
    current = JobState(job.state)
    if to not in ALLOWED.get(current, frozenset()):
        raise Conflict(f"job {job.id} is {current}; it cannot become {to}")
    job.state = to
    job.updated_at = now
    # Read after the commit (see Store.on_commit) to wake clients waiting on this job.
    session.info.setdefault(CHANGED_JOBS, {})[job.id] = to.value
    if to in FINAL_STATES:
        job.finished_at = now
        if to is not JobState.SUCCEEDED:
            job.failure_reason = detail
    record_event(
        session,
        job_id=job.id,
        attempt=job.attempt,
        state=to,
        worker_id=worker_id if worker_id is not None else job.worker_id,
        detail=detail,
        at=now,
    )


class NewEvent(NamedTuple):
    """An event recorded in this transaction and not yet written (no id): what a view of the
    job built in the same transaction shows of it."""

    job_id: str
    attempt: int
    state: str
    worker_id: str | None
    detail: str | None
    at: float


def record_event(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    state: JobState,
    at: float,
    worker_id: str | None = None,
    detail: str | None = None,
) -> NewEvent:
    """Append an event to the job's history, written with the transaction's next flush."""
    event = NewEvent(job_id, attempt, state.value, worker_id, detail, at)
    session.info.setdefault(PENDING_EVENTS, []).append(event._asdict())
    return event


def requeue_or_fail(
    session: Session, job: Job, now: float, reason: str, fault: Fault = Fault.WORKER
) -> None:
    """Take a job back from its worker: a new attempt if any are left, else FAILED with
    ``fault`` (whose fault the last attempt's end was)."""
    lost_by = job.worker_id
    if lost_by and lost_by not in job.excluded_workers:
        job.excluded_workers = [*job.excluded_workers, lost_by]
    if job.attempt >= job.max_attempts:
        job.fault = fault
        transition(
            session,
            job,
            JobState.FAILED,
            now,
            detail=f"{reason}; all {job.max_attempts} attempts used",
        )
        return
    transition(session, job, JobState.QUEUED, now, detail=reason)
    job.attempt += 1
    job.worker_id = None
    job.price_wei_per_unit = None
    job.prompt_price_wei_per_unit = None
    job.lease_expires_at = None
    job.delivered = False


def is_leased(job: Job) -> bool:
    return JobState(job.state) in LEASED_STATES
