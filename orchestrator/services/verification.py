"""Verification: re-run a sample of results on other workers, and settle disagreements.

When a client's job completes, ``sample`` decides (at ``verify_rate``, more for new or
low-reputation workers) whether to check it. A checked job waits in VERIFYING, unpaid, while a
*check* (a hidden copy of the job, kind "check") runs on a different worker; workers cannot
tell a check from any other job. Then:

- the check agrees: the job succeeds and is paid; both workers gain reputation;
- it disagrees: a second check (the tie-break) runs on a third worker. The side the tie-break
  agrees with wins; the loser loses reputation and is slashed on chain with the hash of the two
  conflicting signed results as evidence. If the job's own worker lost, the client gets the
  agreed result instead and pays nothing for this job; if the first check lost, the job's
  result stands and is paid;
- a check that cannot finish in ``verify_timeout_s`` (or three different answers) leaves the
  result standing, paid, and marked inconclusive.

Checks are paid like any job, by the operator's verification payer (not the client), so the
client is never charged more than it authorised. Slashes are written in the verdict's
transaction and sent by the sweeper (``send_slashes``), so a crash between the two loses none.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from orchestrator.config import Settings
from orchestrator.services import billing, reputation
from orchestrator.services.auth import new_id
from orchestrator.services.comparators import (
    COSINE_THRESHOLDS,
    PSNR_THRESHOLD_DB,
    TEACHER_FORCING_METRIC,
    Comparison,
    compare_generations,
    compare_renditions,
    compare_tensors,
)
from orchestrator.services.lifecycle import record_event, transition
from orchestrator.services.matching import within_price
from orchestrator.services.settlement import Payments
from orchestrator.services.workers import REGISTERED
from orchestrator.store import Store
from orchestrator.store.models import Job, Slash, Worker
from protocol import (
    FINAL_STATES,
    JobState,
    JobType,
    Offer,
    VerificationCheck,
    VerificationStatus,
    VerificationView,
)
from protocol.units import MAX_WEI
from protocol.workers import ResultFields

log = logging.getLogger("gpumarket.orchestrator.verification")

CHECK = "check"
COMPARISONS_KEPT = 256
UNFINISHED = [s.value for s in JobState if s not in FINAL_STATES]


def _comparison_key(first: Job, second: Job) -> tuple[str, ...] | None:
    """What a comparison depends on: the job type, the precision, the two outputs (by hash)
    and the units each billed."""
    if not first.output_sha256 or not second.output_sha256:
        return None
    a, b = sorted(
        (f"{first.output_sha256}:{first.units}", f"{second.output_sha256}:{second.units}")
    )
    return (str(first.type), str(first.precision), a, b)


def compare_units(first: Job, second: Job) -> Comparison | None:
    """Two results that bill different units disagree, whatever their outputs look like (the
    same job done honestly holds the same units everywhere: input items, or output pixels);
    None when the units agree and the outputs must be compared. Decodes nothing."""
    if first.units is None or second.units is None or first.units == second.units:
        return None
    if first.type == JobType.TRANSCODE:
        metric, threshold = "psnr_db", PSNR_THRESHOLD_DB
    elif first.type == JobType.GENERATE:
        metric, threshold = TEACHER_FORCING_METRIC, 1.0
    else:
        metric, threshold = "cosine", COSINE_THRESHOLDS.get(str(first.precision), 0.0)
    return Comparison(
        False, metric, None, threshold, f"billed units differ: {first.units} against {second.units}"
    )


def evidence_hash(first: Job, second: Job) -> str:
    """sha256 over the two conflicting signed results (job id, attempt, output hash, units,
    price and signature of each), as 0x-hex: what WorkerRegistry.slash records as evidence.
    Each part is what its worker signed (protocol/signing.py), so the evidence proves both
    what was produced and what was billed."""
    parts = []
    for job in (first, second):
        parts.append(
            f"{job.id}:{job.attempt}:{job.output_sha256}:{job.units}:"
            f"{job.price_wei_per_unit}:{job.prompt_units or 0}:{billing.signed_prompt_price(job)}:"
            f"{job.signature}"
        )
    return "0x" + hashlib.sha256("|".join(parts).encode()).hexdigest()


def check_spec(parent: Job) -> dict[str, Any]:
    """The request a check runs: the parent's own, and for generation the claimed tokens, which
    the checking worker confirms by teacher forcing (one forward pass) instead of generating."""
    if parent.type != JobType.GENERATE:
        return dict(parent.spec)
    claimed = (parent.output or {}).get("token_ids") or []
    return {**parent.spec, "input": {**(parent.spec.get("input") or {}), "check_tokens": claimed}}


class VerificationService:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        payments: Payments,
        blob_path: Callable[[str], Path],
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._payments = payments
        self._blob_path = blob_path
        self._rng = rng or random.Random()
        self._compared: OrderedDict[tuple[str, ...], Comparison] = OrderedDict()
        self._compared_lock = threading.Lock()

    # -- sampling -----------------------------------------------------------------------------

    def rate_for(self, worker: Worker, now: float) -> float:
        """The share of this worker's results to check: more while it is new or distrusted."""
        cfg = self._settings
        score = reputation.current(worker, now, cfg.reputation_half_life_s)
        if worker.jobs_succeeded < cfg.verify_new_worker_jobs or score < (
            cfg.verify_trusted_reputation
        ):
            return max(cfg.verify_rate, cfg.verify_rate_new)
        return cfg.verify_rate

    def draw(self, worker: Worker, now: float) -> bool:
        """Whether the result ``worker`` has just reported comes up for a check (a draw at its
        ``rate_for``); ``sample`` makes it unless told its outcome."""
        rate = self.rate_for(worker, now)
        return rate > 0 and self._rng.random() < rate

    def sample(
        self, s: Session, job: Job, worker: Worker, now: float, *, drawn: bool | None = None
    ) -> bool:
        """Decide whether to check ``job`` (just completed by ``worker``; ``drawn``: the
        outcome of its ``draw``, when the caller made it); if so, queue the check and return
        True: the caller then holds the job in VERIFYING, unpaid."""
        if job.kind != "job":
            return False
        if not (self.draw(worker, now) if drawn is None else drawn):
            return False
        if not self._another_worker_offers(s, job, exclude=[worker.id]):
            return False  # nobody could re-run it: checking would only delay the client
        self._queue_check(s, job, [worker.id], now, purpose="check")
        job.verification = VerificationView(
            status=VerificationStatus.PENDING,
            detail="sampled: re-running on another worker to compare",
        ).model_dump(mode="json")
        return True

    def _another_worker_offers(self, s: Session, job: Job, exclude: list[str]) -> bool:
        """Is another registered worker offering this job type and model at or under the
        job's max price (the check's price cap too)?"""
        rows = s.execute(
            select(Worker.id, Worker.offers).where(
                Worker.status == REGISTERED, Worker.id.not_in(exclude)
            )
        ).all()
        for _, offers in rows:
            for raw in offers:
                if raw.get("job_type") != job.type or raw.get("model") != job.model:
                    continue
                offer = Offer.model_validate(raw)
                caps = (job.max_price_wei_per_unit, job.max_prompt_price_wei_per_unit)
                if within_price(offer, *caps) is None:
                    return True
        return False

    def _queue_check(
        self, s: Session, parent: Job, exclude: list[str], now: float, *, purpose: str
    ) -> Job:
        check = Job(
            id=new_id(),
            client_id=parent.client_id,
            kind=CHECK,
            parent_id=parent.id,
            idempotency_key=None,
            request_hash=parent.request_hash,
            type=parent.type,
            model=parent.model,
            precision=parent.precision,
            preference=parent.preference,
            spec=check_spec(parent),
            input_blob=parent.input_blob,
            max_price_wei_per_unit=parent.max_price_wei_per_unit,
            max_prompt_price_wei_per_unit=parent.max_prompt_price_wei_per_unit,
            max_cost_wei=parent.max_cost_wei,
            min_vram_mb=parent.min_vram_mb,
            max_units=parent.max_units,
            payer_address=self._check_payer(s, parent),
            state=JobState.QUEUED,
            attempt=1,
            max_attempts=parent.max_attempts,
            excluded_workers=list(exclude),
            deadline_at=now + self._settings.verify_timeout_s,
            created_at=now,
            updated_at=now,
            units=parent.units if parent.type == JobType.INFERENCE else None,
        )
        s.add(check)
        record_event(
            s,
            job_id=check.id,
            attempt=1,
            state=JobState.QUEUED,
            detail=f"{purpose} of job {parent.id}",
            at=now,
        )
        return check

    def _check_payer(self, s: Session, parent: Job) -> str | None:
        """The verification payer, when it can afford the check; else None (an unpaid check:
        better than a voucher the chain would refuse)."""
        payer = self._payments.verification_payer
        if payer is None or not self._payments.enabled:
            return None
        most = billing.cost_bound_wei(parent)
        budget = self._payments.budget(s, payer)
        if budget is None or budget.available_wei < most:
            log.warning(
                "verification payer %s cannot cover a check of job %s (%s wei); it runs unpaid",
                payer,
                parent.id,
                most,
                extra={"job_id": parent.id},
            )
            return None
        return payer

    # -- verdicts -----------------------------------------------------------------------------

    def verdict_workers(self, s: Session, check: Job) -> set[str]:
        """Before a check's result is recorded: lock its parent job (jobs come first in the
        store's lock order, orchestrator/store/engine.py) and name every worker the verdict
        may reward or convict (the parent's, each check's), for the caller to lock with its
        own, all at once in ``id`` order."""
        parent = s.get(Job, check.parent_id, with_for_update=True)
        if parent is None:
            return set()
        ids = set(
            s.scalars(select(Job.worker_id).where(Job.parent_id == parent.id, Job.kind == CHECK))
        )
        return {i for i in (*ids, parent.worker_id) if i}

    def check_completed(self, s: Session, check: Job, now: float) -> None:
        """A check succeeded (in the caller's transaction): compare and maybe decide."""
        parent = s.get(Job, check.parent_id, with_for_update=True)
        if parent is None or parent.state != JobState.VERIFYING:
            return  # resolved already (e.g. timed out): this result is paid, nothing more
        checks = self._finished_checks(s, parent)
        record = VerificationView.model_validate(parent.verification)
        earlier = [c for c in checks if c.id != check.id]
        if not earlier:
            self._first_check(s, parent, check, record, now)
        else:
            self._tie_break(s, parent, earlier[0], check, record, now)

    def _finished_checks(self, s: Session, parent: Job) -> list[Job]:
        return list(
            s.scalars(
                select(Job)
                .where(
                    Job.parent_id == parent.id,
                    Job.kind == CHECK,
                    Job.state == JobState.SUCCEEDED,
                )
                .order_by(Job.created_at, Job.id)
            )
        )

    def compare(self, first: Job, second: Job) -> Comparison:
        """Do the two results agree, in output and in billed units? Remembered by their output
        hashes and units, so a comparison made ahead by ``precompare`` (outside any
        transaction) is not made again inside one."""
        key = _comparison_key(first, second)
        with self._compared_lock:
            known = self._compared.get(key) if key else None
        if known is not None:
            return known
        cmp = compare_units(first, second) or self._compare_outputs(first, second)
        if key:
            with self._compared_lock:
                self._compared[key] = cmp
                while len(self._compared) > COMPARISONS_KEPT:
                    self._compared.popitem(last=False)
        return cmp

    def _compare_outputs(self, first: Job, second: Job) -> Comparison:
        if first.type == JobType.TRANSCODE:
            return compare_renditions(first.output_blobs, second.output_blobs, self._blob_path)
        if first.type == JobType.GENERATE:
            return compare_generations(first.output, second.output)
        return compare_tensors(first.output, second.output, first.precision)

    def precompare(self, check_id: str, worker_id: str, result: ResultFields) -> None:
        """Make the comparisons a check's completion will need before its transaction starts:
        decoding two transcode ladders takes seconds, which must not be spent holding the
        store's write lock. Nothing is decided here; a result that changes meanwhile (or a
        guess that misses) is simply compared again inside."""
        with self._store.read() as s:
            check = s.get(Job, check_id)
            if (
                check is None
                or check.kind != CHECK
                or check.parent_id is None
                or check.worker_id != worker_id  # only the holder's result is worth the work
                or check.attempt != result.attempt
            ):
                return
            parent = s.get(Job, check.parent_id)
            if parent is None or parent.state != JobState.VERIFYING:
                return
            others = [parent, *self._finished_checks(s, parent)]
        mine = Job(
            type=check.type,
            precision=check.precision,
            output=result.output,
            output_blobs=[b.model_dump(mode="json") for b in result.output_blobs]
            if result.output_blobs
            else None,
            output_sha256=result.output_sha256,
            units=result.units,
        )
        for other in others:
            if other.id != check_id:
                self.compare(mine, other)

    def _entry(self, s: Session, job: Job, cmp: Comparison) -> VerificationCheck:
        return VerificationCheck(
            worker_address=self._address(s, job.worker_id),
            metric=cmp.metric,
            value=cmp.value,
            threshold=cmp.threshold,
            agrees=cmp.agrees,
            detail=cmp.detail,
        )

    def _first_check(
        self, s: Session, parent: Job, check: Job, record: VerificationView, now: float
    ) -> None:
        cmp = self.compare(parent, check)
        record.checks.append(self._entry(s, check, cmp))
        if cmp.agrees:
            self._reward(s, [parent.worker_id, check.worker_id], now)
            record.status = VerificationStatus.PASSED
            record.detail = "a second worker's result agreed"
            self._release(s, parent, record, now, pay=True)
            return
        exclude = [w for w in (parent.worker_id, check.worker_id) if w]
        if not self._another_worker_offers(s, parent, exclude=exclude):
            record.status = VerificationStatus.INCONCLUSIVE
            record.detail = "a check disagreed and no third worker can break the tie"
            self._release(s, parent, record, now, pay=True)
            return
        self._queue_check(s, parent, exclude, now, purpose="tie-break")
        record.detail = "a check disagreed: a third worker breaks the tie"
        parent.verification = record.model_dump(mode="json")

    def _tie_break(
        self,
        s: Session,
        parent: Job,
        first_check: Job,
        judge: Job,
        record: VerificationView,
        now: float,
    ) -> None:
        with_parent = self.compare(parent, judge)
        with_check = self.compare(first_check, judge)
        record.checks.append(self._entry(s, judge, with_parent))
        if with_parent.agrees and not with_check.agrees:
            loser = first_check
            record.status = VerificationStatus.UPHELD
            record.detail = "the tie-break agreed with this result; the disagreeing check lost"
            self._reward(s, [parent.worker_id, judge.worker_id], now)
            record.slashed_address = self._convict(s, loser, parent, now)
            self._release(s, parent, record, now, pay=True)
        elif with_check.agrees and not with_parent.agrees:
            record.status = VerificationStatus.REPLACED
            record.detail = (
                "this result lost the tie-break: the client gets the result two other "
                "workers agreed on, and pays nothing for this job"
            )
            self._reward(s, [first_check.worker_id, judge.worker_id], now)
            record.slashed_address = self._convict(s, parent, first_check, now)
            record.result_signed_for = first_check.id
            record.result_signed_units = first_check.units
            record.result_signed_price_wei_per_unit = first_check.price_wei_per_unit
            record.result_signed_prompt_units = first_check.prompt_units or 0
            record.result_signed_prompt_price_wei_per_unit = billing.signed_prompt_price(
                first_check
            )
            self._adopt(parent, first_check)
            self._release(s, parent, record, now, pay=False)
        else:
            record.status = VerificationStatus.INCONCLUSIVE
            record.detail = "the tie-break agreed with both or neither; the result stands"
            self._release(s, parent, record, now, pay=True)

    def _adopt(self, parent: Job, source: Job) -> None:
        """Give the client the agreed result in place of the proved-wrong one."""
        parent.output = source.output
        parent.output_blobs = source.output_blobs
        parent.skipped_renditions = source.skipped_renditions
        parent.output_sha256 = source.output_sha256
        parent.signature = source.signature
        parent.cost_wei = 0

    def _release(
        self, s: Session, parent: Job, record: VerificationView, now: float, *, pay: bool
    ) -> None:
        parent.verification = record.model_dump(mode="json")
        worker = s.get(Worker, parent.worker_id) if parent.worker_id else None
        if pay and worker is not None:
            self._payments.record(s, parent, worker.address, now)
        transition(s, parent, JobState.SUCCEEDED, now, detail=f"verification {record.status}")
        log.info("job %s: verification %s", parent.id, record.status, extra={"job_id": parent.id})

    def _reward(self, s: Session, worker_ids: list[str | None], now: float) -> None:
        for worker_id in sorted(w for w in worker_ids if w):
            row = s.get(Worker, worker_id, with_for_update=True)
            if row is not None:
                row.verifications_passed += 1
                reputation.record(
                    row, reputation.Event.VERIFIED, now, self._settings.reputation_half_life_s
                )

    def _convict(self, s: Session, wrong: Job, right: Job, now: float) -> str:
        """Record the proof against ``wrong``'s worker and owe a slash for it."""
        row = s.get(Worker, wrong.worker_id, with_for_update=True)
        assert row is not None
        row.verifications_failed += 1
        row.rep_good = 0.0  # a proved-wrong result outweighs any record
        reputation.record(
            row, reputation.Event.PROVED_WRONG, now, self._settings.reputation_half_life_s
        )
        if self._payments.enabled:
            row.stake_eligible = False  # out of matching now; the chain agrees after the slash
        evidence = evidence_hash(wrong, right)
        if s.get(Slash, evidence) is None:
            s.add(
                Slash(
                    evidence_hash=evidence,
                    worker_address=row.address,
                    job_id=wrong.parent_id or wrong.id,
                    amount_wei=self._settings.slash_wei or MAX_WEI,
                    status="pending",
                    created_at=now,
                )
            )
        log.warning(
            "job %s: worker %s returned a wrong result (evidence %s)",
            wrong.parent_id or wrong.id,
            row.address,
            evidence,
            extra={"job_id": wrong.parent_id or wrong.id},
        )
        return row.address

    def _address(self, s: Session, worker_id: str | None) -> str:
        if worker_id is None:
            return ""
        return s.scalar(select(Worker.address).where(Worker.id == worker_id)) or ""

    # -- the sweeper's part -------------------------------------------------------------------

    def resolve_stalled(self, now: float) -> int:
        """Release jobs held in VERIFYING that no check will decide: every check ended without
        a result (expired, failed, cancelled), or no worker has taken the one waiting for
        ``verify_unplaced_timeout_s`` (it is withdrawn). The result stands, paid, marked
        inconclusive with the reason. Returns how many were released."""
        released = 0
        with self._store.transaction() as s:
            parents = list(
                s.scalars(
                    select(Job)
                    .where(Job.state == JobState.VERIFYING)
                    .with_for_update(skip_locked=True)
                )
            )
            for parent in parents:
                # SKIP LOCKED: a completion holds its check and then waits for this parent;
                # waiting here for that check could deadlock. A check held elsewhere is
                # being decided: look again next round.
                of_parent = (Job.parent_id == parent.id, Job.kind == CHECK)
                checks = list(
                    s.scalars(select(Job).where(*of_parent).with_for_update(skip_locked=True))
                )
                if len(checks) < (
                    s.scalar(select(func.count()).select_from(Job).where(*of_parent)) or 0
                ):
                    continue
                unfinished = [c for c in checks if c.state in UNFINISHED]
                record = VerificationView.model_validate(parent.verification)
                if not unfinished:
                    record.detail = (
                        f"no check finished within {self._settings.verify_timeout_s:g} s; "
                        "the result stands"
                    )
                elif self._unplaced_too_long(unfinished, now):
                    record.detail = self._withdraw(s, unfinished, now)
                else:
                    self._say_why_checks_wait(parent, record, unfinished)
                    continue
                record.status = VerificationStatus.INCONCLUSIVE
                self._release(s, parent, record, now, pay=True)
                released += 1
        return released

    def _unplaced_too_long(self, unfinished: list[Job], now: float) -> bool:
        """Every unfinished check still queued, none taken within the unplaced timeout."""
        limit = self._settings.verify_unplaced_timeout_s
        return all(c.state == JobState.QUEUED and now - c.created_at >= limit for c in unfinished)

    def _withdraw(self, s: Session, unfinished: list[Job], now: float) -> str:
        """Cancel checks no worker took; returns why, for the released job's record."""
        why = next((c.waiting_reason for c in unfinished if c.waiting_reason), None)
        why = why or "no worker offering this model at the job's price was free"
        limit = self._settings.verify_unplaced_timeout_s
        for check in unfinished:
            transition(s, check, JobState.CANCELLED, now, detail=f"not taken within {limit:g} s")
        return f"no worker could re-run it within {limit:g} s ({why}); released unchecked"

    def _say_why_checks_wait(
        self, parent: Job, record: VerificationView, unfinished: list[Job]
    ) -> None:
        """While a check is queued, the job's record says what it waits for, and until when."""
        why = next((c.waiting_reason for c in unfinished if c.waiting_reason), None)
        if why is None:
            return
        limit = self._settings.verify_unplaced_timeout_s
        detail = (
            f"sampled: the re-run on another worker waits ({why}); released unchecked if no "
            f"worker takes it within {limit:g} s"
        )
        if record.detail != detail:
            record.detail = detail
            parent.verification = record.model_dump(mode="json")

    def send_slashes(self) -> int:
        """Send owed slashes to the chain; returns how many were settled this round."""
        with self._store.read() as s:
            pending = list(
                s.scalars(select(Slash).where(Slash.status == "pending").order_by(Slash.created_at))
            )
        settled = 0
        for slash in pending:
            outcome = self._payments.slash(
                slash.worker_address, slash.amount_wei, slash.evidence_hash
            )
            with self._store.transaction() as s:
                row = s.get(Slash, slash.evidence_hash, with_for_update=True)
                if row is None or row.status != "pending":
                    continue
                row.status = outcome.status
                row.tx_hash = outcome.tx_hash
                row.slashed_wei = outcome.slashed_wei
                row.detail = outcome.detail or None
            settled += 1
            log.warning(
                "slash of %s for job %s: %s %s",
                slash.worker_address,
                slash.job_id,
                outcome.status,
                outcome.tx_hash or outcome.detail,
                extra={"job_id": slash.job_id},
            )
        return settled
