"""Dispatch and leases: assigning queued jobs, handing them out, and taking them back.

Dispatch is pull: a worker holds a lease long-poll open with its free slots, and only such
workers are matched. Each assignment is a lease with a TTL that heartbeats extend; the sweeper
re-queues jobs whose lease expired (attempt + 1) and expires jobs past their deadline.

Execution is at-least-once (a slow worker may finish after losing its lease); effects are
exactly-once: completion is keyed by (job id, attempt) and a stale attempt changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Row, func, literal, select, tuple_, update
from sqlalchemy.orm import Session

from orchestrator.config import Settings
from orchestrator.exceptions import BadSignature, Conflict, Forbidden, InvalidInput, NotFound
from orchestrator.services import billing, reputation
from orchestrator.services.auth import Principal
from orchestrator.services.billing import JobRow
from orchestrator.services.blame import Blame
from orchestrator.services.jobs import result_view, ts
from orchestrator.services.lifecycle import (
    is_leased,
    record_transition,
    requeue_or_fail,
    transition,
)
from orchestrator.services.matching import (
    Candidate,
    JobNeeds,
    choose,
    co2_grams,
    exclusion_reason,
    offer_key,
)
from orchestrator.services.result_batches import BatchCompletion, needs_preparing, units_of
from orchestrator.services.settlement import Payments
from orchestrator.services.verification import CHECK, VerificationService
from orchestrator.services.workers import REGISTERED, leased_counts
from orchestrator.store import Store
from orchestrator.store.engine import CanonicalJSON, retry_transient
from orchestrator.store.models import BlobGrant, Job, JobEvent, Worker
from protocol import (
    CompleteRequest,
    FailRequest,
    Fault,
    HardwareDescriptor,
    JobState,
    JobType,
    LeasedJob,
    Offer,
    Precision,
    Preference,
    Rendition,
    ResultView,
)
from protocol.signing import canonical_json, output_sha256, recover_result_signer
from protocol.units import MAX_WEI
from protocol.workers import ResultFields

log = logging.getLogger("gpumarket.orchestrator.leases")
PERF_EWMA_ALPHA = 0.3
OFFERED_MODELS_TTL_S = 1.0  # how stale explain_unplaced's view of live workers' models may be
# A poll advertises its worker's free slots for this long at a time; the replica holding the
# long-poll renews it at a look (a claim, made a second at most after the last one ended) once
# the next look might come too late (api/routes/workers.py). A replica that dies stops
# renewing, so its workers stop being offered work within this time, not at the poll's end.
POLL_TTL_S = 5.0


LEASE_COLUMNS = (
    Job.id,
    Job.attempt,
    Job.type,
    Job.model,
    Job.precision,
    Job.spec,
    Job.input_blob,
    Job.price_wei_per_unit,
    Job.prompt_price_wei_per_unit,
    Job.deadline_at,
)
"""What a lease hands the worker of each job (``_leased_job``)."""
DISPATCH_COLUMNS = (
    Job.id,
    Job.type,
    Job.model,
    Job.precision,
    Job.max_price_wei_per_unit,
    Job.max_prompt_price_wei_per_unit,
    Job.max_units,
    billing.MAX_TOKENS,  # a generation's (billing.token_bounds_of); not the whole spec
    Job.preference,
    Job.min_vram_mb,
    Job.units,
    Job.deadline_at,
    Job.excluded_workers,
    Job.kind,
    Job.input_claims,
    Job.updated_at,
    Job.attempt,
    Job.waiting_reason,
    Job.created_at,
)
"""What a dispatch round reads of each queued job (``_needs``): not its output or history,
whose JSON it would decode for nothing."""


QUEUED_READ_PER_SLOT = 2
"""A dispatch round reads queued jobs this many times its workers' free slots at a time
(``_queued``): room for those no free worker can take."""
QUEUED_READ_MIN = 16


@dataclass(frozen=True)
class SweepReport:
    leases_expired: int
    deadlines_passed: int


def _candidate(
    worker: Worker, running: int, needs_stake: bool, now: float, half_life_s: float
) -> Candidate:
    hardware = HardwareDescriptor.model_validate(worker.hardware)
    return Candidate(
        worker_id=worker.id,
        offers=[Offer.model_validate(o) for o in worker.offers],
        vram_mb=hardware.vram_mb,
        has_gpu=bool(hardware.gpus),
        free_slots=worker.free_slots,
        running=running,
        max_concurrency=worker.max_concurrency,
        reputation=reputation.current(worker, now, half_life_s),
        carbon_intensity_g_per_kwh=worker.carbon_intensity_g_per_kwh,
        perf=worker.perf or {},
        staked=not needs_stake or worker.stake_eligible is True,
    )


def _needs(
    job: Row[Any], now: float, retry_excluded_after_s: float, min_reputation: float = 0.0
) -> JobNeeds:
    """What a queued job (``DISPATCH_COLUMNS``) needs of a worker."""
    prompt_units, completion_units = billing.token_bounds_of(
        job.type, job.max_units, job.max_tokens
    )
    return JobNeeds(
        type=JobType(job.type),
        model=job.model,
        precision=Precision(job.precision),
        max_price_wei_per_unit=job.max_price_wei_per_unit,
        max_prompt_price_wei_per_unit=job.max_prompt_price_wei_per_unit,
        prompt_units=prompt_units,
        completion_units=completion_units,
        preference=Preference(job.preference),
        min_vram_mb=job.min_vram_mb,
        units=job.units,
        time_left_s=job.deadline_at - now,
        excluded=frozenset(job.excluded_workers),
        # A worker that just lost or gave up the job gets it back only after a lease's time;
        # a check never goes to a worker whose result it checks, nor a job whose input a worker
        # called bad to that worker (another must confirm it: services/blame.py).
        retry_excluded=job.kind != CHECK
        and not job.input_claims
        and now - job.updated_at >= retry_excluded_after_s,
        min_reputation=min_reputation,
        uniform=job.kind == CHECK,
    )


def waiting_reason(needs: JobNeeds, available: list[Candidate]) -> str:
    """Why none of the available workers could take the job, most common reason first."""
    reasons = Counter(exclusion_reason(needs, c) or "busy" for c in available)
    parts = [f"{n} {reason}" for reason, n in reasons.most_common(3)]
    return f"no available worker can take it: {'; '.join(parts)}"


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + PERF_EWMA_ALPHA * (new - old)


class LeaseService(BatchCompletion):
    def __init__(
        self,
        store: Store,
        settings: Settings,
        payments: Payments,
        verification: VerificationService,
        blame: Blame,
        *,
        blob_path: Callable[[str], Path],
        rng: random.Random | None = None,
        notify: Callable[[str], None] = lambda worker_id: None,
    ) -> None:
        self._store = store
        self._blob_path = blob_path
        self._settings = settings
        self._payments = payments
        self._verification = verification
        self._blame = blame
        self._rng = rng or random.Random()
        self._notify = notify
        # One dispatcher per process; across replicas, row locks (SKIP LOCKED) keep them apart.
        self._dispatch_lock = threading.Lock()
        # True while a dispatch round waits for _dispatch_lock and has not yet read the store.
        self._round_waiting = False
        self._round_waiting_guard = threading.Lock()
        # (read at, models): see _live_models.
        self._live_models_cache: tuple[float, frozenset[str]] = (float("-inf"), frozenset())

    # -- dispatch -----------------------------------------------------------------------------

    @retry_transient
    def dispatch(self, now: float) -> list[tuple[str, str]]:
        """Assign queued jobs to available workers; returns (job id, worker id) pairs.

        Every submit and every lease poll that opens asks for a round. A caller that finds another
        round already waiting for its turn returns at once with no pairs: that round has not
        read the store yet, so it will see whatever this caller committed before asking.
        Under load this makes one round per turn instead of one per request (each a write
        transaction that locks the workers), and no job waits longer for it.
        """
        with self._round_waiting_guard:
            if self._round_waiting:
                return []
            self._round_waiting = True
        with self._dispatch_lock:
            with self._round_waiting_guard:
                self._round_waiting = False
            with self._store.transaction() as s:
                assigned = self._dispatch(s, now)
        for _, worker_id in assigned:
            self._notify(worker_id)
        return assigned

    def _dispatch(self, s: Session, now: float) -> list[tuple[str, str]]:
        # Nothing queued (most lease polls' start, a submit another round has already
        # placed): no worker row is locked and no candidate built. A job committed after
        # this look asks for a round of its own once committed, as every submit does.
        if s.scalar(select(Job.id).where(Job.state == JobState.QUEUED).limit(1)) is None:
            return []
        workers = list(
            s.scalars(
                select(Worker)
                .where(
                    Worker.status == REGISTERED,
                    Worker.available_until >= now,
                    Worker.free_slots > 0,
                )
                .order_by(Worker.id)
                # Never waits (store lock order): a worker another transaction holds sits
                # this round out; its poll or the next round places work on it.
                .with_for_update(skip_locked=True)
            )
        )
        if not workers:
            return []
        running = leased_counts(s, [w.id for w in workers])
        needs_stake = self._payments.enabled
        half_life = self._settings.reputation_half_life_s
        candidates = {
            w.id: _candidate(w, running.get(w.id, 0), needs_stake, now, half_life) for w in workers
        }
        by_id = {w.id: w for w in workers}
        offered_models = {o.model for c in candidates.values() for o in c.offers}
        # Set-based, as claims are: the columns matching reads, then an UPDATE per worker and
        # price for the placed jobs and one (by primary key) for the changed waiting reasons.
        free = sum(c.free_slots for c in candidates.values())
        jobs = self._queued(s, offered_models, max(QUEUED_READ_PER_SLOT * free, QUEUED_READ_MIN))
        assigned: list[tuple[str, str]] = []
        placed: dict[tuple[str, int, int | None], list[str]] = {}  # (worker, prices) -> jobs
        reasons: list[dict[str, Any]] = []
        lease_until = now + self._settings.lease_ttl_s
        for job in jobs:
            if job.deadline_at <= now:
                row = s.get(Job, job.id)  # locked above
                assert row is not None
                transition(s, row, JobState.EXPIRED, now, detail="deadline passed while queued")
                continue
            open_slots = [c for c in candidates.values() if c.free_slots > 0]
            if not open_slots:
                break
            needs = _needs(job, now, self._settings.lease_ttl_s, self._settings.reputation_floor)
            choice = choose(needs, open_slots, self._rng)
            if choice is None:
                reason = waiting_reason(needs, open_slots)
                if job.waiting_reason != reason:
                    reasons.append({"id": job.id, "waiting_reason": reason})
                continue
            terms = (
                choice.worker_id,
                choice.offer.price_wei_per_unit,
                billing.agreed_prompt_price(job, choice.offer),
            )
            placed.setdefault(terms, []).append(job.id)
            record_transition(
                s,
                job.id,
                job.attempt,
                JobState.QUEUED,
                JobState.ASSIGNED,
                now,
                choice.worker_id,
                detail=f"matched (score {choice.score:.3f})",
            )
            chosen = candidates[choice.worker_id]
            chosen.free_slots -= 1
            chosen.running += 1
            by_id[choice.worker_id].free_slots -= 1
            assigned.append((job.id, choice.worker_id))
        # One UPDATE per worker and price (a few per round, not one per job: on PostgreSQL an
        # UPDATE of many rows by primary key is a statement per row).
        for (worker_id, price, prompt_price), job_ids in placed.items():
            s.execute(
                update(Job)
                .where(self._store.among(Job.id, job_ids))
                .values(
                    waiting_reason=None,
                    worker_id=worker_id,
                    price_wei_per_unit=price,
                    prompt_price_wei_per_unit=prompt_price,
                    lease_expires_at=lease_until,
                    delivered=False,
                    state=JobState.ASSIGNED.value,
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
        if reasons:
            s.execute(update(Job), reasons)
        return assigned

    def _queued(self, s: Session, models: set[str], chunk: int) -> Iterator[Row[Any]]:
        """The queued jobs of ``models`` (those someone here could run) a round looks at, in
        its order, locked (skipping those another round holds): those that failed to place
        last round after the rest, so a pile of unplaceable jobs (say, priced below every
        offer) blocks no one. Read ``chunk`` at a time, each read after the last one seen:
        a round that fills its free slots from the first read reads no further (with many
        jobs queued, bench row b's rounds read, locked and built 228 rows each, the whole
        ``dispatch_batch`` mostly, to place 66), one that does not reads on, to
        ``dispatch_batch`` in all."""
        order = (Job.waiting_reason.is_not(None), Job.created_at, Job.id)
        left = self._settings.dispatch_batch
        after: Row[Any] | None = None
        while left > 0:
            query = select(*DISPATCH_COLUMNS).where(
                Job.state == JobState.QUEUED, Job.model.in_(models)
            )
            if after is not None:
                last = (after.waiting_reason is not None, after.created_at, after.id)
                query = query.where(tuple_(*order) > tuple_(*(literal(v) for v in last)))
            size = min(chunk, left)
            rows = s.execute(
                query.order_by(*order).limit(size).with_for_update(skip_locked=True)
            ).all()
            yield from rows
            if len(rows) < size:
                return
            left -= size
            after = rows[-1]
            chunk *= 2  # each read past a full one reads twice as many: few reads in all

    def explain_unplaced(self, job_id: str, now: float) -> None:
        """For a job dispatch just left queued without a reason (dispatch looks only at jobs
        some free worker could run): say that no worker is free, or that none offers its
        model. When a live worker offers the model (the busy market's case: it is only
        waiting for a slot) this costs nothing but a look at a cache renewed every
        ``OFFERED_MODELS_TTL_S``. The next dispatch round that sees the job replaces the reason."""
        with self._store.read() as s:
            job = s.get(Job, job_id)
            if job is None or job.state != JobState.QUEUED or job.waiting_reason is not None:
                return
            if job.model in self._live_models(s, now):
                return
            wanted = f"{job.type}/{job.model}"
            free = list(
                s.scalars(
                    select(Worker.offers).where(
                        Worker.status == REGISTERED,
                        Worker.available_until >= now,
                        Worker.free_slots > 0,
                    )
                )
            )
            if free:
                reason = f"none of the {len(free)} free worker(s) offers {wanted}"
            else:
                reason = f"no worker that offers {wanted} is connected"
        with self._store.transaction() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if job is not None and job.state == JobState.QUEUED and job.waiting_reason is None:
                job.waiting_reason = reason

    def explain_unplaced_many(self, job_ids: list[str], models: set[str], now: float) -> None:
        """``explain_unplaced`` for the jobs of a batch (``models``: the models they want): no
        read at all when a live worker offers every one of them (the busy market's case: the
        jobs only wait for a slot), else one read and one write."""
        with self._store.read() as s:
            live = self._live_models(s, now)
            if models <= live:
                return
            unserved = {
                job_id: f"{job_type}/{model}"
                for job_id, job_type, model, state, reason in s.execute(
                    select(Job.id, Job.type, Job.model, Job.state, Job.waiting_reason).where(
                        Job.id.in_(job_ids)
                    )
                )
                if state == JobState.QUEUED and reason is None and model not in live
            }
            if not unserved:
                return
            free = len(
                s.scalars(
                    select(Worker.id).where(
                        Worker.status == REGISTERED,
                        Worker.available_until >= now,
                        Worker.free_slots > 0,
                    )
                ).all()
            )
        with self._store.transaction() as s:
            for job in s.scalars(
                select(Job).where(Job.id.in_(unserved)).order_by(Job.id).with_for_update()
            ):
                if job.state == JobState.QUEUED and job.waiting_reason is None:
                    wanted = unserved[job.id]
                    job.waiting_reason = (
                        f"none of the {free} free worker(s) offers {wanted}"
                        if free
                        else f"no worker that offers {wanted} is connected"
                    )

    def _live_models(self, s: Session, now: float) -> frozenset[str]:
        """Models offered by registered workers heard from within a lease's time (cached)."""
        read_at, models = self._live_models_cache
        if now - read_at < OFFERED_MODELS_TTL_S:
            return models
        offers = s.scalars(
            select(Worker.offers).where(
                Worker.status == REGISTERED,
                Worker.last_seen_at >= now - self._settings.lease_ttl_s,
            )
        )
        models = frozenset(o.get("model") for worker_offers in offers for o in worker_offers)
        self._live_models_cache = (now, models)
        return models

    # -- the lease long-poll -----------------------------------------------------------------

    @retry_transient
    def open_poll(self, worker: Principal, free_slots: int, until: float, now: float) -> None:
        """The worker is listening until ``until`` with ``free_slots`` free: advertised for
        ``POLL_TTL_S`` at a time, renewed by ``claim(poll_until=until)``."""
        with self._store.transaction() as s:
            self._open(s, worker, free_slots, until, now)

    @staticmethod
    def _open(s: Session, worker: Principal, free_slots: int, until: float, now: float) -> None:
        """Advertise up to ``free_slots`` (what the worker's ``max_concurrency`` leaves beside
        the jobs it holds) for ``POLL_TTL_S``, up to ``until``; a worker that is not
        registered is only marked seen. Core statements: this runs at most polls' start."""
        row = s.execute(
            select(Worker.status, Worker.max_concurrency)
            .where(Worker.id == worker.id)
            .with_for_update()  # held first, so the count below sees its dispatch's commit
        ).one()
        values: dict[str, Any] = {"last_seen_at": now}
        if row.status == REGISTERED:
            held = leased_counts(s, [worker.id]).get(worker.id, 0)
            values["free_slots"] = max(0, min(free_slots, row.max_concurrency - held))
            values["available_until"] = min(until, now + POLL_TTL_S)
        s.execute(
            update(Worker)
            .where(Worker.id == worker.id)
            .values(**values)
            # No Worker object is loaded in a poll's transactions: nothing to keep in step
            # (the ORM's default compiled an evaluator of the SET clause at every poll).
            .execution_options(synchronize_session=False)
        )

    @retry_transient
    def close_poll(self, worker: Principal, now: float) -> None:
        with self._store.transaction() as s:
            self._close(s, worker, now)

    def start_poll(
        self, worker: Principal, max_jobs: int, until: float, now: float
    ) -> list[LeasedJob]:
        """A lease poll's first look: jobs already assigned to the worker are handed over
        at once (closing the poll: the worker goes away with them); otherwise the poll opens
        (its free slots advertised) in the same transaction, and a dispatch round runs. Jobs
        that round assigns to this worker are claimed at once; none leave the poll open for
        the long-poll, which a later assignment wakes (here, or on another replica)."""
        jobs = self._hand_over_or_open(worker, max_jobs, until, now)
        if jobs:
            return jobs
        if all(worker_id != worker.id for _, worker_id in self.dispatch(now)):
            return []
        # No renewal: the poll has just advertised the slots (renewing would write the
        # worker's row again, waiting for any of its results being recorded meanwhile).
        return self.claim(worker, max_jobs, now, close_when_leased=True)

    @retry_transient
    def _hand_over_or_open(
        self, worker: Principal, max_jobs: int, until: float, now: float
    ) -> list[LeasedJob]:
        """One transaction: the jobs assigned to the worker that it has not received (their
        poll ended before it claimed them), or, when there are none, ``open_poll``."""
        with self._store.transaction() as s:
            rows, lease_until = self._claim_rows(s, worker, max_jobs, now)
            # Jobs, then the worker's row: the store's lock order.
            if rows:
                self._close(s, worker, now)
            else:
                self._open(s, worker, max_jobs, until, now)
        return [self._leased_job(row, lease_until) for row in rows]

    @retry_transient
    def claim(
        self,
        worker: Principal,
        max_jobs: int,
        now: float,
        poll_until: float | None = None,
        *,
        close_when_leased: bool = False,
    ) -> list[LeasedJob]:
        """Hand over jobs assigned to this worker that it has not received yet. With
        ``poll_until``, the worker's open poll (``open_poll``) is renewed in the same
        transaction: its free slots stay advertised ``POLL_TTL_S`` longer, up to its end.
        With ``close_when_leased``, a claim that hands over jobs closes the poll instead (as
        ``close_poll``: the worker is no longer listening once it has them)."""
        with self._store.transaction() as s:
            rows, lease_until = self._claim_rows(s, worker, max_jobs, now)
            # Jobs, then the worker's row: the store's lock order.
            if rows and close_when_leased:
                self._close(s, worker, now)
            elif poll_until is not None:
                s.execute(
                    update(Worker)
                    .where(Worker.id == worker.id, Worker.available_until > 0)
                    .values(available_until=min(poll_until, now + POLL_TTL_S))
                    .execution_options(synchronize_session=False)  # as in _open
                )
        return [self._leased_job(row, lease_until) for row in rows]

    def _claim_rows(
        self, s: Session, worker: Principal, max_jobs: int, now: float
    ) -> tuple[list[Row[Any]], float]:
        """Mark the worker's assigned, undelivered jobs delivered and running; returns their
        ``LEASE_COLUMNS`` and the lease's end. Locks only jobs (the store's lock order: the
        caller may lock the worker's row after)."""
        # Set-based: the columns a lease carries, one UPDATE and one INSERT of events for all
        # of them (loading and flushing each job through the ORM cost more than the rest of
        # the poll).
        rows = list(
            s.execute(
                select(*LEASE_COLUMNS)
                .where(
                    Job.worker_id == worker.id,
                    Job.state == JobState.ASSIGNED,
                    Job.delivered.is_(False),
                )
                .order_by(Job.created_at)
                .limit(max_jobs)
                .with_for_update(skip_locked=True)
            ).all()
        )
        lease_until = now + self._settings.lease_ttl_s
        if rows:
            # The lease is the start: the job shows RUNNING from the moment the worker has
            # it, with no round trip of its own (POST .../start stays, idempotent).
            s.execute(
                update(Job)
                .where(self._store.among(Job.id, [row.id for row in rows]))
                .values(
                    delivered=True,
                    lease_expires_at=lease_until,
                    started_at=func.coalesce(Job.started_at, now),
                    state=JobState.RUNNING.value,
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            for row in rows:
                record_transition(
                    s, row.id, row.attempt, JobState.ASSIGNED, JobState.RUNNING, now, worker.id
                )
        return rows, lease_until

    @staticmethod
    def _close(s: Session, worker: Principal, now: float) -> None:
        """The worker is no longer listening: none of its slots is advertised."""
        s.execute(
            update(Worker)
            .where(Worker.id == worker.id)
            .values(available_until=0.0, free_slots=0, last_seen_at=now)
            .execution_options(synchronize_session=False)  # as in _open
        )

    def _leased_job(self, job: Row[Any], lease_expires_at: float) -> LeasedJob:
        """What the worker gets of a job (``job`` has the ``LEASE_COLUMNS``)."""
        assert job.price_wei_per_unit is not None
        renditions = job.spec.get("renditions")
        return LeasedJob(
            job_id=job.id,
            attempt=job.attempt,
            type=JobType(job.type),
            model=job.model,
            precision=Precision(job.precision),
            input=job.spec.get("input"),
            input_blob=job.input_blob,
            renditions=[Rendition.model_validate(r) for r in renditions] if renditions else None,
            container=job.spec.get("container") if job.type == JobType.TRANSCODE else None,
            price_wei_per_unit=job.price_wei_per_unit,
            prompt_price_wei_per_unit=billing.signed_prompt_price(job),
            lease_expires_at=ts(lease_expires_at),
            deadline_at=ts(job.deadline_at),
        )

    # -- a leased job's life on the worker ------------------------------------------------------

    def _held_job(self, s: Session, worker: Principal, job_id: str, attempt: int) -> Job:
        """The job, locked, if ``worker`` holds its lease for ``attempt``; else a clear error."""
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return self._holding(s, worker, job, attempt)

    def _holding(self, s: Session, worker: Principal, job: Job, attempt: int) -> Job:
        """``job`` (locked by the caller) if ``worker`` holds its lease for ``attempt``."""
        job_id = job.id
        if job.worker_id != worker.id:
            had_it = s.scalar(
                select(JobEvent.id).where(
                    JobEvent.job_id == job_id, JobEvent.worker_id == worker.id
                )
            )
            if had_it is None:
                raise Forbidden(f"job {job_id} is not leased to you")
            raise Conflict(
                f"your lease on job {job_id} (attempt {attempt}) is gone; the job is now "
                f"attempt {job.attempt}, {job.state}",
                current_attempt=job.attempt,
            )
        if attempt != job.attempt:
            raise Conflict(
                f"attempt {attempt} of job {job_id} is stale; the current attempt is {job.attempt}",
                current_attempt=job.attempt,
            )
        if not is_leased(job):
            raise Conflict(f"job {job_id} is {job.state}; stop working on it")
        return job

    @retry_transient
    def start(self, worker: Principal, job_id: str, attempt: int, now: float) -> None:
        with self._store.transaction() as s:
            job = self._held_job(s, worker, job_id, attempt)
            job.lease_expires_at = now + self._settings.lease_ttl_s
            if job.state == JobState.ASSIGNED:
                job.delivered = True
                if job.started_at is None:
                    job.started_at = now
                transition(s, job, JobState.RUNNING, now)

    @retry_transient
    def complete(
        self, worker: Principal, job_id: str, req: CompleteRequest, now: float
    ) -> ResultView:
        """Record a result once. A retry of the same completion returns the same result.

        The billed units are the orchestrator's own count (services/billing.py); a signed
        result that reports other units is refused (422), costs the worker reputation, and
        the job goes back to the queue for another worker."""
        # A check's comparisons (seconds, for video) and the probe of output files are made
        # before the transaction, so the store's write lock is not held for them. Most results
        # need neither and take one transaction; one that does is learned of from the locked
        # row, leaves that transaction with nothing written, has them made, and comes back.
        view = self._complete(worker, job_id, req, now, prepared=None)
        if view is None:
            prepared = self._prepare_results(worker, [(job_id, req)])
            view = self._complete(worker, job_id, req, now, prepared)
        assert view is not None
        return view

    def _complete(
        self,
        worker: Principal,
        job_id: str,
        req: CompleteRequest,
        now: float,
        prepared: dict[str, int | InvalidInput | None] | None,
    ) -> ResultView | None:
        """``complete``'s transaction; None (nothing done) for a result that needs preparing
        (``_prepare_results``) when ``prepared`` is None."""
        refused: str | None = None
        with self._store.transaction() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if (
                job is not None
                and job.state in (JobState.SUCCEEDED, JobState.VERIFYING)
                and job.worker_id == worker.id
                and job.attempt == req.attempt
            ):
                if job.output_sha256 != req.output_sha256 or job.units != req.units:
                    raise Conflict(
                        f"job {job_id} was already completed with another output or units"
                    )
                return result_view(job, self._address(s, worker))
            job = self._held_job(s, worker, job_id, req.attempt)
            if prepared is None and needs_preparing(job.type, job.kind, job.input_blob):
                return None
            row = self._lock_workers_for(s, worker, [job])
            output = self._check_result(s, job, row, req, worker)
            derived = prepared.get(job_id) if prepared is not None else None
            if derived is None:  # no file work: counted from the locked row
                derived = units_of(job, req, self._blob_path)
            if isinstance(derived, InvalidInput):
                raise derived
            if req.units != derived:
                refused = billing.units_mismatch(req.units, derived, job)
                self._refuse_bill(s, job, row, req.units, derived, now)
            else:
                self._check_cap(job, derived)
                self._record_result(s, job, row, req, derived, now, output)
                return result_view(job, row.address)
        assert refused is not None and isinstance(derived, int)
        raise InvalidInput(refused, derived_units=derived)  # after the commit: the record stays

    def _lock_workers_for(self, s: Session, worker: Principal, jobs: Iterable[Job]) -> Worker:
        """Lock the reporting worker's row (its counters and perf are read, then written) with
        every worker the results' verdicts or blame may touch: all at once, in id order (store
        lock order: never one worker held while waiting for another). Returns its row."""
        touched = {worker.id}
        for job in jobs:
            touched.update(c["worker_id"] for c in job.input_claims or [])
            if job.kind == CHECK and job.worker_id == worker.id:
                touched |= self._verification.verdict_workers(s, job)
        if len(touched) > 1:  # the usual result touches only its own worker: one read
            s.execute(
                select(Worker.id)
                .where(Worker.id.in_(sorted(touched)))
                .order_by(Worker.id)
                .with_for_update()
            )
        row = s.get(Worker, worker.id, with_for_update=True, populate_existing=True)
        assert row is not None
        return row

    def _refuse_bill(
        self, s: Session, job: Job, row: Worker, reported: int, derived: int, now: float
    ) -> None:
        """A signed result that bills other units than it holds: the worker loses reputation
        and the job, which goes back to the queue (another worker, or FAILED if none left)."""
        row.jobs_failed += 1
        row.last_seen_at = now
        reputation.record(
            row, reputation.Event.MISBILLED, now, self._settings.reputation_half_life_s
        )
        log.warning(
            "job %s: worker %s billed %d units for a result holding %d; refused",
            job.id,
            row.address,
            reported,
            derived,
            extra={"job_id": job.id},
        )
        requeue_or_fail(
            s,
            job,
            now,
            f"worker {row.address} billed {reported} units for a result holding {derived}",
        )

    def _record_result(
        self,
        s: Session,
        job: Job,
        row: Worker,
        req: CompleteRequest,
        units: int,
        now: float,
        output: CanonicalJSON | None,
        *,
        drawn: bool | None = None,
    ) -> None:
        """Record a checked result (``output``: what ``_check_result`` returned; ``drawn``:
        whether it came up for a check, when the caller has drawn it)."""
        job.skipped_renditions = self._check_ladder(job, req)
        job.output = output
        job.output_blobs = (
            [b.model_dump(mode="json") for b in req.output_blobs] if req.output_blobs else None
        )
        job.output_sha256 = req.output_sha256
        job.signature = req.signature
        job.duration_s = req.duration_s
        job.energy_j = req.energy_j
        job.energy_source = req.energy_source
        job.units = units
        job.prompt_units = req.prompt_units  # as the output holds (checked with the signature)
        job.cost_wei = billing.job_cost_wei(job, units, req.prompt_units)
        job.co2_g = co2_grams(req.energy_j, row.carbon_intensity_g_per_kwh)
        job.lease_expires_at = None
        if job.started_at is None:
            job.started_at = now - req.duration_s
        for blob in req.output_blobs or []:
            if s.get(BlobGrant, (blob.sha256, f"client:{job.client_id}")) is None:
                s.add(BlobGrant(sha256=blob.sha256, principal=f"client:{job.client_id}"))
        if self._verification.sample(s, job, row, now, drawn=drawn):
            # Held, unpaid, until a check on another worker agrees (services/verification).
            transition(s, job, JobState.VERIFYING, now, detail="sampled for verification")
        else:
            transition(s, job, JobState.SUCCEEDED, now)
            self._payments.record(s, job, row.address, now)
        self._count_success(row, job, req, now)
        self._blame.completed(s, job, now)
        if job.kind == CHECK:
            self._verification.check_completed(s, job, now)

    def _address(self, s: Session, worker: Principal) -> str:
        return s.scalar(select(Worker.address).where(Worker.id == worker.id)) or ""

    def _check_result(
        self,
        s: Session,
        job: JobRow,
        row: Worker,
        req: ResultFields,
        worker: Principal,
        *,
        batch_signed: bool = False,
    ) -> CanonicalJSON | None:
        """Refuse a result that does not hold up (its hash, its prompt units, its signature
        unless ``batch_signed``). Returns the inline output to record, as the canonical JSON
        its hash was checked over (the store writes that text as is); None for files."""
        output: CanonicalJSON | None = None
        if req.output is not None:
            if job.type == JobType.TRANSCODE:
                raise InvalidInput("transcode results are files: send output_blobs")
            text = canonical_json(req.output)
            digest = hashlib.sha256(text).hexdigest()
            output = CanonicalJSON(req.output, text.decode())
        else:
            assert req.output_blobs is not None
            for blob in req.output_blobs:
                if s.get(BlobGrant, (blob.sha256, worker.grant)) is None:
                    raise InvalidInput(
                        f"output blob {blob.sha256} ({blob.name}) was not uploaded by you; "
                        "upload it with POST /v1/blobs first"
                    )
            digest = output_sha256([b.model_dump(mode="json") for b in req.output_blobs])
        if digest != req.output_sha256:
            raise InvalidInput(
                f"output_sha256 {req.output_sha256} does not match the output ({digest}); "
                "hash the canonical JSON of the output"
            )
        assert job.price_wei_per_unit is not None
        billing.check_prompt_units(job, req.prompt_units, req.output)
        if batch_signed:  # the batch's signature was recovered once, over every result in it
            return output
        assert isinstance(req, CompleteRequest)  # a lone result carries its own signature
        try:
            signer = recover_result_signer(
                job.id,
                req.attempt,
                req.output_sha256,
                req.units,
                job.price_wei_per_unit,
                req.signature,
                prompt_units=req.prompt_units,
                prompt_price_wei_per_unit=billing.signed_prompt_price(job),
            )
        except ValueError as exc:
            raise BadSignature(f"result signature could not be decoded: {exc}") from exc
        if signer != row.address:
            raise BadSignature(
                f"result is signed by {signer}, not by this worker's address {row.address}; "
                f"sign job id, attempt, output_sha256, units and the price "
                f"({job.price_wei_per_unit} wei per unit), prompt_units and the prompt price "
                f"({billing.signed_prompt_price(job)}) with the worker's key"
            )
        return output

    def _check_cap(self, job: JobRow, units: int) -> None:
        """The derived units fit the agreed price (uint256 wei) and the client's max_units."""
        assert job.price_wei_per_unit is not None
        if units * max(job.price_wei_per_unit, billing.signed_prompt_price(job)) > MAX_WEI:
            raise InvalidInput(f"units {units} at the agreed price overflow 2**256 wei")
        if job.max_units is not None and units > job.max_units:
            raise InvalidInput(
                f"units is {units}, but the job has {job.max_units} input items"
                if job.spec.get("input") and job.type == JobType.INFERENCE
                else f"units is {units}, above the {job.max_units} the client authorised"
            )

    @staticmethod
    def _check_ladder(job: Job, req: CompleteRequest) -> list[dict[str, str]] | None:
        """A transcode's result accounts for every requested rendition: made, or skipped with
        its reason. Returns the skipped ones to keep on the job; a requested rendition the
        worker neither made nor explained is listed as skipped, saying so."""
        if job.type != JobType.TRANSCODE:
            if req.skipped_renditions:
                raise InvalidInput("skipped_renditions apply to transcode results only")
            return None
        asked = [Rendition.model_validate(r).label for r in job.spec.get("renditions") or []]
        made = [b.name for b in req.output_blobs or []]
        skipped = [r.model_dump(mode="json") for r in req.skipped_renditions or []]
        listed = made + [r["name"] for r in skipped]
        unknown = sorted({name for name in listed if name not in asked})
        twice = sorted({name for name in listed if listed.count(name) > 1})
        if unknown or twice:
            raise InvalidInput(
                f"the result lists renditions the job did not ask for ({', '.join(unknown)}) "
                f"or lists one twice ({', '.join(twice)}); it asked for {', '.join(asked)}"
            )
        for name in asked:
            if name not in listed:
                reason = "the worker did not produce it and gave no reason"
                skipped.append({"name": name, "reason": reason})
        return skipped

    def _count_success(self, row: Worker, job: JobRow, result: ResultFields, now: float) -> None:
        """The worker's counters, reputation and measured speed after a recorded result."""
        row.jobs_succeeded += 1
        row.last_seen_at = now
        reputation.record(
            row, reputation.Event.SUCCEEDED, now, self._settings.reputation_half_life_s
        )
        self._record_perf(row, job, result)

    def _record_perf(self, row: Worker, job: JobRow, req: ResultFields) -> None:
        if req.units <= 0:
            return
        key = offer_key(job.type, job.model, job.precision)
        perf = dict(row.perf or {})
        entry = dict(perf.get(key, {}))
        if req.duration_s > 0:
            entry["units_per_s"] = _ewma(entry.get("units_per_s"), req.units / req.duration_s)
        entry["energy_j_per_unit"] = _ewma(entry.get("energy_j_per_unit"), req.energy_j / req.units)
        perf[key] = entry
        row.perf = perf  # a new dict, so the JSON column is seen as changed

    @retry_transient
    def fail(self, worker: Principal, job_id: str, req: FailRequest, now: float) -> JobState:
        """A worker gives a job up: retryable goes back to the queue (elsewhere), else FAILED;
        whose fault it is decides who pays for it (services/blame.py)."""
        # The orchestrator's own look at the input (a probe may read a file): before locking.
        found = self._blame.recheck(job_id, now) if req.fault is Fault.INPUT else None
        with self._store.transaction() as s:
            job = self._held_job(s, worker, job_id, req.attempt)
            row = s.get(Worker, worker.id, with_for_update=True)
            assert row is not None
            row.last_seen_at = now
            self._blame.give_up(s, job, row, req, now, found)
            return JobState(job.state)

    # -- the sweeper ---------------------------------------------------------------------------

    @retry_transient
    def sweep(self, now: float) -> SweepReport:
        """Re-queue jobs whose lease expired and expire jobs past their deadline."""
        leased = [JobState.ASSIGNED.value, JobState.RUNNING.value]
        with self._dispatch_lock, self._store.transaction() as s:
            expired_leases = list(
                s.scalars(
                    select(Job)
                    .where(Job.state.in_(leased), Job.lease_expires_at < now)
                    .with_for_update(skip_locked=True)
                )
            )
            expired_leases.sort(key=lambda j: (j.worker_id or "", j.id))  # worker lock order
            for job in expired_leases:
                row = s.get(Worker, job.worker_id, with_for_update=True) if job.worker_id else None
                who = row.address if row else "unknown worker"
                if row is not None:
                    row.leases_expired += 1
                    reputation.record(
                        row,
                        reputation.Event.LEASE_EXPIRED,
                        now,
                        self._settings.reputation_half_life_s,
                    )
                requeue_or_fail(s, job, now, f"lease expired on {who} (attempt {job.attempt})")
            overdue = list(
                s.scalars(
                    select(Job)
                    .where(Job.state.in_([JobState.QUEUED.value, *leased]), Job.deadline_at < now)
                    .with_for_update(skip_locked=True)
                )
            )
            for job in overdue:
                transition(
                    s, job, JobState.EXPIRED, now, detail="deadline passed before completion"
                )
        return SweepReport(leases_expired=len(expired_leases), deadlines_passed=len(overdue))
