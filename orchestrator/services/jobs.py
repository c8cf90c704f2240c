"""Client-facing job operations: submit (idempotent), read, list, cancel, result."""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from orchestrator.config import Settings
from orchestrator.exceptions import Conflict, GpumarketError, InvalidInput, NotFound
from orchestrator.services import billing, throttle
from orchestrator.services.auth import Principal, new_id
from orchestrator.services.billing import JobRow
from orchestrator.services.inputs import InputChecks, job_input_key, refused_reason
from orchestrator.services.lifecycle import NewEvent, record_event, transition
from orchestrator.services.settlement import Payments
from orchestrator.store import Store
from orchestrator.store.engine import insert_rows, retry_transient
from orchestrator.store.models import (
    BlobGrant,
    Client,
    Job,
    JobEvent,
    RefusedInput,
    ResultBatch,
    Worker,
)
from protocol import (
    BUILTIN_MODELS,
    FINAL_STATES,
    JobEventView,
    JobList,
    JobSpec,
    JobState,
    JobType,
    JobView,
    Offer,
    OutputBlob,
    Rendition,
    ResultView,
    SkippedRendition,
    VerificationView,
)
from protocol.batches import ItemError, JobBatchItem, JobStateItem
from protocol.jobs import ResultBatchProof
from protocol.signing import LIST_SCHEME, ResultTree, canonical_json

MAX_LIST_LIMIT = 200
PAID_DEADLINE_SHARE = 0.5  # of the payer's withdrawal delay
log = logging.getLogger("gpumarket.orchestrator.jobs")

KNOWN_MODELS_TTL_S = 2.0  # how long a submit trusts the models it last read (KnownModels)


def ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, tz=UTC)


def maybe_ts(value: float | None) -> datetime | None:
    return None if value is None else ts(value)


def job_view(
    job: Job, events: Sequence[JobEvent | NewEvent], worker_address: str | None
) -> JobView:
    renditions = job.spec.get("renditions")
    return JobView(
        id=job.id,
        type=JobType(job.type),
        model=job.model,
        precision=job.precision,
        state=JobState(job.state),
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        preference=job.preference,
        max_price_wei_per_unit=job.max_price_wei_per_unit,
        max_units=job.max_units,
        max_prompt_price_wei_per_unit=job.max_prompt_price_wei_per_unit,
        max_cost_wei=job.max_cost_wei,
        price_wei_per_unit=job.price_wei_per_unit,
        prompt_price_wei_per_unit=job.prompt_price_wei_per_unit,
        prompt_units=job.prompt_units if job.type == JobType.GENERATE else None,
        units=job.units,
        cost_wei=job.cost_wei,
        worker_address=worker_address,
        idempotency_key=job.idempotency_key,
        input_blob=job.input_blob,
        renditions=[Rendition.model_validate(r) for r in renditions] if renditions else None,
        container=job.spec.get("container"),
        created_at=ts(job.created_at),
        updated_at=ts(job.updated_at),
        deadline_at=ts(job.deadline_at),
        started_at=maybe_ts(job.started_at),
        finished_at=maybe_ts(job.finished_at),
        failure_reason=job.failure_reason,
        fault=job.fault,
        waiting_reason=job.waiting_reason if job.state == JobState.QUEUED else None,
        duration_s=job.duration_s,
        energy_j=job.energy_j,
        energy_source=job.energy_source,
        co2_g=job.co2_g,
        verification=VerificationView.model_validate(job.verification)
        if job.verification
        else None,
        history=[
            JobEventView(at=ts(e.at), attempt=e.attempt, state=JobState(e.state), detail=e.detail)
            for e in events
        ],
    )


RESULT_COLUMNS = (
    Job.id,
    Job.client_id,
    Job.kind,
    Job.type,
    Job.state,
    Job.attempt,
    Job.worker_id,
    Job.output,
    Job.output_blobs,
    Job.output_sha256,
    Job.signature,
    Job.units,
    Job.prompt_units,
    Job.price_wei_per_unit,
    Job.prompt_price_wei_per_unit,
    Job.cost_wei,
    Job.duration_s,
    Job.energy_j,
    Job.energy_source,
    Job.co2_g,
    Job.verification,
    Job.skipped_renditions,
    Job.result_batch_id,
    Job.result_batch_index,
)
"""What ``result_view`` (and the read that picks a client's succeeded jobs) reads of a job:
not its spec or history, whose JSON a batch of results would decode for nothing."""


