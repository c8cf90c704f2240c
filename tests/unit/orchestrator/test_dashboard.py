"""The dashboard service over each store: exact wei sums and bucketed series on SQLite (wei as
text) and PostgreSQL (NUMERIC)."""

from __future__ import annotations

from orchestrator.store.models import Job, LedgerEntry, Redemption
from orchestrator.wiring import Services
from protocol import JobSpec
from tests.conftest import FakeClock
from tests.support import EMBED_MODEL, completion, new_client, register

BIG = 2**200 + 7  # past any 64-bit integer and any float's exact range
TEXTS = ["one", "two"]


def test_snapshot_sums_wei_exactly_and_buckets_by_time(
    any_services: Services, clock: FakeClock
) -> None:
    services = any_services
    client, _ = new_client(services)
    worker = register(services)
    spec = JobSpec.model_validate(
        {
            "type": "inference",
            "model": EMBED_MODEL,
            "input": {"texts": TEXTS},
            "max_price_wei_per_unit": 1_000,
        }
    )
    job, _ = services.jobs.submit(client, spec, services.now())
    now = services.now()
    services.leases.open_poll(worker.principal, 1, until=now + 10, now=now)
    services.leases.dispatch(now)
    [leased] = services.leases.claim(worker.principal, 1, now)
    clock.advance(2.5)
    req = completion(
        worker,
        leased.job_id,
        1,
        {"embeddings": [[1.0], [2.0]]},
        units=2,
        price_wei_per_unit=leased.price_wei_per_unit,
    )
    services.leases.complete(worker.principal, leased.job_id, req, services.now())
    with services.store.transaction() as s:
        for attempt, age_s in [(1, 0.0), (2, 90.0)]:
            s.add(
                LedgerEntry(
                    job_id=job.id,
                    attempt=attempt,
                    payer="0x" + "ab" * 20,
                    payee=worker.address,
                    amount_wei=BIG,
                    created_at=services.now() - age_s,
                )
            )
        s.add(
            Redemption(
                tx_hash="0x" + "01" * 32,
                log_index=0,
                payer="0x" + "ab" * 20,
                payee=worker.address,
                cumulative_wei=BIG,
                paid_wei=BIG - 1,
                fee_wei=1,
                block_number=1,
                block_hash="0x" + "02" * 32,
                confirmed=True,
            )
        )

    board = services.dashboard.snapshot(services.now(), window_s=300, bucket_s=60)

    [w] = board.workers
    assert (w.settled_wei, w.redeemed_wei, w.billed_wei) == (2 * BIG, BIG - 1, 2 * 100)
    assert board.totals.wei_settled_total == 2 * BIG and board.totals.ledger_entries == 2
    assert board.totals.wei_redeemed_total == BIG - 1
    [j] = board.jobs
    assert (j.state, j.latency_s, j.cost_wei, j.worker_address) == (
        "succeeded",
        2.5,
        200,
        worker.address,
    )
    buckets = board.series.buckets
    assert len(buckets) == 5 and buckets[-1].start.timestamp() <= services.now()
    assert [b.wei_settled for b in buckets] == [0, 0, BIG, 0, BIG]
    assert [b.jobs_succeeded for b in buckets] == [0, 0, 0, 0, 1]
    assert board.model_dump(mode="json")["totals"]["wei_settled_total"] == str(2 * BIG)


def test_a_worker_that_left_stays_while_it_has_a_record_and_checks_are_not_client_jobs(
    any_services: Services, clock: FakeClock
) -> None:
    services = any_services
    client, _ = new_client(services)
    earner, idle = register(services), register(services)
    spec = JobSpec.model_validate(
        {
            "type": "inference",
            "model": EMBED_MODEL,
            "input": {"texts": TEXTS},
            "max_price_wei_per_unit": 1_000,
        }
    )
    job, _ = services.jobs.submit(client, spec, services.now())
    now = services.now()
    services.leases.open_poll(earner.principal, 1, until=now + 10, now=now)
    services.leases.dispatch(now)
    [leased] = services.leases.claim(earner.principal, 1, now)
    req = completion(
        earner,
        leased.job_id,
        1,
        {"embeddings": [[1.0], [2.0]]},
        units=2,
        price_wei_per_unit=leased.price_wei_per_unit,
    )
    services.leases.complete(earner.principal, leased.job_id, req, services.now())
    with services.store.transaction() as s:  # a verification re-run, queued
        s.add(
            Job(
                id="check-1",
                client_id=client.id,
                kind="check",
                parent_id=job.id,
                request_hash="x",
                type="inference",
                model=EMBED_MODEL,
                precision="fp32",
                preference="balanced",
                spec={},
                max_price_wei_per_unit=1_000,
                state="queued",
                attempt=1,
                max_attempts=3,
                excluded_workers=[],
                deadline_at=now + 60,
                created_at=now,
                updated_at=now,
            )
        )
    for worker in (earner, idle):
        services.workers.deregister(worker.principal, services.now())

    board = services.dashboard.snapshot(services.now())

    [gone] = board.workers  # the idle one left nothing to show
    assert (gone.address, gone.status, gone.online) == (earner.address, "deregistered", False)
    assert gone.billed_wei == 200 and gone.jobs_succeeded == 1
    assert (board.totals.workers_registered, board.totals.workers_online) == (0, 0)
    assert board.totals.jobs_by_state["succeeded"] == 1
    assert board.totals.jobs_by_state["queued"] == 0 and board.totals.queue_depth == 0
    assert board.totals.energy_j_total == board.totals.energy_j_estimated == 2.0
