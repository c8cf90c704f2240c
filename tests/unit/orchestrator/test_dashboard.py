"""The dashboard service over each store: exact wei sums and bucketed series on SQLite (wei as
text) and PostgreSQL (NUMERIC)."""

from __future__ import annotations

from orchestrator.services.auth import Principal
from orchestrator.store.models import Job, LedgerEntry, Redemption
from orchestrator.wiring import Services
from protocol import JobSpec
from protocol.generation import StreamChunk
from tests.conftest import FakeClock
from tests.support import EMBED_MODEL, TestWorker, completion, new_client, offer, register

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


LLM = "SmolLM2-135M-Instruct"
TOKEN_PRICE = 7  # wei per token


def _generate(
    services: Services,
    clock: FakeClock,
    client: Principal,
    worker: TestWorker,
    *,
    lease_after_s: float,
    first_text_after_s: float,
    result_after_s: float | None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
) -> str:
    """A generate job through the services: submitted now, leased, its first text streamed
    and its result reported at the given seconds after submission (no result: still running).
    Leaves the clock at the last of those instants."""
    spec = JobSpec.model_validate(
        {
            "type": "generate",
            "model": LLM,
            "generation": {"prompt": "Hello", "max_tokens": 16},
            "max_price_wei_per_unit": TOKEN_PRICE,
        }
    )
    job, _ = services.jobs.submit(client, spec, services.now())
    clock.advance(lease_after_s)  # the lease is the start (started_at)
    now = services.now()
    services.leases.open_poll(worker.principal, 1, until=now + 10, now=now)
    services.leases.dispatch(now)
    [leased] = services.leases.claim(worker.principal, 1, now)
    clock.advance(first_text_after_s - lease_after_s)
    chunk = StreamChunk(attempt=1, seq=0, text="hi", tokens=1)
    services.streams.append(worker.principal, job.id, chunk, services.now())
    if result_after_s is None:
        return job.id
    clock.advance(result_after_s - first_text_after_s)
    output = {
        "text": "hi there",
        "token_ids": list(range(completion_tokens)),
        "finish_reason": "length",
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }
    req = completion(
        worker,
        job.id,
        1,
        output,
        units=prompt_tokens + completion_tokens,
        price_wei_per_unit=leased.price_wei_per_unit,
        prompt_price_wei_per_unit=leased.prompt_price_wei_per_unit,
    )
    services.leases.complete(worker.principal, job.id, req, services.now())
    return job.id


def test_generation_figures_over_the_window(any_services: Services, clock: FakeClock) -> None:
    services = any_services
    client, _ = new_client(services)
    worker = register(
        services,
        offers=[offer(LLM, price=TOKEN_PRICE, job_type="generate", context_tokens=8192)],
        max_concurrency=4,
    )
    window_s, bucket_s = 300, 60

    empty = services.dashboard.snapshot(services.now(), window_s=window_s, bucket_s=bucket_s)
    gen = empty.generation
    assert (gen.jobs, gen.prompt_tokens, gen.completion_tokens, gen.first_token_jobs) == (0,) * 4
    assert gen.completion_tokens_per_s is None
    assert gen.first_token_p50_s is None and gen.first_token_p99_s is None

    # Long before the window: neither its tokens nor its first text count.
    _generate(
        services,
        clock,
        client,
        worker,
        lease_after_s=1,
        first_text_after_s=2,
        result_after_s=5,
        prompt_tokens=50,
        completion_tokens=16,
    )
    clock.advance(2 * window_s)
    # In the window: 4 s running, 8 completion tokens; 2 s running, 4 of them; one still going.
    _generate(
        services,
        clock,
        client,
        worker,
        lease_after_s=0.5,
        first_text_after_s=1.5,
        result_after_s=4.5,
        prompt_tokens=3,
        completion_tokens=8,
    )
    clock.advance(10)
    _generate(
        services,
        clock,
        client,
        worker,
        lease_after_s=0.25,
        first_text_after_s=0.75,
        result_after_s=2.25,
        prompt_tokens=5,
        completion_tokens=4,
    )
    clock.advance(10)
    _generate(
        services,
        clock,
        client,
        worker,
        lease_after_s=1,
        first_text_after_s=3,
        result_after_s=None,
    )

    board = services.dashboard.snapshot(services.now(), window_s=window_s, bucket_s=bucket_s)

    gen = board.generation
    assert gen.since == board.series.buckets[0].start
    assert (gen.jobs, gen.prompt_tokens, gen.completion_tokens) == (2, 3 + 5, 8 + 4)
    assert gen.completion_tokens_per_s == (8 + 4) / (4.0 + 2.0)
    # time to first token of the three in the window: 0.75, 1.5 and 3 s
    assert gen.first_token_jobs == 3
    assert (gen.first_token_p50_s, gen.first_token_p99_s) == (1.5, 3.0)
    assert board.totals.jobs_by_state["succeeded"] == 3  # the old one is still in the totals
