"""Dispatch, leases and the job state machine, through the real services over a real store.

Time is a ``FakeClock``: leases expire because the test moves the clock, never by sleeping.
Tests that take ``any_services`` run once over SQLite and once over PostgreSQL.
"""

from __future__ import annotations

import hashlib
import random
import threading
from typing import Any

import pytest
from eth_account import Account
from sqlalchemy import select, text

from orchestrator.config import Settings
from orchestrator.exceptions import BadSignature, Conflict, Forbidden, InvalidInput
from orchestrator.services import billing
from orchestrator.services import jobs as jobs_module
from orchestrator.services.auth import Principal
from orchestrator.services.leases import DISPATCH_COLUMNS, POLL_TTL_S, LeaseService
from orchestrator.store import Store
from orchestrator.store.models import Job
from orchestrator.wiring import Services, build_services
from protocol import (
    CompleteRequest,
    FailRequest,
    JobRef,
    JobSpec,
    JobState,
    JobType,
    LeasedJob,
    ResultView,
    WorkerView,
)
from protocol.signing import output_sha256, sign_result
from tests.conftest import FakeClock
from tests.support import (
    EMBED_MODEL,
    TestWorker,
    agreed_price,
    completion,
    new_client,
    offer,
    register,
)

TEXTS = ["first text", "second text", "third text"]
POLL_S = 10.0


# --- helpers -------------------------------------------------------------------------------


def _submit(services: Services, client: Principal, **fields: Any) -> str:
    spec = {
        "type": "inference",
        "model": EMBED_MODEL,
        "input": {"texts": TEXTS},
        "max_price_wei_per_unit": 1_000,
        **fields,
    }
    view, created = services.jobs.submit(client, JobSpec.model_validate(spec), services.now())
    assert created
    return view.id


def _worker(services: Services, price: int = 100, **kwargs: Any) -> TestWorker:
    return register(services, offers=[offer(price=price)], **kwargs)


def _poll(services: Services, *workers: TestWorker, slots: int = 1) -> None:
    now = services.now()
    for worker in workers:
        services.leases.open_poll(worker.principal, slots, until=now + POLL_S, now=now)


def _dispatch_to(services: Services, *workers: TestWorker) -> dict[str, str]:
    """Open a poll for each worker, dispatch; returns job id -> worker id."""
    _poll(services, *workers)
    return dict(services.leases.dispatch(services.now()))


def _claim_one(services: Services, worker: TestWorker) -> LeasedJob:
    leased = services.leases.claim(worker.principal, 8, services.now())
    assert len(leased) == 1, leased
    return leased[0]


def _run(services: Services, worker: TestWorker) -> LeasedJob:
    """Claim the one job assigned to ``worker`` and start it."""
    job = _claim_one(services, worker)
    services.leases.start(worker.principal, job.job_id, job.attempt, services.now())
    return job


def _output(tag: float = 0.0) -> dict[str, Any]:
    return {"embeddings": [[tag + i, tag - i] for i in range(len(TEXTS))]}


def _complete(
    services: Services, worker: TestWorker, job: LeasedJob | tuple[str, int], tag: float = 0.0
) -> ResultView:
    job_id, attempt = (job.job_id, job.attempt) if isinstance(job, LeasedJob) else job
    price = agreed_price(services, job_id)
    req = completion(
        worker, job_id, attempt, _output(tag), units=len(TEXTS), price_wei_per_unit=price
    )
    return services.leases.complete(worker.principal, job_id, req, services.now())


def _row(services: Services, job_id: str) -> Job:
    with services.store.read() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def _worker_view(services: Services, worker: TestWorker) -> WorkerView:
    views = services.workers.list(services.now(), include_gone=True)
    return next(v for v in views if v.id == worker.id)


def _expire_lease(services: Services, clock: FakeClock) -> None:
    clock.advance(services.settings.lease_ttl_s + 1)
    report = services.leases.sweep(clock())
    assert report.leases_expired == 1


def _states(services: Services, client: Principal, job_id: str) -> list[tuple[JobState, int]]:
    return [(e.state, e.attempt) for e in services.jobs.get(client, job_id).history]


# --- dispatch and claim --------------------------------------------------------------------


def test_dispatch_only_to_workers_with_an_open_poll_and_a_free_slot(
    services: Services, clock: FakeClock
) -> None:
    client, _ = new_client(services)
    # The three cheap workers would win on price; none of them can take work right now.
    _worker(services, price=10)  # registered, never polls
    full = _worker(services, price=10)
    lapsed = _worker(services, price=10)
    listening = _worker(services, price=100)
    _poll(services, lapsed)
    clock.advance(POLL_S + 1)
    _poll(services, full, slots=0)
    job_id = _submit(services, client)

    assert services.leases.dispatch(clock()) == []
    assert services.jobs.get(client, job_id).state is JobState.QUEUED

    assert _dispatch_to(services, listening) == {job_id: listening.id}
    view = services.jobs.get(client, job_id)
    assert view.state is JobState.ASSIGNED
    assert view.worker_address == listening.address


