"""Results reported in a batch: many jobs' results in one request, under one signature.

A worker whose jobs finished together reports them in one ``POST /v1/workers/results``: one
EIP-712 ``ResultBatch`` signature over the Merkle root of the jobs' ``Result`` struct hashes
and their count (protocol/signing.py; or over the list itself, from a worker that signs as
before), recovered once. Each job is then recorded as ``LeaseService.complete``
records one (the same checks, billing, verification sampling and ledger), all in one
transaction, exactly once per (job id, attempt): a replayed batch or job answers its recorded
result, and a stale attempt is that item's own 409 beside the accepted ones.

``BatchCompletion`` is a part of ``LeaseService`` (it uses the single completion's steps, and
the single completion uses its ``_prepare_results``, ``needs_preparing`` and ``units_of``);
it lives here to keep leases.py to the lease's own life.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import Row, select
from sqlalchemy.orm import Session, load_only

from orchestrator.exceptions import BadSignature, Conflict, GpumarketError, InvalidInput, NotFound
from orchestrator.services import billing
from orchestrator.services.auth import Principal, new_id
from orchestrator.services.billing import JobRow
from orchestrator.services.jobs import item_error
from orchestrator.services.lifecycle import record_transition
from orchestrator.services.matching import co2_grams
from orchestrator.services.settlement import Payments
from orchestrator.services.verification import CHECK, VerificationService
from orchestrator.store import Store
from orchestrator.store.engine import CanonicalJSON, retry_transient, update_rows
from orchestrator.store.models import Job, ResultBatch, Worker
from protocol import CompleteRequest, JobState, JobType
from protocol.batches import BatchCompleteItem, BatchCompleteRequest, BatchResult
from protocol.jobs import LEASED_STATES
from protocol.signing import (
    LIST_SCHEME,
    MERKLE_SCHEME,
    recover_result_batch_signer,
    recover_result_list_signer,
    result_hash,
)
from protocol.workers import ResultFields


class BatchCompletion:
    """``LeaseService.complete_batch`` and its helpers (a mixin of ``LeaseService``)."""

    _store: Store
    _blob_path: Callable[[str], Path]
    _verification: VerificationService
    _payments: Payments

    if TYPE_CHECKING:  # the single completion's steps, defined in LeaseService

        def _holding(self, s: Session, worker: Principal, job: Job, attempt: int) -> Job: ...

        def _check_result(
            self,
            s: Session,
            job: JobRow,
            row: Worker,
            req: ResultFields,
            worker: Principal,
            *,
            batch_signed: bool = False,
        ) -> CanonicalJSON | None: ...

        def _refuse_bill(
            self, s: Session, job: Job, row: Worker, reported: int, derived: int, now: float
        ) -> None: ...

        def _check_cap(self, job: JobRow, units: int) -> None: ...

        def _count_success(
            self, row: Worker, job: JobRow, result: ResultFields, now: float
        ) -> None: ...

        def _lock_workers_for(
            self, s: Session, worker: Principal, jobs: Iterable[Job]
        ) -> Worker: ...

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
        ) -> None: ...

    @retry_transient
    def complete_batch(
        self, worker: Principal, req: BatchCompleteRequest, now: float
    ) -> list[BatchCompleteItem]:
        """Record many results under one signature, in one transaction; each item as
        ``complete`` would (exactly once per job and attempt: a replayed item returns its
        recorded result). An item that cannot be taken (a stale attempt, a foreign job, other
        units) gets its own error beside the accepted ones. The signature (EIP-712
        ``ResultBatch`` over the Merkle root of the items' ``Result`` struct hashes and their
        count) is recovered once."""
        hashes = self._batch_hashes(req)
        try:
            signer = recover_result_batch_signer(hashes, req.signature)
        except ValueError as exc:
            raise BadSignature(f"batch signature could not be decoded: {exc}") from exc
        items = {r.job_id: r for r in req.results}
        derived = self._prepare_results(worker, [(r.job_id, r) for r in req.results])
        outcomes: dict[str, BatchCompleteItem] = {}
        with self._store.transaction() as s:
            # Lock order: the jobs (in id order), then the workers (this one with those the
            # results' verdicts and blame touch, in id order). The jobs are locked and read as
            # plain rows: most results are recorded set-based from them (``_complete_plain``);
            # the others are loaded as ORM objects and recorded as ``complete`` records one.
            locked = {
                r.id: r
                for r in s.execute(
                    select(*COMPLETION_COLUMNS)
                    .where(self._store.among(Job.id, items))
                    .order_by(Job.id)
                    .with_for_update()
                )
            }
            plain = {
                job_id
                for job_id, job in locked.items()
                if _is_plain(job, worker.id, items[job_id], derived[job_id])
            }
            others = [job_id for job_id in locked if job_id not in plain]
            jobs = (
                {j.id: j for j in s.scalars(select(Job).where(self._store.among(Job.id, others)))}
                if others
                else {}
            )
            row = self._lock_workers_for(s, worker, jobs.values())
            scheme = MERKLE_SCHEME
            if signer != row.address and _list_signer(hashes, req.signature) == row.address:
                scheme = LIST_SCHEME  # a worker that signs as before the Merkle root
            elif signer != row.address:
                raise BadSignature(
                    f"result batch is signed by {signer}, not by this worker's address "
                    f"{row.address}; sign the Merkle root of the result hashes and their "
                    "count (protocol/signing.py, result_hash, sign_result_batch) with the "
                    "worker's key"
                )
            batch = ResultBatch(
                id=new_id(),
                worker_id=worker.id,
                signature=req.signature,
                result_hashes=hashes,
                created_at=now,
                scheme=scheme,
            )
            # The plain results first, written by one UPDATE before any other result is
            # recorded: what the others' records read of the jobs (a payer's budget, say)
            # then sees those jobs as they now are.
            writes: list[dict[str, Any]] = []
            drawn: dict[str, bool | None] = {}  # plain results left to the others' way
            for index, item in enumerate(req.results):
                if item.job_id not in plain:
                    continue
                try:
                    done = self._complete_plain(
                        s, row, locked[item.job_id], item, index, batch, now, worker
                    )
                except GpumarketError as exc:
                    outcomes[item.job_id] = BatchCompleteItem(
                        job_id=item.job_id, error=item_error(exc)
                    )
                    continue
                if isinstance(done, dict):
                    writes.append(done)
                    outcomes[item.job_id] = BatchCompleteItem(
                        job_id=item.job_id, state=JobState.SUCCEEDED, cost_wei=done["cost_wei"]
                    )
                else:  # misbilled, or drawn for a check: recorded as the others are
                    drawn[item.job_id] = done is _Plain.DRAWN or None
                    jobs[item.job_id] = s.get_one(Job, item.job_id)  # locked above
            if writes:
                update_rows(s.connection(), Job, writes)
            for index, item in enumerate(req.results):
                if item.job_id in outcomes:
                    continue
                try:
                    view = self._complete_item(
                        s,
                        worker,
                        row,
                        jobs.get(item.job_id),
                        item,
                        index,
                        batch,
                        derived[item.job_id],
                        now,
                        drawn=drawn.get(item.job_id),
                    )
                except GpumarketError as exc:
                    outcomes[item.job_id] = BatchCompleteItem(
                        job_id=item.job_id, error=item_error(exc)
                    )
                    continue
                outcomes[item.job_id] = BatchCompleteItem(
                    job_id=item.job_id, state=JobState(view.state), cost_wei=view.cost_wei
                )
            if writes or any(j.result_batch_id == batch.id for j in jobs.values()):
                s.add(batch)
        return [outcomes[r.job_id] for r in req.results]

    def _complete_plain(
        self,
        s: Session,
        row: Worker,
        job: Row[Any],
        item: BatchResult,
        index: int,
        batch: ResultBatch,
        now: float,
        worker: Principal,
    ) -> dict[str, Any] | _Plain:
        """One result of a plain job (``_is_plain``), inside the batch's transaction: the
        checks ``_complete_item`` makes, and the job's new column values for one UPDATE of
        the batch's jobs (the event, the ledger entry and the worker's counters recorded as
        ``_record_result`` records them). A result that bills other units, or that comes up
        for a check, is left to ``_complete_item`` (``_Plain``): nothing is written here."""
        _check_prices(job, item, index)
        output = self._check_result(s, job, row, item, worker, batch_signed=True)
        derived = units_of(job, item, self._blob_path)
        if isinstance(derived, InvalidInput):
            raise derived
        if item.units != derived:
            return _Plain.MISBILLED
        self._check_cap(job, derived)
        if self._verification.draw(row, now):
            return _Plain.DRAWN
        cost = billing.job_cost_wei(job, derived, item.prompt_units)
        paid = _Paid(job.id, job.attempt, job.payer_address, cost)
        self._payments.record(s, paid, row.address, now)
        self._count_success(row, job, item, now)
        record_transition(  # last: its wake-up is for a job whose record is all made
            s, job.id, job.attempt, JobState(job.state), JobState.SUCCEEDED, now, job.worker_id
        )
        return {
            "id": job.id,
            "state": JobState.SUCCEEDED.value,
            "updated_at": now,
            "finished_at": now,
            "output": output,
            "output_sha256": item.output_sha256,
            "signature": batch.signature,
            "duration_s": item.duration_s,
            "energy_j": item.energy_j,
            "energy_source": item.energy_source,
            "units": derived,
            "prompt_units": item.prompt_units,
            "cost_wei": cost,
            "co2_g": co2_grams(item.energy_j, row.carbon_intensity_g_per_kwh),
            "lease_expires_at": None,
            "started_at": job.started_at if job.started_at is not None else now - item.duration_s,
            "result_batch_id": batch.id,
            "result_batch_index": index,
        }

    @staticmethod
    def _batch_hashes(req: BatchCompleteRequest) -> list[str]:
        hashes = []
        for i, item in enumerate(req.results):
            try:
                hashes.append(
                    result_hash(
                        item.job_id,
                        item.attempt,
                        item.output_sha256,
                        item.units,
                        item.price_wei_per_unit,
                        prompt_units=item.prompt_units,
                        prompt_price_wei_per_unit=item.prompt_price_wei_per_unit,
                    )
                )
            except ValueError as exc:
                raise InvalidInput(f"results[{i}] cannot be hashed: {exc}") from exc
        return hashes

    def _prepare_results(
        self, worker: Principal, results: Sequence[tuple[str, ResultFields]]
    ) -> dict[str, int | InvalidInput | None]:
        """Each result's units as the orchestrator counts them, where that takes file work
        (a transcode's renditions probed, an input blob read): done here, before the write
        transaction, so its lock is never held for it. None for the others, which are
        counted from the job rows the transaction locks anyway. A check's comparisons are
        made ahead too (``VerificationService.precompare``). One narrow read, for a batch's
        results (``complete_batch``) or for a lone one that ``needs_preparing``."""
        derived: dict[str, int | InvalidInput | None] = {}
        ids = [job_id for job_id, _ in results]
        with self._store.read() as s:
            kinds = {
                job_id: (job_type, kind, input_blob)
                for job_id, job_type, kind, input_blob in s.execute(
                    select(Job.id, Job.type, Job.kind, Job.input_blob).where(
                        self._store.among(Job.id, ids)
                    )
                )
            }
            with_files = [
                job_id
                for job_id, (job_type, _, input_blob) in kinds.items()
                if _has_files(job_type, input_blob)
            ]
            jobs = (
                {
                    j.id: j
                    for j in s.scalars(
                        select(Job)
                        .options(load_only(*billing.UNITS_COLUMNS))
                        .where(Job.id.in_(with_files))
                    )
                }
                if with_files
                else {}
            )
        for job_id, result in results:
            job = jobs.get(job_id)
            if job_id not in kinds:
                derived[job_id] = InvalidInput(f"no job {job_id}")
            elif job is None:
                derived[job_id] = None  # counted in the transaction
            else:
                derived[job_id] = units_of(job, result, self._blob_path)
        for job_id, result in results:
            if job_id in kinds and kinds[job_id][1] == CHECK:
                self._verification.precompare(job_id, worker.id, result)
        return derived

    def _complete_item(
        self,
        s: Session,
        worker: Principal,
        row: Worker,
        job: Job | None,
        item: BatchResult,
        index: int,
        batch: ResultBatch,
        derived: int | InvalidInput | None,
        now: float,
        *,
        drawn: bool | None = None,
    ) -> Job:
        """One result of a batch, inside its transaction: ``complete``'s checks and record
        (``drawn``: whether it came up for a check, when ``_complete_plain`` drew it).
        Returns the job as recorded (now, or by an earlier report of the same result)."""
        if job is None:
            raise NotFound(f"no job {item.job_id}")
        if (
            job.state in (JobState.SUCCEEDED, JobState.VERIFYING)
            and job.worker_id == worker.id
            and job.attempt == item.attempt
        ):
            if job.output_sha256 != item.output_sha256 or job.units != item.units:
                raise Conflict(f"job {job.id} was already completed with another output or units")
            return job
        job = self._holding(s, worker, job, item.attempt)  # locked with the batch's jobs
        _check_prices(job, item, index)
        req = _as_complete(item, batch.signature)
        output = self._check_result(s, job, row, req, worker, batch_signed=True)
        if derived is None:  # no file work: counted from the locked row
            derived = units_of(job, item, self._blob_path)
        if isinstance(derived, InvalidInput):
            raise derived
        if item.units != derived:
            detail = billing.units_mismatch(item.units, derived, job)
            self._refuse_bill(s, job, row, item.units, derived, now)
            raise InvalidInput(detail, derived_units=derived)
        self._check_cap(job, derived)
        job.result_batch_id = batch.id
        job.result_batch_index = index
        self._record_result(s, job, row, req, derived, now, output, drawn=drawn)
        return job


def _list_signer(hashes: list[str], signature: str) -> str | None:
    """Who signed the batch over its list of hashes (``LIST_SCHEME``), if it decodes so."""
    try:
        return recover_result_list_signer(hashes, signature)
    except ValueError:
        return None


def _has_files(job_type: str, input_blob: str | None) -> bool:
    """Whether counting a result's units takes file work (a transcode's renditions probed,
    an input blob read)."""
    return job_type == JobType.TRANSCODE or input_blob is not None


def needs_preparing(job_type: str, kind: str, input_blob: str | None) -> bool:
    """Whether a result of this job needs ``_prepare_results`` before its transaction: file
    work to count its units, or a check's comparisons."""
    return _has_files(job_type, input_blob) or kind == CHECK


