"""Blame: whose fault a failed job is, through the real services over a real store.

A worker's "it's the input" is a claim: believed when the orchestrator's own checks agree, when
a second worker says the same, or when nobody else could run the job; refuted (and charged to
the claimant) when another worker completes the job. Tests taking ``any_services`` run over
SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.exceptions import InvalidInput
from orchestrator.services.auth import Principal
from orchestrator.services.inputs import REFUSED_INPUT_TTL_S
from orchestrator.store.models import Client
from orchestrator.wiring import Services
from protocol import FailRequest, Fault, JobSpec, JobState, WorkerView
from tests.conftest import FakeClock
from tests.support import TestWorker, agreed_price, completion, new_client, offer, register

MODEL = "doubler"  # a TorchScript model, as an operator would drop in its models folder
ROWS = [[1.0, 2.0], [3.0, 4.0]]
POLL_S = 10.0


def _submit(services: Services, client: Principal, **fields: Any) -> str:
    spec = {
        "type": "inference",
        "model": MODEL,
        "input": {"tensors": ROWS},
        "max_price_wei_per_unit": 1_000,
        **fields,
    }
    view, created = services.jobs.submit(client, JobSpec.model_validate(spec), services.now())
    assert created
    return view.id


def _worker(services: Services) -> TestWorker:
    return register(services, offers=[offer(MODEL, price=100)])


def _lease(services: Services, worker: TestWorker) -> tuple[str, int] | None:
    """Open a poll for ``worker`` alone, dispatch, claim and start what it got."""
    now = services.now()
    services.leases.open_poll(worker.principal, 1, until=now + POLL_S, now=now)
    services.leases.dispatch(now)
    jobs = services.leases.claim(worker.principal, 1, now)
    services.leases.close_poll(worker.principal, now)
    if not jobs:
        return None
    services.leases.start(worker.principal, jobs[0].job_id, jobs[0].attempt, now)
    return jobs[0].job_id, jobs[0].attempt


def _blame_input(services: Services, worker: TestWorker, job_id: str, attempt: int) -> JobState:
    req = FailRequest(
        attempt=attempt, retryable=False, reason="row 0 has 2 values, wanted 3", fault=Fault.INPUT
    )
    return services.leases.fail(worker.principal, job_id, req, services.now())


def _view(services: Services, worker: TestWorker) -> WorkerView:
    views = services.workers.list(services.now(), include_gone=True)
    return next(v for v in views if v.id == worker.id)


def _input_failures(services: Services, client: Principal) -> float:
    with services.store.read() as s:
        row = s.get(Client, client.id)
        assert row is not None
        return row.input_failures


def test_an_input_claim_confirmed_by_a_second_worker_fails_the_job_and_blames_no_worker(
    any_services: Services,
) -> None:
    services = any_services
    client, _ = new_client(services)
    first, second = _worker(services), _worker(services)
    job_id = _submit(services, client)
    leased = _lease(services, first)
    assert leased == (job_id, 1)

    assert _blame_input(services, first, job_id, 1) is JobState.QUEUED  # not believed yet
    job = services.jobs.get(client, job_id)
    assert (job.state, job.attempt, job.fault) == (JobState.QUEUED, 2, None)
    assert _lease(services, first) is None  # the claimant cannot confirm its own claim
    assert _lease(services, second) == (job_id, 2)
    assert _blame_input(services, second, job_id, 2) is JobState.FAILED

    job = services.jobs.get(client, job_id)
    assert (job.state, job.fault) == (JobState.FAILED, Fault.INPUT)
    assert job.failure_reason is not None
    assert "row 0 has 2 values" in job.failure_reason
    assert f"confirmed by a second worker, {first.address}" in job.failure_reason
    for worker in (first, second):
        view = _view(services, worker)
        assert (view.jobs_failed, view.reputation) == (0, 0.5)  # untouched: a new worker's 0.5
    assert _input_failures(services, client) == 1.0  # the client's, not the workers'


def test_a_false_input_claim_is_charged_to_the_claimant_when_another_worker_completes(
    any_services: Services,
) -> None:
    services = any_services
    client, _ = new_client(services)
    liar, honest = _worker(services), _worker(services)
    job_id = _submit(services, client, max_attempts=1)
    assert _lease(services, liar) == (job_id, 1)

    assert _blame_input(services, liar, job_id, 1) is JobState.QUEUED
    # The confirmation run is the market's: the client's one attempt is not its last.
    assert _lease(services, honest) == (job_id, 2)
    output = {"outputs": [[2.0, 4.0], [6.0, 8.0]]}
    req = completion(
        honest,
        job_id,
        2,
        output,
        units=len(ROWS),
        price_wei_per_unit=agreed_price(services, job_id),
    )
    services.leases.complete(honest.principal, job_id, req, services.now())

    job = services.jobs.get(client, job_id)
    assert (job.state, job.fault) == (JobState.SUCCEEDED, None)
    assert _view(services, liar).jobs_failed == 1
    assert _view(services, liar).reputation < 0.5 < _view(services, honest).reputation
    assert _input_failures(services, client) == 0.0


def test_a_lone_workers_input_claim_stands_unconfirmed_without_blame(services: Services) -> None:
    client, _ = new_client(services)
    alone = _worker(services)
    register(services, offers=[offer("another-model")])  # cannot run this job: not a witness
    register(services, offers=[offer(MODEL, price=5_000)])  # above the job's price: neither
    job_id = _submit(services, client)
    assert _lease(services, alone) == (job_id, 1)

    assert _blame_input(services, alone, job_id, 1) is JobState.FAILED

    job = services.jobs.get(client, job_id)
    assert job.fault is Fault.INPUT
    assert job.failure_reason is not None
    assert "not confirmed: no other worker can run this job" in job.failure_reason
    assert _view(services, alone).jobs_failed == 0


def test_an_input_once_confirmed_bad_is_refused_at_submit_and_confirms_later_claims(
    services: Services, clock: FakeClock
) -> None:
    client, _ = new_client(services)
    first, second = _worker(services), _worker(services)
    job_id = _submit(services, client)
    clock.advance(1)
    twin = _submit(services, client, max_price_wei_per_unit=999)  # the same input, later
    assert _lease(services, first) == (job_id, 1)
    _blame_input(services, first, job_id, 1)
    assert _lease(services, second) == (job_id, 2)
    assert _blame_input(services, second, job_id, 2) is JobState.FAILED  # confirmed

    # The twin's claim needs no second worker now: the orchestrator knows this input.
    assert _lease(services, first) == (twin, 1)
    assert _blame_input(services, first, twin, 1) is JobState.FAILED
    job = services.jobs.get(client, twin)
    assert (job.attempt, job.fault) == (1, Fault.INPUT)
    assert "the orchestrator's check agrees: this input already failed" in (
        job.failure_reason or ""
    )
    # And the same input is now refused before any worker sees it.
    with pytest.raises(InvalidInput, match="this input already failed"):
        _submit(services, client, max_price_wei_per_unit=5)
    assert (_view(services, first).jobs_failed, _view(services, second).jobs_failed) == (0, 0)
    assert _input_failures(services, client) == pytest.approx(3.0, rel=1e-3)
    # Only for this client, and only for a while: colluding workers can hold up no one else.
    other, _ = new_client(services, "other")
    _submit(services, other)
    clock.advance(REFUSED_INPUT_TTL_S + 1)
    _submit(services, client)


def test_a_worker_fault_costs_the_worker_and_says_so(services: Services) -> None:
    client, _ = new_client(services)
    worker = _worker(services)
    job_id = _submit(services, client)
    assert _lease(services, worker) == (job_id, 1)
    req = FailRequest(attempt=1, retryable=False, reason="CUDA error: device lost")

    assert services.leases.fail(worker.principal, job_id, req, services.now()) is JobState.FAILED

    job = services.jobs.get(client, job_id)
    assert job.fault is Fault.WORKER
    assert _view(services, worker).jobs_failed == 1
    assert _view(services, worker).reputation < 0.5
    assert _input_failures(services, client) == 0.0


def test_nobodys_fault_costs_nobody_even_when_the_attempts_run_out(
    services: Services, clock: FakeClock
) -> None:
    client, _ = new_client(services)
    worker = _worker(services)
    job_id = _submit(services, client, max_attempts=1)
    assert _lease(services, worker) == (job_id, 1)
    req = FailRequest(
        attempt=1, retryable=True, reason="the orchestrator's disk is full", fault=Fault.NONE
    )

    assert services.leases.fail(worker.principal, job_id, req, services.now()) is JobState.FAILED

    assert services.jobs.get(client, job_id).fault is Fault.NONE
    assert (_view(services, worker).jobs_failed, _view(services, worker).reputation) == (0, 0.5)


@pytest.mark.parametrize(
    ("retryable", "fault"), [(True, Fault.INPUT), (False, Fault.NONE)], ids=["input", "none"]
)
def test_a_fault_that_contradicts_retryable_is_refused(retryable: bool, fault: Fault) -> None:
    with pytest.raises(ValueError, match="retryable"):
        FailRequest(attempt=1, retryable=retryable, reason="x", fault=fault)