def result_view(job: JobRow, worker_address: str, batch: ResultBatch | None = None) -> ResultView:
    """The job's result; ``batch``: the batch it was reported in (``job.result_batch_id``)."""
    assert job.output_sha256 and job.signature and job.units is not None
    return ResultView(
        job_id=job.id,
        attempt=job.attempt,
        state=JobState(job.state),
        output=job.output,
        output_blobs=[OutputBlob.model_validate(b) for b in job.output_blobs]
        if job.output_blobs
        else None,
        output_sha256=job.output_sha256,
        signature=job.signature,
        worker_address=worker_address,
        units=job.units,
        price_wei_per_unit=job.price_wei_per_unit or 0,
        prompt_units=job.prompt_units or 0,
        prompt_price_wei_per_unit=billing.signed_prompt_price(job),
        cost_wei=job.cost_wei or 0,
        duration_s=job.duration_s or 0.0,
        energy_j=job.energy_j or 0.0,
        energy_source=job.energy_source or "estimate",
        co2_g=job.co2_g,
        verification=VerificationView.model_validate(job.verification)
        if job.verification
        else None,
        skipped_renditions=[SkippedRendition.model_validate(r) for r in job.skipped_renditions]
        if job.skipped_renditions is not None
        else None,
        batch=_batch_proof(batch, job.result_batch_index)
        if batch is not None and job.result_batch_index is not None
        else None,
    )


def _batch_proof(batch: ResultBatch, index: int) -> ResultBatchProof:
    """Result ``index``'s proof in ``batch``: its path to the signed root, or for a batch
    signed over its list (``LIST_SCHEME``) the list itself."""
    count = len(batch.result_hashes)
    if batch.scheme == LIST_SCHEME:
        hashes = list(batch.result_hashes)
        return ResultBatchProof(
            scheme="list", signature=batch.signature, index=index, count=count, result_hashes=hashes
        )
    path = _result_tree(batch).path(index)
    return ResultBatchProof(signature=batch.signature, index=index, count=count, path=path)


_TREES: OrderedDict[str, ResultTree] = OrderedDict()
_TREES_LOCK = threading.Lock()
TREES_KEPT = 256
"""Batches whose Merkle trees are kept (``_result_tree``): a tree is built once for all its
results' reads (n - 1 hashes), not once per result."""


def _result_tree(batch: ResultBatch) -> ResultTree:
    """``batch``'s Merkle tree, from the last ``TREES_KEPT`` built (a batch's hashes never
    change, so its id keys it)."""
    with _TREES_LOCK:
        tree = _TREES.get(batch.id)
        if tree is not None:
            _TREES.move_to_end(batch.id)
            return tree
    tree = ResultTree(list(batch.result_hashes))
    with _TREES_LOCK:
        _TREES[batch.id] = tree
        while len(_TREES) > TREES_KEPT:
            _TREES.popitem(last=False)
    return tree


