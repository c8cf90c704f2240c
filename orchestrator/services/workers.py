"""Worker-facing operations: challenge, register, heartbeat, drain, deregister; operator views."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from orchestrator.config import Settings
from orchestrator.exceptions import InvalidInput
from orchestrator.services import reputation
from orchestrator.services.auth import WORKER_TOKEN_PREFIX, Principal, new_id, new_token, token_hash
from orchestrator.services.challenges import issue_challenge, redeem_challenge
from orchestrator.services.jobs import ts
from orchestrator.services.lifecycle import is_leased, requeue_or_fail
from orchestrator.services.settlement import STAKES_CURSOR, Payments, SignedVoucher
from orchestrator.store import Store
from orchestrator.store.engine import retry_transient
from orchestrator.store.models import ChainCursor, Challenge, Job, Worker
from protocol import (
    ChallengeResponse,
    HardwareDescriptor,
    HeartbeatResponse,
    JobRef,
    JobState,
    JobType,
    Offer,
    RegisterRequest,
    RegisterResponse,
    WorkerView,
)
from protocol.jobs import LEASED_STATES, TRANSCODE_MODEL, Precision
from protocol.signing import registration_message
from protocol.workers import MarketStats

log = logging.getLogger("gpumarket.orchestrator.workers")
REGISTERED = "registered"
DRAINING = "draining"
DEREGISTERED = "deregistered"
REGISTRATION_CHALLENGE_ROUTE = "/v1/workers/challenge"
LEASED_VALUES = [state.value for state in LEASED_STATES]
STAKE_WRITE_BATCH = 500
"""Worker rows locked and written per statement in a stake refresh (bounded IN lists)."""


def leased_counts(session: Session, worker_ids: list[str] | None = None) -> dict[str, int]:
    """Jobs currently leased (assigned or running) per worker id."""
    query = (
        select(Job.worker_id, func.count())
        .where(Job.state.in_(LEASED_VALUES), Job.worker_id.is_not(None))
        .group_by(Job.worker_id)
    )
    if worker_ids is not None:
        query = query.where(Job.worker_id.in_(worker_ids))
    return {wid: n for wid, n in session.execute(query) if wid is not None}


def _check_offers(offers: list[Offer]) -> None:
    for i, offer in enumerate(offers):
        if offer.job_type is JobType.TRANSCODE:
            if offer.model != TRANSCODE_MODEL or offer.precision is not Precision.FP32:
                raise InvalidInput(
                    f"offers[{i}]: transcode offers use model {TRANSCODE_MODEL!r} and precision "
                    "fp32"
                )


class WorkerService:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        payments: Payments,
        *,
        forget_session: Callable[[str], None] = lambda worker_id: None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._payments = payments
        self._forget_session = forget_session
        # Liveness from heartbeats that hold no job: worker id -> last seen (unix s), written
        # to the store once per sweep (``flush_seen``) instead of a transaction per heartbeat.
        self._seen: dict[str, float] = {}
        self._seen_lock = threading.Lock()

    def challenge(self, address: str, now: float) -> ChallengeResponse:
        return issue_challenge(
            self._store,
            address,
            self._settings.challenge_ttl_s,
            now,
            lambda nonce, expires: registration_message(address, nonce, expires),
        )

    def register(self, req: RegisterRequest, now: float) -> RegisterResponse:
        _check_offers(req.offers)
        token = new_token(WORKER_TOKEN_PREFIX)
        staked = self._payments.is_eligible(req.address)  # chain read, outside the transaction
        with self._store.transaction() as s:
            signer = redeem_challenge(
                s,
                req.nonce,
                req.address,
                req.signature,
                now,
                purpose="gpumarket worker registration\n",
                where=REGISTRATION_CHALLENGE_ROUTE,
            )
            worker = s.scalar(select(Worker).where(Worker.address == signer))
            if worker is not None and worker.status == DEREGISTERED:
                worker.registered_at = now  # a new registration: its unstaked clock restarts
            if worker is None:
                worker = Worker(
                    id=new_id(),
                    address=signer,
                    registered_at=now,
                    perf={},
                    jobs_succeeded=0,
                    jobs_failed=0,
                    leases_expired=0,
                )
                s.add(worker)
            worker.hardware = req.hardware.model_dump(mode="json")
            worker.offers = [o.model_dump(mode="json") for o in req.offers]
            worker.max_concurrency = req.max_concurrency
            worker.carbon_intensity_g_per_kwh = req.carbon_intensity_g_per_kwh
            worker.version = req.version
            worker.session_token_hash = token_hash(token)
            worker.status = REGISTERED
            worker.last_seen_at = now
            worker.available_until = 0.0
            worker.free_slots = 0
            if staked is not None:
                worker.stake_eligible = staked
                worker.stake_checked_at = now
            worker_id = worker.id
        self._forget_session(worker_id)  # a cached older session of this worker is void now
        return RegisterResponse(
            worker_id=worker_id,
            session_token=token,
            lease_ttl_s=self._settings.lease_ttl_s,
            heartbeat_interval_s=self._settings.heartbeat_interval_s,
            long_poll_max_s=self._settings.long_poll_max_s,
        )

    @retry_transient
    def heartbeat(self, worker: Principal, jobs: list[JobRef], now: float) -> HeartbeatResponse:
        """Extend the leases of the jobs the worker still holds; list those it must drop.

        A heartbeat without jobs only says the worker is alive: it is noted in memory and
        written with the others at the next sweep, with no transaction of its own."""
        cancel: list[JobRef] = []
        if not jobs:
            with self._seen_lock:
                self._seen[worker.id] = max(now, self._seen.get(worker.id, 0.0))
            return HeartbeatResponse(
                cancel=cancel,
                lease_ttl_s=self._settings.lease_ttl_s,
                heartbeat_interval_s=self._settings.heartbeat_interval_s,
            )
        with self._store.transaction() as s:
            # Lock order everywhere: job rows first (by id), then the worker row.
            for ref in sorted(jobs, key=lambda r: r.job_id):
                job = s.get(Job, ref.job_id, with_for_update=True)
                if (
                    job is None
                    or job.worker_id != worker.id
                    or job.attempt != ref.attempt
                    or not is_leased(job)
                ):
                    cancel.append(ref)
                    continue
                job.lease_expires_at = now + self._settings.lease_ttl_s
            row = s.get(Worker, worker.id, with_for_update=True)
            assert row is not None
            row.last_seen_at = now
        return HeartbeatResponse(
            cancel=cancel,
            lease_ttl_s=self._settings.lease_ttl_s,
            heartbeat_interval_s=self._settings.heartbeat_interval_s,
        )

    @retry_transient
    def drain(self, worker: Principal, now: float) -> None:
        """Stop sending new jobs to this worker; leased jobs may still complete."""
        with self._store.transaction() as s:
            row = s.get(Worker, worker.id, with_for_update=True)
            assert row is not None
            row.status = DRAINING
            row.available_until = 0.0
            row.free_slots = 0
            row.last_seen_at = now

    @retry_transient
    def deregister(self, worker: Principal, now: float) -> int:
        """Leave the market: the session ends and leased jobs go back to the queue."""
        with self._store.transaction() as s:
            held = list(
                s.scalars(
                    select(Job)
                    .where(Job.worker_id == worker.id, Job.state.in_(LEASED_VALUES))
                    .order_by(Job.id)
                    .with_for_update()
                )
            )
            row = s.get(Worker, worker.id, with_for_update=True)
            assert row is not None
            row.status = DEREGISTERED
            row.session_token_hash = None
            row.available_until = 0.0
            row.free_slots = 0
            for job in held:
                requeue_or_fail(s, job, now, f"worker {row.address} deregistered")
            count = len(held)
        self._forget_session(worker.id)
        with self._seen_lock:
            self._seen.pop(worker.id, None)
        return count

    def flush_seen(self) -> int:
        """Write the liveness noted since the last flush; returns how many workers."""
        with self._seen_lock:
            seen, self._seen = self._seen, {}
        if not seen:
            return 0
        with self._store.transaction() as s:
            s.execute(
                update(Worker),
                [{"id": worker_id, "last_seen_at": at} for worker_id, at in sorted(seen.items())],
            )
        return len(seen)

    def last_seen(self, w: Worker) -> float:
        """The latest sign of life: the store's, or a heartbeat not yet flushed."""
        return max(w.last_seen_at, self._seen.get(w.id, 0.0))

    def list(self, now: float, *, include_gone: bool = False) -> list[WorkerView]:
        with self._store.read() as s:
            query = select(Worker).order_by(Worker.registered_at)
            if not include_gone:
                query = query.where(Worker.status != DEREGISTERED)
            rows = list(s.scalars(query))
            counts = leased_counts(s)
        return [self._view(w, counts.get(w.id, 0), now) for w in rows]

    def _view(self, w: Worker, running: int, now: float) -> WorkerView:
        last_seen = self.last_seen(w)
        online = now - last_seen <= self._settings.lease_ttl_s
        status = w.status if (online or w.status == DEREGISTERED) else "offline"
        return WorkerView(
            id=w.id,
            address=w.address,
            status=status,
            hardware=HardwareDescriptor.model_validate(w.hardware),
            offers=[Offer.model_validate(o) for o in w.offers],
            max_concurrency=w.max_concurrency,
            running_jobs=running,
            free_slots=w.free_slots if w.available_until >= now else 0,
            jobs_succeeded=w.jobs_succeeded,
            jobs_failed=w.jobs_failed,
            leases_expired=w.leases_expired,
            reputation=reputation.current(w, now, self._settings.reputation_half_life_s),
            carbon_intensity_g_per_kwh=w.carbon_intensity_g_per_kwh,
            registered_at=ts(w.registered_at),
            last_seen_at=ts(last_seen),
        )

    def stats(self, now: float) -> MarketStats:
        with self._store.read() as s:
            by_state = job_state_counts(s)
            succeeded = Job.state == JobState.SUCCEEDED
            # Summed in Python: SQLite keeps wei as text, and its SUM would go through floats.
            costs = s.scalars(select(Job.cost_wei).where(succeeded, Job.cost_wei.is_not(None)))
            earned = sum(c for c in costs if c is not None)
            energy = s.scalar(select(func.coalesce(func.sum(Job.energy_j), 0.0)).where(succeeded))
            present = Worker.status != DEREGISTERED
            recent = Worker.last_seen_at >= now - self._settings.lease_ttl_s
            registered = s.scalar(select(func.count()).select_from(Worker).where(present))
            online = s.scalar(select(func.count()).select_from(Worker).where(present, recent))
        return MarketStats(
            jobs_by_state=by_state,
            queue_depth=by_state[JobState.QUEUED.value],
            workers_registered=registered or 0,
            workers_online=online or 0,
            wei_earned_total=earned,
            energy_j_total=float(energy or 0.0),
        )

    def vouchers(self, worker: Principal, now: float) -> Sequence[SignedVoucher]:
        with self._store.read() as s:
            address = s.scalar(select(Worker.address).where(Worker.id == worker.id))
        return self._payments.vouchers(address, now) if address else []

    def refresh_stakes(self, now: float) -> int:
        """Bring registered workers' WorkerRegistry eligibility up to date; returns how many
        were re-read.

        One registry event scan (since the last one) names the workers whose standing changed;
        they, the newly registered and those not re-read for ``stake_check_interval_s`` are
        asked in JSON-RPC batches, and all are written in one transaction. The cost of a
        sweep grows with stake changes, not with the number of idle registrations; and
        registrations never seen staked end after ``unstaked_registration_ttl_s``.
        """
        if not self._payments.enabled:
            return 0
        with self._store.read() as s:
            cursor = s.get(ChainCursor, STAKES_CURSOR)
            next_block = cursor.next_block if cursor else None
        scanned = self._payments.stake_changes(next_block)
        if scanned is None:
            return 0
        changed, next_block = scanned
        stale_before = now - self._settings.stake_check_interval_s
        with self._store.read() as s:
            due = dict(
                s.execute(
                    select(Worker.id, Worker.address).where(
                        Worker.status == REGISTERED,
                        or_(
                            Worker.stake_checked_at.is_(None),
                            Worker.stake_checked_at < stale_before,
                            Worker.address.in_(sorted(changed)),
                        ),
                    )
                ).all()
            )
        eligible = self._payments.eligibility(sorted(set(due.values())))
        if eligible is None:
            return 0
        with self._store.transaction() as s:
            for start in range(0, len(due), STAKE_WRITE_BATCH):
                ids = sorted(due)[start : start + STAKE_WRITE_BATCH]
                rows = s.scalars(
                    select(Worker).where(Worker.id.in_(ids)).order_by(Worker.id).with_for_update()
                )
                for row in rows:
                    if row.address in eligible:
                        row.stake_eligible = eligible[row.address]
                        row.stake_checked_at = now
            if cursor_row := s.get(ChainCursor, STAKES_CURSOR, with_for_update=True):
                cursor_row.next_block = max(cursor_row.next_block, next_block)
            else:
                s.add(ChainCursor(name=STAKES_CURSOR, next_block=next_block))
        self.expire_unstaked(now)
        return len(due)

    def expire_unstaked(self, now: float) -> int:
        """End registrations older than ``unstaked_registration_ttl_s`` that are not staked
        and hold no job (as deregister does); returns how many. Payments only."""
        if not self._payments.enabled:
            return 0
        registered_before = now - self._settings.unstaked_registration_ttl_s
        holding = select(Job.worker_id).where(
            Job.worker_id.is_not(None), Job.state.in_(LEASED_VALUES)
        )
        with self._store.transaction() as s:
            rows = list(
                s.scalars(
                    select(Worker)
                    .where(
                        Worker.status == REGISTERED,
                        Worker.stake_eligible.is_not(True),
                        Worker.registered_at < registered_before,
                        Worker.id.not_in(holding),
                    )
                    .order_by(Worker.id)
                    .with_for_update(skip_locked=True)
                )
            )
            for row in rows:
                row.status = DEREGISTERED
                row.session_token_hash = None
                row.available_until = 0.0
                row.free_slots = 0
            expired = [row.id for row in rows]
        for worker_id in expired:
            self._forget_session(worker_id)
            with self._seen_lock:
                self._seen.pop(worker_id, None)
        if expired:
            log.info(
                "%d unstaked registrations older than %.0f s ended",
                len(expired),
                self._settings.unstaked_registration_ttl_s,
            )
        return len(expired)

    def purge_challenges(self, now: float) -> None:
        with self._store.transaction() as s:
            s.execute(delete(Challenge).where(Challenge.expires_at < now))


def job_state_counts(session: Session, kind: str | None = None) -> dict[str, int]:
    """Jobs per state (every state present, 0 if none); only jobs of ``kind`` when given
    ("job": clients' jobs, "check": verification re-runs)."""
    query = select(Job.state, func.count()).group_by(Job.state)
    if kind is not None:
        query = query.where(Job.kind == kind)
    rows = session.execute(query)
    counts = {state.value: 0 for state in JobState}
    counts.update({state: n for state, n in rows})
    return counts