def test_a_poll_nobody_renews_stops_advertising_within_its_ttl(
    any_services: Services, clock: FakeClock
) -> None:
    """The replica holding a long-poll renews it (claim with poll_until) while it waits; one
    that died does not, and its worker is offered no work past POLL_TTL_S, long before the
    poll's own end."""
    services = any_services
    client, _ = new_client(services)
    renewed, orphaned = _worker(services), _worker(services)
    until = clock() + 60.0
    for worker in (renewed, orphaned):
        services.leases.open_poll(worker.principal, 1, until=until, now=clock())
    for _ in range(3):  # looks a second apart, past the first TTL, for one of them only
        clock.advance(POLL_TTL_S / 2)
        assert services.leases.claim(renewed.principal, 1, clock(), poll_until=until) == []

    jobs = {_submit(services, client), _submit(services, client)}
    [(placed, taker)] = services.leases.dispatch(clock())
    assert taker == renewed.id  # not `orphaned`, whose poll nobody renewed
    [left] = jobs - {placed}
    assert services.jobs.get(client, left).state is JobState.QUEUED

    clock.advance(POLL_TTL_S + 1)  # `renewed`'s replica stopped looking too: nobody is offered
    assert services.leases.dispatch(clock()) == []
    services.leases.open_poll(orphaned.principal, 1, until=clock() + 60.0, now=clock())
    assert services.leases.dispatch(clock()) == [(left, orphaned.id)]  # it polls again


def test_a_poll_that_hands_over_jobs_closes_itself_and_one_without_stays_open(
    any_services: Services, clock: FakeClock
) -> None:
    """start_poll opens, dispatches and claims in one call; jobs found close the poll in the
    claim's own transaction (no separate close), so no more work lands on a worker that is
    not listening. A poll that found nothing stays open and is offered the next job."""
    services = any_services
    client, _ = new_client(services)
    worker = _worker(services, max_concurrency=4)
    first = _submit(services, client)
    until = clock() + 60.0

    [leased] = services.leases.start_poll(worker.principal, 4, until, clock())
    assert leased.job_id == first
    _submit(services, client)
    assert services.leases.dispatch(clock()) == []  # closed: not listening, though 3 slots free

    assert services.leases.start_poll(worker.principal, 3, until, clock()) != []  # polls again
    assert services.leases.start_poll(worker.principal, 2, until, clock()) == []  # nothing yet
    third = _submit(services, client)
    assert services.leases.dispatch(clock()) == [(third, worker.id)]  # still listening
    assert [j.job_id for j in services.leases.claim(worker.principal, 2, clock(), until)] == [third]


def test_jobs_assigned_to_a_poll_that_ended_before_claiming_them_go_with_the_next_poll(
    any_services: Services, clock: FakeClock
) -> None:
    """A poll that ends between dispatch and its claim (the worker hung up) leaves its jobs
    assigned and undelivered: the worker's next poll hands them over at its start, in the
    transaction that would have opened it, and the worker goes away with them (not listening:
    the next job waits for its next poll)."""
    services = any_services
    client, _ = new_client(services)
    worker = _worker(services, max_concurrency=4)
    until = clock() + 60.0
    services.leases.open_poll(worker.principal, 4, until, clock())
    first, second = _submit(services, client), _submit(services, client)
    assert {job for job, _ in services.leases.dispatch(clock())} == {first, second}
    services.leases.close_poll(worker.principal, clock())
    third = _submit(services, client)

    leased = services.leases.start_poll(worker.principal, 4, until, clock())
    assert sorted(j.job_id for j in leased) == sorted([first, second])
    assert services.jobs.get(client, first).state is JobState.RUNNING
    assert services.leases.dispatch(clock()) == []
    assert services.jobs.get(client, third).state is JobState.QUEUED
    assert [j.job_id for j in services.leases.start_poll(worker.principal, 2, until, clock())] == [
        third
    ]