def _encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{job.created_at!r}|{job.id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return float(created), job_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("cursor is malformed; pass next_cursor from the last page") from exc


def known_models(session: Session, job_type: JobType) -> set[str]:
    """Built-in models plus whatever registered workers offer for this job type."""
    models = {name for name, meta in BUILTIN_MODELS.items() if meta["type"] is job_type}
    offers = session.scalars(select(Worker.offers).where(Worker.status != "deregistered"))
    for worker_offers in offers:
        for raw in worker_offers:
            offer = Offer.model_validate(raw)
            if offer.job_type is job_type:
                models.add(offer.model)
    return models


class KnownModels:
    """``known_models``, remembered for ``KNOWN_MODELS_TTL_S``: reading every registered
    worker's offers for each submit grew with the workers, not with the request. A model in
    the remembered set is taken; one not in it is read again before it is refused, so a model
    a worker has just registered is never missed. A model whose last worker has just left
    stays known up to the TTL longer: its jobs queue with a waiting reason, as they would had
    they come a moment before it left."""

    def __init__(self) -> None:
        self._seen: dict[JobType, tuple[float, frozenset[str]]] = {}

    def including(
        self, session: Session, job_type: JobType, model: str, *, read_on_miss: bool = True
    ) -> frozenset[str]:
        """The known models of ``job_type``: the remembered ones when ``model`` is among them
        (and they are fresh), else read now. ``read_on_miss=False``: the remembered ones
        anyway, while fresh (a batch reads them again once, not at every unknown model)."""
        read_at, models = self._seen.get(job_type, (float("-inf"), frozenset()))
        fresh = time.monotonic() - read_at < KNOWN_MODELS_TTL_S
        if fresh and (model in models or not read_on_miss):
            return models
        models = frozenset(known_models(session, job_type))
        self._seen[job_type] = (time.monotonic(), models)
        return models


def job_spec(spec: JobSpec) -> dict[str, Any]:
    """The stored request of a job (``Job.spec``): input, container and ladder."""
    stored: dict[str, Any] = {
        "input": spec.input.model_dump(mode="json", exclude_none=True) if spec.input else None,
        "container": spec.container.value,
    }
    if spec.type is JobType.TRANSCODE:
        stored["renditions"] = [r.model_dump(mode="json") for r in spec.ladder]
    if spec.generation is not None:  # the worker reads a generate job's request as its input
        stored["input"] = spec.generation.model_dump(mode="json", exclude_none=True)
    return stored


class JobService:
    def __init__(
        self, store: Store, payments: Payments, settings: Settings, inputs: InputChecks
    ) -> None:
        self._store = store
        self._payments = payments
        self._settings = settings
        self._inputs = inputs
        self.known_models = KnownModels()
        self.batch = BatchJobs(self, store)

    def _request_hash(self, spec: JobSpec) -> str:
        # A field left at None is left out, so a job's hash stays as before the field was.
        none = spec.max_prompt_price_wei_per_unit is None
        unset = {"max_prompt_price_wei_per_unit"} if none else set()
        body = spec.model_dump(mode="json", exclude={"idempotency_key", *unset})
        return hashlib.sha256(canonical_json(body)).hexdigest()

    def _validate(self, session: Session, client: Principal, spec: JobSpec) -> None:
        assert spec.model is not None
        models = self.known_models.including(session, spec.type, spec.model)
        if spec.model not in models:
            raise InvalidInput(
                f"unknown {spec.type} model {spec.model!r}; available: {', '.join(sorted(models))}"
            )
        if spec.input_blob is not None:
            self._check_grant(session, client, spec.input_blob)

    @retry_transient
    def submit(
        self, client: Principal, spec: JobSpec, now: float, header_key: str | None = None
    ) -> tuple[JobView, bool]:
        """Create a job; returns (job, created). A repeated idempotency key returns the same job."""
        key = spec.idempotency_key
        if header_key is not None:
            if key is not None and key != header_key:
                raise InvalidInput("the Idempotency-Key header and body idempotency_key differ")
            key = header_key
        spec = self._within_withdraw_delay(spec)
        if self._payments.enabled and spec.max_units is None:
            raise InvalidInput(
                f"{spec.type} jobs here need max_units, the most units you will pay for "
                "(transcode: output pixels, e.g. frames x the sum of width x height)"
            )
        request_hash = self._request_hash(spec)
        if key is not None:
            existing = self._find_by_key(client, key, request_hash)
            if existing is not None:
                return existing, False
        self._check_input(client, spec, now)
        job_id = new_id()
        try:
            with self._store.transaction() as s:
                self._validate(s, client, spec)
                job = Job(**self._new_job_row(job_id, client, spec, key, request_hash, now))
                job.payer_address = self._admit(s, client, spec, now)
                if key is not None and self._payments.enabled:
                    # A concurrent retry with this key may have won while we waited for the
                    # payer lock: hand back its job instead of charging the budget twice.
                    raced = s.scalar(
                        select(Job.id).where(Job.client_id == client.id, Job.idempotency_key == key)
                    )
                    if raced is not None:
                        raise IntegrityError("idempotency key taken", None, ValueError(key))
                s.add(job)
                s.flush()
                submitted = transition_queued(s, job, now)
        except IntegrityError:
            # Two submits raced with one idempotency key: the other one won; return its job.
            if key is None:
                raise
            existing = self._find_by_key(client, key, request_hash)
            if existing is None:
                raise
            return existing, False
        # Built from the rows just committed, not read back: a new job has no worker yet.
        return job_view(job, [submitted], None), True

    def _check_input(self, client: Principal, spec: JobSpec, now: float) -> None:
        """Refuse, before any lease, a client being throttled or an input that cannot work
        (services/inputs.py); a refused input counts against the client (services/throttle)."""
        assert spec.model is not None
        half_life = self._settings.client_input_failure_half_life_s
        with self._store.read() as s:
            row = s.get(Client, client.id)
            assert row is not None
            throttle.check(row, now, self._settings.client_input_failure_limit, half_life)
            if spec.input_blob is not None:
                self._check_grant(s, client, spec.input_blob)
            key = job_input_key(
                client.id, spec.type, spec.model, spec.precision, spec.input_blob, job_spec(spec)
            )
            known = refused_reason(s, key, now)
        problem = known or self._inputs.problem(spec)
        if problem is None:
            return
        with self._store.transaction() as s:
            row = s.get(Client, client.id, with_for_update=True)
            assert row is not None
            throttle.record_input_failure(row, now, half_life)
        raise InvalidInput(problem)

    @staticmethod
    def _check_grant(session: Session, client: Principal, sha256: str) -> None:
        if session.get(BlobGrant, (sha256, client.grant)) is None:
            raise InvalidInput(
                f"input_blob {sha256} is not among your blobs; upload it first with POST /v1/blobs"
            )

    @staticmethod
    def _new_job_row(
        job_id: str,
        client: Principal,
        spec: JobSpec,
        key: str | None,
        request_hash: str,
        now: float,
    ) -> dict[str, Any]:
        """A new job's columns, queued."""
        assert spec.model is not None
        return {
            "id": job_id,
            "client_id": client.id,
            "idempotency_key": key,
            "request_hash": request_hash,
            "type": spec.type.value,
            "model": spec.model,
            "precision": spec.precision.value,
            "preference": spec.preference.value,
            "spec": job_spec(spec),
            "input_blob": spec.input_blob,
            "max_price_wei_per_unit": spec.max_price_wei_per_unit,
            "max_prompt_price_wei_per_unit": spec.max_prompt_price_wei_per_unit,
            "max_cost_wei": spec.cost_bound_wei(),
            "min_vram_mb": spec.min_vram_mb,
            "max_units": spec.max_units,
            "payer_address": None,
            "state": JobState.QUEUED.value,
            "attempt": 1,
            "max_attempts": spec.max_attempts,
            "excluded_workers": [],
            "deadline_at": now + spec.deadline_s,
            "created_at": now,
            "updated_at": now,
            "units": spec.input.item_count if spec.input is not None else None,
        }

    def _within_withdraw_delay(self, spec: JobSpec) -> JobSpec:
        """A paid job must finish well inside the payer's withdrawal delay, or the payer could
        unlock, withdraw, and leave the worker holding a voucher nothing backs."""
        deployment = self._payments.deployment
        if deployment is None:
            return spec
        limit = deployment.withdraw_delay_s * PAID_DEADLINE_SHARE
        if spec.deadline_s <= limit:
            return spec
        if "deadline_s" in spec.model_fields_set:
            raise InvalidInput(
                f"deadline_s is {spec.deadline_s:g} s; paid jobs here must finish within "
                f"{limit:g} s (half the payer's withdrawal delay)"
            )
        return spec.model_copy(update={"deadline_s": limit})

    def _admit(self, s: Session, client: Principal, spec: JobSpec, now: float) -> str | None:
        """The payer to charge; the client row is locked so two submits cannot both spend
        the same headroom."""
        if not self._payments.enabled:
            return None
        assert spec.max_units is not None  # checked in submit
        row = s.get(Client, client.id)
        assert row is not None
        if row.payer_address is not None:
            # The budget is the payer's, and several clients may share a payer: lock them all
            # (in id order), so no two submits spend the same headroom.
            s.scalars(
                select(Client.id)
                .where(Client.payer_address == row.payer_address)
                .order_by(Client.id)
                .with_for_update()
            ).all()
        bound = spec.cost_bound_wei()
        assert bound is not None
        return self._payments.admit(s, row, bound, now, how=billing.bound_terms(spec))

    def _find_by_key(self, client: Principal, key: str, request_hash: str) -> JobView | None:
        with self._store.read() as s:
            job = s.scalar(
                select(Job).where(Job.client_id == client.id, Job.idempotency_key == key)
            )
            if job is None:
                return None
            if job.request_hash != request_hash:
                raise Conflict(
                    f"idempotency key {key!r} was already used for a different job ({job.id}); "
                    "use a new key for a new job"
                )
            return self._view(s, job)

    def _owned(
        self, session: Session, client: Principal, job_id: str, *, lock: bool, output: bool = True
    ) -> Job:
        """The client's job; with ``output=False`` its output is not loaded (a view does not
        show it, and an embedding's is thousands of numbers to parse)."""
        options = [] if output else [defer(Job.output)]
        job = session.get(Job, job_id, with_for_update=lock, options=options)
        if job is None or job.client_id != client.id or job.kind != "job":
            # Someone else's job is reported as missing, so ids cannot be probed.
            raise NotFound(f"no job {job_id} among your jobs")
        return job

    def _view(self, session: Session, job: Job) -> JobView:
        events = list(
            session.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id))
        )
        address = session.scalar(select(Worker.address).where(Worker.id == job.worker_id))
        return job_view(job, events, address)

    def get(self, client: Principal, job_id: str) -> JobView:
        with self._store.read() as s:
            return self._view(s, self._owned(s, client, job_id, lock=False, output=False))

    def result(self, client: Principal, job_id: str) -> ResultView:
        with self._store.read() as s:
            job = self._owned(s, client, job_id, lock=False)
            state = JobState(job.state)
            if state is not JobState.SUCCEEDED:
                if state in FINAL_STATES:
                    fault = f"; fault: {job.fault}" if job.fault else ""
                    raise Conflict(
                        f"job is {state} ({job.failure_reason}{fault}); it has no result",
                        fault=job.fault,
                    )
                raise Conflict(
                    f"job is {state}; its result is not ready yet. Poll GET /v1/jobs/{job_id}",
                    state=state,
                )
            address = s.scalar(select(Worker.address).where(Worker.id == job.worker_id))
            batch = s.get(ResultBatch, job.result_batch_id) if job.result_batch_id else None
            return result_view(job, address or "", batch)

    @retry_transient
    def cancel(
        self, client: Principal, job_id: str, now: float, reason: str = "cancelled by the client"
    ) -> JobView:
        """Cancel a job not yet final (``reason``: its failure reason, as the client sees it)."""
        with self._store.transaction() as s:
            job = self._owned(s, client, job_id, lock=True)
            if JobState(job.state) in FINAL_STATES:
                raise Conflict(f"job is already {job.state}; nothing to cancel")
            if job.state == JobState.VERIFYING:
                raise Conflict(
                    "the job's work is done and its result is being verified; nothing to cancel"
                )
            # worker_id stays set: the worker learns of the cancel at its next heartbeat.
            transition(s, job, JobState.CANCELLED, now, detail=reason)
        return self.get(client, job_id)

    def list(
        self,
        client: Principal,
        state: JobState | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobList:
        limit = max(1, min(limit, MAX_LIST_LIMIT))
        query = select(Job).where(Job.client_id == client.id, Job.kind == "job")
        if state is not None:
            query = query.where(Job.state == state)
        if cursor:
            created, last_id = _decode_cursor(cursor)
            query = query.where(
                or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id))
            )
        query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
        with self._store.read() as s:
            rows = list(s.scalars(query))
            page = rows[:limit]
            views = [self._view(s, job) for job in page]
        next_cursor = _encode_cursor(page[-1]) if len(rows) > limit else None
        return JobList(jobs=views, next_cursor=next_cursor)


