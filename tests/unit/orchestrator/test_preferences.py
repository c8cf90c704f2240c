"""Efficiency-aware matching through the services: the same job, different preferences,
different workers, decided by prices, *measured* throughput and energy, and grid intensity.

Three workers learn their figures the way production does, from their own completions:
- "cheap":  asks 10 wei/text, slow (2 texts/s), 5 J/text on a coal-heavy grid (800 g/kWh);
- "fast":   asks 80 wei/text, 400 texts/s, 4 J/text at 450 g/kWh;
- "green":  asks 60 wei/text, 40 texts/s, 2 J/text on a hydro grid (20 g/kWh).
"""

from __future__ import annotations

import pytest

from orchestrator.wiring import Services
from protocol import JobSpec
from tests.conftest import FakeClock
from tests.support import EMBED_MODEL, TestWorker, completion, new_client, offer, register

TEXTS = ["a", "b", "c", "d"]
PROFILES = {
    # name: (price wei/text, seconds per job of 4 texts, joules per job, gCO2/kWh)
    "cheap": (10, 2.0, 20.0, 800.0),
    "fast": (80, 0.01, 16.0, 450.0),
    "green": (60, 0.1, 8.0, 20.0),
}


def _spec(preference: str) -> JobSpec:
    return JobSpec.model_validate(
        {
            "type": "inference",
            "model": EMBED_MODEL,
            "input": {"texts": TEXTS},
            "max_price_wei_per_unit": 100,
            "preference": preference,
        }
    )


def _run(services: Services, worker: TestWorker, job_id: str, name: str) -> None:
    _, seconds, joules, _ = PROFILES[name]
    now = services.now()
    [leased] = services.leases.claim(worker.principal, 1, now)
    assert leased.job_id == job_id
    output = {"embeddings": [[1.0, 0.0]] * len(TEXTS)}
    req = completion(
        worker,
        job_id,
        leased.attempt,
        output,
        len(TEXTS),
        seconds,
        joules,
        price_wei_per_unit=leased.price_wei_per_unit,
    )
    services.leases.complete(worker.principal, job_id, req, now)


@pytest.fixture
def market(services: Services, clock: FakeClock) -> dict[str, TestWorker]:
    workers = {
        name: register(services, offers=[offer(price=price)], carbon_intensity=intensity)
        for name, (price, _, _, intensity) in PROFILES.items()
    }
    client, _ = new_client(services)
    # Each worker completes one job alone, so the orchestrator measures it.
    for name, worker in workers.items():
        services.leases.open_poll(worker.principal, 1, clock() + 30, clock())
        job, _ = services.jobs.submit(client, _spec("balanced"), clock())
        services.leases.dispatch(clock())
        _run(services, worker, job.id, name)
        services.leases.close_poll(worker.principal, clock())
    return workers


@pytest.mark.parametrize(
    ("preference", "expected"), [("cost", "cheap"), ("speed", "fast"), ("green", "green")]
)
def test_the_preference_picks_the_cheapest_fastest_or_greenest_worker(
    services: Services,
    market: dict[str, TestWorker],
    clock: FakeClock,
    preference: str,
    expected: str,
) -> None:
    client, _ = new_client(services, "shopper")
    names = {w.id: name for name, w in market.items()}
    for seed_round in range(5):  # robust to the random pick among near-equal workers
        for worker in market.values():
            services.leases.open_poll(worker.principal, 1, clock() + 30, clock())
        job, _ = services.jobs.submit(client, _spec(preference), clock())
        assigned = dict(services.leases.dispatch(clock()))
        assert names[assigned[job.id]] == expected, (preference, seed_round)
        _run(services, market[expected], job.id, expected)


def test_every_result_reports_cost_energy_and_estimated_co2(
    services: Services, market: dict[str, TestWorker], clock: FakeClock
) -> None:
    client, _ = new_client(services, "reader")
    for worker in market.values():
        services.leases.open_poll(worker.principal, 1, clock() + 30, clock())
    job, _ = services.jobs.submit(client, _spec("green"), clock())
    services.leases.dispatch(clock())
    _run(services, market["green"], job.id, "green")
    result = services.jobs.result(client, job.id)
    assert int(result.cost_wei) == 60 * len(TEXTS)
    assert result.energy_j == 8.0 and result.energy_source == "estimate"
    # 8 J = 8 / 3.6e6 kWh at 20 g/kWh
    assert result.co2_g == pytest.approx(8.0 / 3_600_000 * 20.0)
    assert services.jobs.get(client, job.id).co2_g == result.co2_g