def test_a_model_a_worker_has_just_registered_is_known_to_the_next_submit(
    any_services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Submits remember the known models for a moment (KnownModels); a model not among them
    is read again before it is refused, so a model a worker has just registered is never
    refused, on the single path or the batch one."""
    services = any_services
    client, _ = new_client(services)
    _submit(services, client)  # the known models are read, and remembered
    register(services, offers=[offer(model="new-embedder-a")])
    assert _submit(services, client, model="new-embedder-a")
    register(services, offers=[offer(model="new-embedder-b")])
    spec = JobSpec.model_validate(
        {
            "type": "inference",
            "model": "new-embedder-b",
            "input": {"texts": TEXTS},
            "max_price_wei_per_unit": 1_000,
        }
    )
    [item] = services.jobs.batch.submit(client, [spec], services.now())
    assert item.error is None and item.job is not None
    with pytest.raises(InvalidInput, match="unknown inference model 'nobody-offers-this'"):
        _submit(services, client, model="nobody-offers-this")

    reads: list[JobType] = []
    read = jobs_module.known_models

    def counted(session: Any, job_type: JobType) -> set[str]:
        reads.append(job_type)
        return read(session, job_type)

    monkeypatch.setattr(jobs_module, "known_models", counted)
    unknown = [spec.model_copy(update={"model": f"misspelt-{i}"}) for i in range(20)]
    items = services.jobs.batch.submit(client, unknown, services.now())
    assert all(i.error is not None and "unknown inference model" in i.error.detail for i in items)
    assert len(reads) == 1  # read again once for the batch, not once per unknown model


def test_a_results_output_is_stored_as_the_canonical_json_its_hash_was_checked_over(
    any_services: Services,
) -> None:
    """The output is serialized once: the canonical JSON hashed to check output_sha256 is the
    text the store keeps, so the stored text hashes to the signed digest, and it reads back
    equal to what the worker sent."""
    services = any_services
    client, _ = new_client(services)
    worker = _worker(services)
    job_id = _submit(services, client)
    _dispatch_to(services, worker)
    result = _complete(services, worker, _run(services, worker), tag=0.1)
    with services.store.read() as s:
        query = text("SELECT CAST(output AS TEXT) FROM jobs WHERE id = :id")
        raw = s.execute(query, {"id": job_id}).scalar_one()
    assert hashlib.sha256(raw.encode()).hexdigest() == result.output_sha256
    assert services.jobs.result(client, job_id).output == _output(0.1)


def test_a_dispatch_round_reads_a_generations_max_tokens_without_its_spec(
    any_services: Services,
) -> None:
    """A dispatch round weighs a generate job's prompt and completion prices by its bounds;
    it reads max_tokens in SQL (``billing.MAX_TOKENS``), not the whole spec: the same figure
    as the spec holds, and none for other jobs."""
    services = any_services
    llm = "SmolLM2-135M-Instruct"
    register(services, offers=[offer(), offer(model=llm, job_type="generate")])
    client, _ = new_client(services)
    chat = JobSpec.model_validate(
        {
            "type": "generate",
            "model": llm,
            "generation": {"prompt": "Hello there", "max_tokens": 37},
            "max_price_wei_per_unit": 1_000,
        }
    )
    generate, _ = services.jobs.submit(client, chat, services.now())
    embed = _submit(services, client)
    with services.store.read() as s:
        rows = {
            r.id: r
            for r in s.execute(
                select(*DISPATCH_COLUMNS, Job.spec).where(Job.id.in_([generate.id, embed]))
            )
        }
    assert rows[generate.id].max_tokens == 37 == billing.token_bounds(rows[generate.id])[1]
    assert billing.token_bounds_of(
        "generate", rows[generate.id].max_units, rows[generate.id].max_tokens
    ) == billing.token_bounds(rows[generate.id])
    assert rows[embed].max_tokens is None
    assert billing.token_bounds_of("inference", rows[embed].max_units, None) == (0, 0)


def test_dispatch_never_exceeds_max_concurrency(services: Services, clock: FakeClock) -> None:
    client, _ = new_client(services)
    worker = _worker(services, max_concurrency=2)
    jobs = []
    for _ in range(3):
        jobs.append(_submit(services, client))
        clock.advance(1)  # distinct submission times, so "oldest first" is well defined

    _poll(services, worker, slots=5)  # asks for more than it may run
    assigned = services.leases.dispatch(services.now())

    assert [job_id for job_id, _ in assigned] == jobs[:2]  # oldest first
    assert services.jobs.get(client, jobs[2]).state is JobState.QUEUED
    # Its slots are used up: polling again does not free any.
    assert _dispatch_to(services, worker) == {}


def test_a_round_reads_on_past_queued_jobs_no_free_worker_can_take(
    any_services: Services, clock: FakeClock
) -> None:
    """A round reads queued jobs a few times its free slots at a time (``_queued``); when
    none of them fits a free worker it reads on, after the last one seen (ties on the
    submission time broken by id), and places the job behind them in the same round."""
    services = any_services
    client, _ = new_client(services)
    worker = _worker(services, price=100, max_concurrency=1)
    too_cheap = [_submit(services, client, max_price_wei_per_unit=50) for _ in range(40)]
    clock.advance(1)
    placeable = _submit(services, client)
    with services.store.read() as s:
        reasons = s.scalars(select(Job.waiting_reason).where(Job.id.in_(too_cheap))).all()
    assert reasons == [None] * 40  # so the round meets them first
    _poll(services, worker, slots=1)
    assigned = services.leases.dispatch(services.now())
    assert assigned == [(placeable, worker.principal.id)]
    with services.store.read() as s:
        reasons = s.scalars(select(Job.waiting_reason).where(Job.id.in_(too_cheap))).all()
    assert len(reasons) == 40 and all(r and "above the job's 50" in r for r in reasons)


def test_a_job_is_handed_out_once(services: Services) -> None:
    client, _ = new_client(services)
    worker = _worker(services)
    other = _worker(services)
    job_id = _submit(services, client)
    assert _dispatch_to(services, worker) == {job_id: worker.id}

    leased = _claim_one(services, worker)
    assert (leased.job_id, leased.attempt) == (job_id, 1)
    assert leased.input == {"texts": TEXTS}

    assert services.leases.claim(worker.principal, 8, services.now()) == []
    assert services.leases.claim(other.principal, 8, services.now()) == []


# --- leases: heartbeat, expiry, attempts ---------------------------------------------------


def test_heartbeats_keep_a_lease_alive_past_its_first_expiry(
    any_services: Services, clock: FakeClock
) -> None:
    services = any_services
    client, _ = new_client(services)
    worker = _worker(services)
    job_id = _submit(services, client)
    _dispatch_to(services, worker)
    job = _run(services, worker)
    ttl = services.settings.lease_ttl_s
    first_expiry = clock() + ttl

    for _ in range(4):
        clock.advance(ttl * 2 / 3)
        beat = services.workers.heartbeat(
            worker.principal, [JobRef(job_id=job_id, attempt=1)], clock()
        )
        assert beat.cancel == []
    assert clock() > first_expiry + ttl

    assert services.leases.sweep(clock()).leases_expired == 0
    assert services.jobs.get(client, job_id).state is JobState.RUNNING

    # Once the heartbeats stop, the lease runs out.
    clock.advance(ttl + 1)
    assert services.leases.sweep(clock()).leases_expired == 1
    view = services.jobs.get(client, job_id)
    assert (view.state, view.attempt, job.attempt) == (JobState.QUEUED, 2, 1)


def test_an_expired_lease_requeues_to_another_worker(
    any_services: Services, clock: FakeClock
) -> None:
    services = any_services
    client, _ = new_client(services)
    cheap = _worker(services, price=50)
    dear = _worker(services, price=100)
    job_id = _submit(services, client)
    assert _dispatch_to(services, cheap, dear) == {job_id: cheap.id}
    _run(services, cheap)

    _expire_lease(services, clock)

    view = services.jobs.get(client, job_id)
    assert (view.state, view.attempt) == (JobState.QUEUED, 2)
    assert view.worker_address is None and view.price_wei_per_unit is None
    assert _worker_view(services, cheap).leases_expired == 1
    assert _worker_view(services, dear).leases_expired == 0

    # The cheaper worker lost it, so the job goes to the other one.
    assert _dispatch_to(services, cheap, dear) == {job_id: dear.id}
    leased = _claim_one(services, dear)
    assert (leased.job_id, leased.attempt, leased.price_wei_per_unit) == (job_id, 2, 100)


def test_after_max_attempts_expiries_the_job_fails(
    any_services: Services, clock: FakeClock
) -> None:
    services = any_services
    client, _ = new_client(services)
    workers = [_worker(services) for _ in range(3)]
    job_id = _submit(services, client, max_attempts=2)

    for attempt in (1, 2):
        assigned = _dispatch_to(services, *workers)
        holder = next(w for w in workers if w.id == assigned[job_id])
        assert _run(services, holder).attempt == attempt
        _expire_lease(services, clock)

    view = services.jobs.get(client, job_id)
    assert (view.state, view.attempt) == (JobState.FAILED, 2)
    assert view.failure_reason is not None
    assert "lease expired" in view.failure_reason
    assert "all 2 attempts used" in view.failure_reason
    assert _states(services, client, job_id) == [
        (JobState.QUEUED, 1),
        (JobState.ASSIGNED, 1),
        (JobState.RUNNING, 1),
        (JobState.QUEUED, 1),
        (JobState.ASSIGNED, 2),
        (JobState.RUNNING, 2),
        (JobState.FAILED, 2),
    ]
    # A failed job is not dispatched again, even with a fresh worker listening.
    assert _dispatch_to(services, *workers) == {}


def test_a_completion_from_a_stale_attempt_changes_nothing(
    any_services: Services, clock: FakeClock
) -> None:
    services = any_services
    client, _ = new_client(services)
    slow = _worker(services, price=50)
    fresh = _worker(services, price=100)
    job_id = _submit(services, client)
    _dispatch_to(services, slow, fresh)
    stale = _run(services, slow)
    _expire_lease(services, clock)
    _dispatch_to(services, slow, fresh)
    current = _run(services, fresh)
    assert current.attempt == 2

    # The slow worker finishes attempt 1 while attempt 2 is running elsewhere.
    with pytest.raises(Conflict) as lost:
        _complete(services, slow, stale, tag=1.0)
    assert lost.value.status == 409
    assert lost.value.extra["current_attempt"] == 2
    row = _row(services, job_id)
    assert (row.state, row.attempt, row.worker_id) == (JobState.RUNNING, 2, fresh.id)
    assert (row.output, row.output_sha256, row.cost_wei) == (None, None, None)
    assert _worker_view(services, slow).jobs_succeeded == 0

    result = _complete(services, fresh, current, tag=2.0)
    assert (result.attempt, result.output, result.cost_wei) == (2, _output(2.0), 300)

    # Still refused after the job succeeded, and the result stays attempt 2's.
    with pytest.raises(Conflict):
        _complete(services, slow, stale, tag=1.0)
    kept = services.jobs.result(client, job_id)
    assert (kept.attempt, kept.output, kept.cost_wei) == (2, _output(2.0), 300)
    assert kept.worker_address == fresh.address
    beat = services.workers.heartbeat(slow.principal, [JobRef(job_id=job_id, attempt=1)], clock())
    assert beat.cancel == [JobRef(job_id=job_id, attempt=1)]


# --- completion ----------------------------------------------------------------------------


def test_completing_twice_is_idempotent_and_a_different_output_conflicts(
    services: Services,
) -> None:
    client, _ = new_client(services)
    worker = _worker(services)
    job_id = _submit(services, client)
    _dispatch_to(services, worker)
    job = _run(services, worker)

    first = _complete(services, worker, job)
    again = _complete(services, worker, job)
    assert again == first
    assert _worker_view(services, worker).jobs_succeeded == 1

    with pytest.raises(Conflict, match="another output"):
        _complete(services, worker, job, tag=9.0)
    assert services.jobs.result(client, job_id).output == _output()
    assert [state for state, _ in _states(services, client, job_id)].count(JobState.SUCCEEDED) == 1


def test_the_holder_cannot_complete_an_attempt_it_does_not_hold(services: Services) -> None:
    client, _ = new_client(services)
    worker = _worker(services)
    job_id = _submit(services, client)
    _dispatch_to(services, worker)
    _run(services, worker)

    # Correctly signed for attempt 2, but the lease is for attempt 1.
    with pytest.raises(Conflict, match="stale") as refused:
        _complete(services, worker, (job_id, 2))
    assert refused.value.extra["current_attempt"] == 1
    row = _row(services, job_id)
    assert (row.state, row.attempt, row.output, row.cost_wei) == (JobState.RUNNING, 1, None, None)


def test_a_worker_cannot_complete_a_job_leased_to_another(services: Services) -> None:
    client, _ = new_client(services)
    holder = _worker(services)
    stranger = _worker(services)
    job_id = _submit(services, client)
    _dispatch_to(services, holder)
    job = _run(services, holder)

    with pytest.raises(Forbidden):
        _complete(services, stranger, job)
    with pytest.raises(Forbidden):
        services.leases.fail(
            stranger.principal,
            job_id,
            FailRequest(attempt=1, retryable=False, reason="not mine"),
            services.now(),
        )
    assert _row(services, job_id).state == JobState.RUNNING


def _running_job(services: Services) -> tuple[Principal, TestWorker, LeasedJob]:
    client, _ = new_client(services)
    worker = _worker(services)
    _submit(services, client)
    _dispatch_to(services, worker)
    return client, worker, _run(services, worker)


def _assert_untouched(services: Services, worker: TestWorker, job: LeasedJob) -> None:
    row = _row(services, job.job_id)
    assert (row.state, row.output, row.cost_wei) == (JobState.RUNNING, None, None)
    # The job can still be completed properly afterwards.
    assert _complete(services, worker, job).cost_wei == 300


def test_a_result_signed_by_another_key_is_refused(services: Services) -> None:
    _, worker, job = _running_job(services)
    digest = output_sha256(_output())
    price = job.price_wei_per_unit
    honest = completion(worker, job.job_id, 1, _output(), len(TEXTS), price_wei_per_unit=price)
    forged = honest.model_copy(
        update={
            "signature": sign_result(Account.create().key, job.job_id, 1, digest, len(TEXTS), price)
        }
    )
    with pytest.raises(BadSignature, match="not by this worker's address"):
        services.leases.complete(worker.principal, job.job_id, forged, services.now())
    _assert_untouched(services, worker, job)


def test_a_result_signed_for_another_attempt_is_refused(services: Services) -> None:
    _, worker, job = _running_job(services)
    digest = output_sha256(_output())
    price = job.price_wei_per_unit
    honest = completion(worker, job.job_id, 1, _output(), len(TEXTS), price_wei_per_unit=price)
    replayed = honest.model_copy(
        update={
            "signature": sign_result(worker.account.key, job.job_id, 2, digest, len(TEXTS), price)
        }
    )
    with pytest.raises(BadSignature):
        services.leases.complete(worker.principal, job.job_id, replayed, services.now())
    _assert_untouched(services, worker, job)


def test_a_wrong_output_hash_is_invalid_input(services: Services) -> None:
    _, worker, job = _running_job(services)
    # Correctly signed, but over the hash of some other output.
    other = output_sha256(_output(5.0))
    req = CompleteRequest(
        attempt=1,
        output=_output(),
        output_sha256=other,
        signature=sign_result(
            worker.account.key, job.job_id, 1, other, len(TEXTS), job.price_wei_per_unit
        ),
        duration_s=0.5,
        energy_j=1.0,
        energy_source="estimate",
        units=len(TEXTS),
    )
    with pytest.raises(InvalidInput, match="does not match the output") as refused:
        services.leases.complete(worker.principal, job.job_id, req, services.now())
    assert type(refused.value) is InvalidInput
    _assert_untouched(services, worker, job)


@pytest.mark.parametrize("units", [len(TEXTS) - 1, len(TEXTS) + 1, 0, 10_000_000])
def test_a_signed_bill_for_other_units_is_refused_and_the_job_goes_elsewhere(
    services: Services, units: int
) -> None:
    """Signed by the worker, so no typo: refused, the worker loses reputation (and the job),
    and the job is queued again for another worker, its units unbilled."""
    _, worker, job = _running_job(services)
    before = _worker_view(services, worker).reputation
    req = completion(
        worker, job.job_id, 1, _output(), units=units, price_wei_per_unit=job.price_wei_per_unit
    )
    with pytest.raises(InvalidInput, match=f"units is {units}, but the result holds 3") as refused:
        services.leases.complete(worker.principal, job.job_id, req, services.now())
    assert refused.value.extra == {"derived_units": len(TEXTS)}
    row = _row(services, job.job_id)
    assert (row.state, row.attempt, row.output, row.cost_wei) == (JobState.QUEUED, 2, None, None)
    assert row.excluded_workers == [worker.id]
    view = _worker_view(services, worker)
    assert view.reputation < before and view.jobs_failed == 1


def test_cost_is_units_times_the_workers_offer_not_the_clients_max(any_services: Services) -> None:
    services = any_services
    client, _ = new_client(services)
    price = 10**19 + 7  # past 2**63: wei must stay exact in both stores
    worker = _worker(services, price=price)
    job_id = _submit(services, client, max_price_wei_per_unit=10**21)
    _dispatch_to(services, worker)
    job = _run(services, worker)
    assert job.price_wei_per_unit == price

    result = _complete(services, worker, job)

    assert result.cost_wei == len(TEXTS) * price
    view = services.jobs.get(client, job_id)
    assert (view.price_wei_per_unit, view.units, view.cost_wei) == (
        price,
        len(TEXTS),
        len(TEXTS) * price,
    )
    assert view.max_price_wei_per_unit == 10**21


# --- deadlines, cancels, failures, leaving -------------------------------------------------


def test_a_queued_job_past_its_deadline_expires(services: Services, clock: FakeClock) -> None:
    client, _ = new_client(services)
    job_id = _submit(services, client, deadline_s=60)
    clock.advance(61)

    report = services.leases.sweep(clock())

    assert (report.leases_expired, report.deadlines_passed) == (0, 1)
    view = services.jobs.get(client, job_id)
    assert view.state is JobState.EXPIRED
    assert view.failure_reason == "deadline passed before completion"
    # A worker turning up later does not get it.
    assert _dispatch_to(services, _worker(services)) == {}


def test_dispatch_expires_a_queued_job_past_its_deadline(
    services: Services, clock: FakeClock
) -> None:
    client, _ = new_client(services)
    job_id = _submit(services, client, deadline_s=60)
    clock.advance(61)
    assert _dispatch_to(services, _worker(services)) == {}
    assert services.jobs.get(client, job_id).state is JobState.EXPIRED


def test_a_running_job_past_its_deadline_expires(services: Services, clock: FakeClock) -> None:
    client, _ = new_client(services)
    worker = _worker(services)
    job_id = _submit(services, client, deadline_s=60)
    _dispatch_to(services, worker)
    job = _run(services, worker)
    ref = JobRef(job_id=job_id, attempt=1)
    for _ in range(4):  # the lease stays alive; only the deadline runs out
        clock.advance(20)
        assert services.workers.heartbeat(worker.principal, [ref], clock()).cancel == []

    report = services.leases.sweep(clock())

    assert (report.leases_expired, report.deadlines_passed) == (0, 1)
    assert services.jobs.get(client, job_id).state is JobState.EXPIRED
    assert services.workers.heartbeat(worker.principal, [ref], clock()).cancel == [ref]
    with pytest.raises(Conflict):
        _complete(services, worker, job)
    assert _row(services, job_id).cost_wei is None


def test_a_cancelled_running_job_is_dropped_by_its_worker(
    services: Services, clock: FakeClock
) -> None:
    client, _ = new_client(services)
    worker = _worker(services)
    job_id = _submit(services, client)
    _dispatch_to(services, worker)
    job = _run(services, worker)
    ref = JobRef(job_id=job_id, attempt=1)
    assert services.workers.heartbeat(worker.principal, [ref], clock()).cancel == []

    services.jobs.cancel(client, job_id, clock())

    assert services.workers.heartbeat(worker.principal, [ref], clock()).cancel == [ref]
    with pytest.raises(Conflict):
        _complete(services, worker, job)
    view = services.jobs.get(client, job_id)
    assert (view.state, view.cost_wei) == (JobState.CANCELLED, None)
    assert _row(services, job_id).output is None
    # The slot is free again: a new job reaches the same worker.
    next_job = _submit(services, client)
    assert _dispatch_to(services, worker) == {next_job: worker.id}


def test_a_retryable_failure_requeues_to_another_worker(services: Services) -> None:
    client, _ = new_client(services)
    cheap = _worker(services, price=50)
    dear = _worker(services, price=100)
    job_id = _submit(services, client)
    _dispatch_to(services, cheap, dear)
    _run(services, cheap)

    state = services.leases.fail(
        cheap.principal,
        job_id,
        FailRequest(attempt=1, retryable=True, reason="CUDA out of memory"),
        services.now(),
    )

    assert state is JobState.QUEUED
    assert services.jobs.get(client, job_id).attempt == 2
    assert _dispatch_to(services, cheap, dear) == {job_id: dear.id}
    assert _worker_view(services, cheap).jobs_failed == 0


def test_a_non_retryable_failure_fails_the_job_with_its_reason(services: Services) -> None:
    client, _ = new_client(services)
    worker = _worker(services)
    other = _worker(services)
    job_id = _submit(services, client)
    _dispatch_to(services, worker)
    _run(services, worker)

    state = services.leases.fail(
        worker.principal,
        job_id,
        FailRequest(attempt=1, retryable=False, reason="input text is not valid UTF-8"),
        services.now(),
    )

    assert state is JobState.FAILED
    view = services.jobs.get(client, job_id)
    assert (view.state, view.attempt) == (JobState.FAILED, 1)
    assert view.failure_reason == f"worker {worker.address}: input text is not valid UTF-8"
    assert _worker_view(services, worker).jobs_failed == 1
    assert _dispatch_to(services, worker, other) == {}


def test_deregister_requeues_the_jobs_a_worker_holds(services: Services, clock: FakeClock) -> None:
    client, _ = new_client(services)
    leaving = _worker(services, price=50, max_concurrency=2)
    staying = _worker(services, price=100)
    running_id = _submit(services, client)
    clock.advance(1)
    assigned_id = _submit(services, client)
    _poll(services, leaving, slots=2)
    assert dict(services.leases.dispatch(services.now())) == {
        running_id: leaving.id,
        assigned_id: leaving.id,
    }
    leased = services.leases.claim(leaving.principal, 1, services.now())
    services.leases.start(leaving.principal, leased[0].job_id, 1, services.now())

    assert services.workers.deregister(leaving.principal, services.now()) == 2

    for job_id in (running_id, assigned_id):
        view = services.jobs.get(client, job_id)
        assert (view.state, view.attempt, view.worker_address) == (JobState.QUEUED, 2, None)
    _poll(services, staying)
    assert dict(services.leases.dispatch(services.now())) == {running_id: staying.id}
    assert _worker_view(services, leaving).status == "deregistered"


# --- history -------------------------------------------------------------------------------


def test_history_records_every_transition_in_order(services: Services, clock: FakeClock) -> None:
    client, _ = new_client(services)
    first = _worker(services, price=50)
    second = _worker(services, price=100)
    job_id = _submit(services, client)
    _dispatch_to(services, first, second)
    _run(services, first)
    _expire_lease(services, clock)
    _dispatch_to(services, first, second)
    clock.advance(1)
    job = _run(services, second)
    clock.advance(1)
    _complete(services, second, job)

    history = services.jobs.get(client, job_id).history
    assert [(e.state, e.attempt) for e in history] == [
        (JobState.QUEUED, 1),
        (JobState.ASSIGNED, 1),
        (JobState.RUNNING, 1),
        (JobState.QUEUED, 1),
        (JobState.ASSIGNED, 2),
        (JobState.RUNNING, 2),
        (JobState.SUCCEEDED, 2),
    ]
    assert history[0].detail == "submitted"
    assert history[3].detail is not None and "lease expired" in history[3].detail
    assert first.address in history[3].detail
    times = [e.at for e in history]
    assert times == sorted(times) and times[-1] > times[0]


# --- concurrency ---------------------------------------------------------------------------

RACE_WAIT_S = 2.0  # a bound on waiting for the other thread, not a timing assertion


@pytest.mark.postgres
def test_concurrent_completions_by_one_worker_count_both(
    settings: Settings, postgresql_store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two completions of different jobs by one worker, interleaved, both count.

    Each completion is held just after it has read the worker row until the other one has
    too (or until RACE_WAIT_S, when the row lock keeps the other out, as it should).
    """
    services = build_services(settings, store=postgresql_store, clock=clock, rng=random.Random(7))
    client, _ = new_client(services)
    worker = _worker(services, max_concurrency=2)
    for _ in range(2):
        _submit(services, client)
        clock.advance(1)
    _poll(services, worker, slots=2)
    assert len(services.leases.dispatch(clock())) == 2
    jobs = services.leases.claim(worker.principal, 2, clock())

    both_read = threading.Barrier(2)
    check = LeaseService._check_result

    def held_check(self: LeaseService, *args: Any) -> None:
        check(self, *args)
        try:
            both_read.wait(timeout=RACE_WAIT_S)
        except threading.BrokenBarrierError:
            pass

    monkeypatch.setattr(LeaseService, "_check_result", held_check)
    errors: list[BaseException] = []

    def finish(job: LeasedJob) -> None:
        try:
            _complete(services, worker, job)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=4 * RACE_WAIT_S + 10)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert _worker_view(services, worker).jobs_succeeded == 2