def units_of(
    job: JobRow, result: ResultFields, blob_path: Callable[[str], Path]
) -> int | InvalidInput:
    """The units ``result`` holds (billing.derive_units), or why they cannot be counted."""
    try:
        return billing.derive_units(job, result.output_blobs, blob_path, result.output)
    except InvalidInput as exc:
        return exc


def _as_complete(item: BatchResult, signature: str) -> CompleteRequest:
    """A batch item as the single-result request ``complete``'s checks take (already valid)."""
    fields = {
        name: getattr(item, name) for name in CompleteRequest.model_fields if name != "signature"
    }
    return CompleteRequest.model_construct(**{**fields, "signature": signature})


COMPLETION_COLUMNS = (
    Job.id,
    Job.type,
    Job.kind,
    Job.state,
    Job.worker_id,
    Job.attempt,
    Job.model,
    Job.precision,
    Job.spec,
    Job.input_blob,
    Job.price_wei_per_unit,
    Job.prompt_price_wei_per_unit,
    Job.max_units,
    Job.payer_address,
    Job.input_claims,
    Job.started_at,
    Job.output_blobs,
    Job.skipped_renditions,
)
"""The columns of a job a batch's transaction locks and reads: what ``_is_plain`` and
``_complete_plain`` look at."""


class _Plain(Enum):
    """Why ``_complete_plain`` left a result to ``_complete_item``."""

    MISBILLED = "misbilled"  # other units than it holds: refused, the job re-queued
    DRAWN = "drawn"  # came up for a check: held in VERIFYING, a check job queued