_NO_COLUMNS: dict[str, None] = dict.fromkeys(a.key for a in Job.__mapper__.column_attrs)


def _unsaved(row: dict[str, Any]) -> Job:
    """A job as ``row`` (inserted by ``insert_rows``) makes it, for its view in the answer:
    every column the row does not set is None, as on an ORM object never flushed, without
    the ORM's instrumentation (building a ``Job`` object per job of a batch cost more than
    inserting them all)."""
    return cast(Job, SimpleNamespace(**{**_NO_COLUMNS, **row}))


def transition_queued(session: Session, job: Job, now: float) -> NewEvent:
    """Record the submission itself as the first event of the job's history."""
    return record_event(
        session, job_id=job.id, attempt=1, state=JobState.QUEUED, detail="submitted", at=now
    )


class BatchJobs:
    """Many jobs in one request: submit (one transaction), and read back together.

    Each job keeps what a single submit gives it (its own idempotency key, input checks, price
    cap and budget admission); what is per request (the client's throttle, the known models
    (``KnownModels``: read again at most once per job type for a batch), the payer's lock, the
    transaction) is done once. Answers keep the order asked.

    Reads of a list of jobs select on the ids alone and check owner, kind and state here:
    with another indexed column in the WHERE clause, SQLite (which keeps no statistics) chose
    that column's index and walked every job of the client (or every succeeded job) for each
    read, a cost that grew with the store and not with the request."""

    def __init__(self, jobs: JobService, store: Store) -> None:
        self._jobs = jobs
        self._store = store

    @retry_transient
    def submit(self, client: Principal, specs: list[JobSpec], now: float) -> list[JobBatchItem]:
        """Create the jobs; each item is the job (``created`` false for a repeated key) or
        its own error. Raises only for the whole request (e.g. 429: the client is throttled)."""
        items: dict[int, JobBatchItem] = {}
        todo: list[_Pending] = []
        for i, spec in enumerate(specs):
            try:
                todo.append(self._prepare(i, spec))
            except GpumarketError as exc:
                items[i] = JobBatchItem(error=item_error(exc))
        todo = self._known(client, todo, items)
        todo = self._inputs_ok(client, todo, items, now)
        try:
            self._create(client, todo, items, now)
        except IntegrityError as exc:
            # A concurrent submit took one of these keys first: take each job on its own,
            # so every key still names exactly one job. Said in the log: any other cause (a
            # column the INSERT left empty) would make every batch ten times slower, unseen.
            log.info(
                "a batch of %d jobs was refused by the store (%s); submitting them one by one",
                len(todo),
                exc.orig,
            )
            for p in todo:
                try:
                    job, created = self._jobs.submit(client, p.spec, now)
                    items[p.index] = JobBatchItem(job=job, created=created)
                except GpumarketError as exc:
                    items[p.index] = JobBatchItem(error=item_error(exc))
        return [items[i] for i in range(len(specs))]

    def _prepare(self, index: int, spec: JobSpec) -> _Pending:
        jobs = self._jobs
        spec = jobs._within_withdraw_delay(spec)
        if jobs._payments.enabled and spec.max_units is None:
            raise InvalidInput(
                f"jobs[{index}]: {spec.type} jobs here need max_units, the most units you will "
                "pay for (transcode: output pixels, e.g. frames x the sum of width x height)"
            )
        return _Pending(index, spec, spec.idempotency_key, jobs._request_hash(spec))

    def _known(
        self, client: Principal, todo: list[_Pending], items: dict[int, JobBatchItem]
    ) -> list[_Pending]:
        """Items whose idempotency key already names a job (in the store, or earlier in this
        batch) get that job; a key reused for another request is the item's 409."""
        keys = [p.key for p in todo if p.key is not None]
        if not keys:
            return todo
        with self._store.read() as s:
            found = {
                job.idempotency_key: job
                for job in s.scalars(
                    select(Job).where(Job.client_id == client.id, Job.idempotency_key.in_(keys))
                )
            }
            views = {k: self._jobs._view(s, job) for k, job in found.items()}
        hashes = {k: job.request_hash for k, job in found.items()}
        left: list[_Pending] = []
        for p in todo:
            if p.key is None:
                left.append(p)
                continue
            if p.key not in hashes:
                hashes[p.key] = p.request_hash
                left.append(p)
                continue
            if hashes[p.key] != p.request_hash:
                taken = views[p.key].id if p.key in views else "another job of this batch"
                items[p.index] = JobBatchItem(
                    error=item_error(
                        Conflict(
                            f"idempotency key {p.key!r} was already used for a different job "
                            f"({taken}); use a new key for a new job"
                        )
                    )
                )
            elif p.key in views:
                items[p.index] = JobBatchItem(job=views[p.key], created=False)
            else:
                p.same_as_earlier = True
                left.append(p)
        return left

    def _inputs_ok(
        self,
        client: Principal,
        todo: list[_Pending],
        items: dict[int, JobBatchItem],
        now: float,
    ) -> list[_Pending]:
        """``JobService._check_input`` for every item, in one read (and one write for those
        refused, each counting against the client as a single refused submit does)."""
        jobs = self._jobs
        settings = jobs._settings
        half_life = settings.client_input_failure_half_life_s
        fresh = [p for p in todo if not p.same_as_earlier]
        problems: dict[int, str] = {}
        with self._store.read() as s:
            row = s.get(Client, client.id)
            assert row is not None
            throttle.check(row, now, settings.client_input_failure_limit, half_life)
            keys: dict[int, str] = {}
            for p in fresh:
                assert p.spec.model is not None
                if p.spec.input_blob is not None:
                    try:
                        jobs._check_grant(s, client, p.spec.input_blob)
                    except InvalidInput as exc:
                        problems[p.index] = exc.detail
                        continue
                keys[p.index] = job_input_key(
                    client.id,
                    p.spec.type,
                    p.spec.model,
                    p.spec.precision,
                    p.spec.input_blob,
                    job_spec(p.spec),
                )
            refused = {
                r.input_key: r
                for r in s.scalars(
                    select(RefusedInput).where(RefusedInput.input_key.in_(set(keys.values())))
                )
            }
            for index, key in keys.items():
                if key in refused and (reason := refused_reason(s, key, now)):
                    problems[index] = reason
        for p in fresh:
            if p.index not in problems and (problem := jobs._inputs.problem(p.spec)) is not None:
                problems[p.index] = problem
        if problems:
            with self._store.transaction() as s:
                locked = s.get(Client, client.id, with_for_update=True)
                assert locked is not None
                for _ in problems:
                    throttle.record_input_failure(locked, now, half_life)
        for index, problem in problems.items():
            items[index] = JobBatchItem(error=item_error(InvalidInput(problem)))
        return [p for p in todo if p.index not in problems]

    def _create(
        self,
        client: Principal,
        todo: list[_Pending],
        items: dict[int, JobBatchItem],
        now: float,
    ) -> None:
        jobs = self._jobs
        made: dict[str, JobView] = {}  # idempotency key -> the job this batch made for it
        rows: list[dict[str, Any]] = []  # one multi-row INSERT (the ORM's flush cost more)
        with self._store.transaction() as s:
            read: set[JobType] = set()  # job types whose known models this batch has read
            for p in todo:
                if p.same_as_earlier:
                    continue
                spec = p.spec
                assert spec.model is not None
                try:
                    known = jobs.known_models.including(
                        s, spec.type, spec.model, read_on_miss=spec.type not in read
                    )
                    if spec.model not in known:
                        read.add(spec.type)
                        raise InvalidInput(
                            f"unknown {spec.type} model {spec.model!r}; "
                            f"available: {', '.join(sorted(known))}"
                        )
                    row = jobs._new_job_row(new_id(), client, spec, p.key, p.request_hash, now)
                    row["payer_address"] = jobs._admit(s, client, spec, now)
                except GpumarketError as exc:
                    items[p.index] = JobBatchItem(error=item_error(exc))
                    continue
                if jobs._payments.enabled:  # the next admission counts this job's budget
                    insert_rows(s.connection(), Job, [row])
                else:
                    rows.append(row)
                job = _unsaved(row)  # only what the answer shows of it
                view = job_view(job, [transition_queued(s, job, now)], None)
                items[p.index] = JobBatchItem(job=view, created=True)
                if p.key is not None:
                    made[p.key] = view
            if rows:
                insert_rows(s.connection(), Job, rows)
        for p in todo:
            if p.same_as_earlier:
                assert p.key is not None
                earlier = made.get(p.key)
                items[p.index] = (
                    JobBatchItem(job=earlier, created=False)
                    if earlier is not None
                    else JobBatchItem(
                        error=item_error(
                            InvalidInput(f"the job with idempotency key {p.key!r} was refused")
                        )
                    )
                )

    def waiting_reasons(self, job_ids: list[str]) -> dict[str, str | None]:
        """Of these jobs, those still queued, with why they wait (one narrow read)."""
        with self._store.read() as s:
            rows = s.execute(
                select(Job.id, Job.waiting_reason, Job.state).where(
                    self._store.among(Job.id, job_ids)
                )
            )
            return {job_id: reason for job_id, reason, state in rows if state == JobState.QUEUED}

    def states(self, client: Principal, job_ids: list[str]) -> list[JobStateItem]:
        """The jobs' states, in the order asked (one narrow read); 404 naming any id that is
        not yours."""
        with self._store.read() as s:
            found = {
                job_id: state
                for job_id, state, owner, kind in s.execute(
                    select(Job.id, Job.state, Job.client_id, Job.kind).where(
                        self._store.among(Job.id, set(job_ids))
                    )
                )
                if owner == client.id and kind == "job"
            }
        _refuse_missing(job_ids, found)
        return [JobStateItem(id=i, state=JobState(found[i])) for i in job_ids]

    def get(self, client: Principal, job_ids: list[str]) -> list[JobView]:
        """The jobs, in the order asked (one read); 404 naming any id that is not yours."""
        with self._store.read() as s:
            found = {
                job.id: job
                for job in s.scalars(
                    select(Job)
                    .options(defer(Job.output))
                    .where(self._store.among(Job.id, set(job_ids)))
                )
                if job.client_id == client.id and job.kind == "job"
            }
            _refuse_missing(job_ids, found)
            events: dict[str, list[JobEvent]] = {}
            for event in s.scalars(
                select(JobEvent)
                .where(self._store.among(JobEvent.job_id, found))
                .order_by(JobEvent.id)
            ):
                events.setdefault(event.job_id, []).append(event)
            worker_ids = {j.worker_id for j in found.values() if j.worker_id}
            addresses = _addresses(s, worker_ids)
            views = {
                job.id: job_view(job, events.get(job.id, []), addresses.get(job.worker_id or ""))
                for job in found.values()
            }
        return [views[i] for i in job_ids]

    def results(self, client: Principal, job_ids: list[str]) -> list[ResultView]:
        """The signed results of those of the jobs that succeeded (one read), in the order
        asked; the others are left out."""
        with self._store.read() as s:
            # Plain rows, not ORM objects with the other columns deferred: deferring sets a
            # loader on each of them, per object (half of this read's time for no-op jobs).
            done = [
                job
                for job in s.execute(
                    select(*RESULT_COLUMNS).where(self._store.among(Job.id, set(job_ids)))
                )
                if job.client_id == client.id
                and job.kind == "job"
                and job.state == JobState.SUCCEEDED
            ]
            worker_ids = {j.worker_id for j in done if j.worker_id}
            addresses = _addresses(s, worker_ids)
            batch_ids = {j.result_batch_id for j in done if j.result_batch_id}
            batches = {
                b.id: b for b in s.scalars(select(ResultBatch).where(ResultBatch.id.in_(batch_ids)))
            }
            views = {
                j.id: result_view(
                    j,
                    addresses.get(j.worker_id or "", ""),
                    batches.get(j.result_batch_id or ""),
                )
                for j in done
            }
        return [views[i] for i in dict.fromkeys(job_ids) if i in views]


def _refuse_missing(job_ids: list[str], found: Mapping[str, object]) -> None:
    missing = [i for i in dict.fromkeys(job_ids) if i not in found]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise NotFound(f"{len(missing)} of the job_ids are not among your jobs: {shown}")


def _addresses(s: Session, worker_ids: set[str]) -> dict[str, str]:
    rows = s.execute(select(Worker.id, Worker.address).where(Worker.id.in_(worker_ids)))
    return {worker_id: address for worker_id, address in rows}


@dataclass
class _Pending:
    """One spec of a batch on its way to becoming a job."""

    index: int
    spec: JobSpec
    key: str | None
    request_hash: str
    # Its key names a job made earlier in this same batch from the same request.
    same_as_earlier: bool = False


def item_error(exc: GpumarketError) -> ItemError:
    """A batch item's error, as the problem document a single request would have had."""
    return ItemError(status=exc.status, code=exc.code, detail=exc.detail, extra=exc.extra or None)