def test_a_lone_worker_gets_its_lost_job_back_after_a_lease_period(
    services: Services, clock: FakeClock
) -> None:
    """Exclusion is a preference, not a ban: with no other worker, the job is not stranded."""
    client, _ = new_client(services)
    job_id = _submit(services, client)
    worker = _worker(services)
    assert _dispatch_to(services, worker) == {job_id: worker.id}
    _run(services, worker)
    _expire_lease(services, clock)

    assert _dispatch_to(services, worker) == {}  # just lost it: not straight back
    clock.advance(services.settings.lease_ttl_s)
    assert _dispatch_to(services, worker) == {job_id: worker.id}
    job = _run(services, worker)
    assert job.attempt == 2
    assert _complete(services, worker, job).state is JobState.SUCCEEDED


def test_a_job_no_worker_can_take_says_why_it_waits(services: Services) -> None:
    client, _ = new_client(services)
    job_id = _submit(services, client, max_price_wei_per_unit=50)
    worker = _worker(services, price=100)
    assert _dispatch_to(services, worker) == {}
    view = services.jobs.get(client, job_id)
    assert view.state is JobState.QUEUED
    assert view.waiting_reason == (
        "no available worker can take it: 1 asks 100 wei/unit, above the job's 50"
    )
    cheap = _worker(services, price=40)
    assert _dispatch_to(services, cheap) == {job_id: cheap.id}
    assert services.jobs.get(client, job_id).waiting_reason is None


def test_unplaceable_jobs_do_not_block_newer_ones(services: Services) -> None:
    """More underpriced jobs than one dispatch round looks at must not starve a good job."""
    client, _ = new_client(services)
    rounds = services.settings.dispatch_batch
    stuck = [_submit(services, client, max_price_wei_per_unit=50) for _ in range(rounds + 1)]
    worker = _worker(services, price=100)
    assert _dispatch_to(services, worker) == {}
    good = _submit(services, client, max_price_wei_per_unit=1_000)
    assert _dispatch_to(services, worker) == {good: worker.id}
    assert all(services.jobs.get(client, j).state is JobState.QUEUED for j in stuck[:3])