class _Paid(NamedTuple):
    """What ``Payments.record`` reads of a job recorded set-based."""

    id: str
    attempt: int
    payer_address: str | None
    cost_wei: int


def _is_plain(
    job: Row[Any], worker_id: str, item: BatchResult, derived: int | InvalidInput | None
) -> bool:
    """Whether ``item`` is the first report of a leased job's inline result that only this
    worker's row and the job's own row record: no file work or check comparisons (``derived``
    None), not a check, no input claims (blame), no files (grants), not a replay or a stale
    attempt. ``_complete_plain`` records those; the rest go through ``_complete_item``."""
    return (
        derived is None
        and job.kind == "job"
        and job.state in LEASED_STATES
        and job.worker_id == worker_id
        and job.attempt == item.attempt
        and job.type != JobType.TRANSCODE
        and not job.input_claims
        and job.output_blobs is None
        and job.skipped_renditions is None
        and item.output is not None
        and not item.skipped_renditions
    )


def _check_prices(job: JobRow, item: BatchResult, index: int) -> None:
    """The batch item is signed at the prices the job was leased at."""
    if item.price_wei_per_unit != job.price_wei_per_unit:
        raise InvalidInput(
            f"results[{index}] is signed at {item.price_wei_per_unit} wei per unit; "
            f"job {job.id} was leased at {job.price_wei_per_unit}"
        )
    if item.prompt_price_wei_per_unit != billing.signed_prompt_price(job):
        raise InvalidInput(
            f"results[{index}] is signed at {item.prompt_price_wei_per_unit} wei per prompt "
            f"token; job {job.id} was leased at {billing.signed_prompt_price(job)}"
        )
