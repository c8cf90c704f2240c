"""GET /metrics: the market's figures in the Prometheus text format, read from the store.

Jobs run through the real API over a fake clock, once over SQLite and once over PostgreSQL;
the scrape is parsed with prometheus_client's own parser and checked against what happened.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from orchestrator.app import create_app
from orchestrator.metrics import render
from orchestrator.services.metrics import LATENCY_BUCKETS_S, read_market_snapshot
from orchestrator.store.models import LedgerEntry, Redemption
from tests.api.conftest import Api, HttpWorker, RunApi
from tests.conftest import FakeClock
from tests.support import agreed_price, completion, offer

PRICE_WEI = 100  # per text, the workers' offer
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(api: Api) -> Samples:
    resp = await api.http.get("/metrics")  # no credentials: scrapers carry none
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version="), resp.headers
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def bucket(samples: Samples, name: str, kind: str, le: float) -> float:
    return value(samples, f"{name}_bucket", type=kind, le=floatToGoString(le))


async def start(api: Api, worker: HttpWorker, job_id: str) -> None:
    resp = await api.http.post(
        f"/v1/workers/jobs/{job_id}/start", json={"attempt": 1}, headers=worker.headers
    )
    assert resp.status_code == 204, resp.text


async def complete(
    api: Api, worker: HttpWorker, job_id: str, units: int, energy_j: float
) -> dict[str, Any]:
    output = {"embeddings": [[0.5, -0.25]] * units}
    price = agreed_price(api.services, job_id)
    req = completion(
        worker.signer(), job_id, 1, output, units, energy_j=energy_j, price_wei_per_unit=price
    )
    resp = await api.http.post(
        f"/v1/workers/jobs/{job_id}/complete",
        json=req.model_dump(mode="json"),
        headers=worker.headers,
    )
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def lease_one(api: Api, worker: HttpWorker, job_id: str) -> None:
    assert [j["job_id"] for j in await api.lease(worker)] == [job_id]


def test_metrics_start_at_zero_and_stay_out_of_the_api_schema(run_any_api: RunApi) -> None:
    async def body(api: Api) -> None:
        samples = await scrape(api)
        jobs = {k: v for k, v in samples.items() if k[0] == "gpumarket_jobs"}
        states = {"queued", "assigned", "running", "succeeded", "failed", "cancelled", "expired"}
        # every (state, type) pair is there from the start, so rates never see a gap
        assert {dict(labels)["state"] for _, labels in jobs} >= states
        assert {dict(labels)["type"] for _, labels in jobs} == {
            "inference",
            "transcode",
            "generate",
        }
        assert set(jobs.values()) == {0.0}
        assert value(samples, "gpumarket_queue_depth") == 0
        assert value(samples, "gpumarket_workers_online") == 0
        assert value(samples, "gpumarket_wei_owed_total") == 0
        for kind in ("inference", "transcode", "generate"):
            assert value(samples, "gpumarket_job_latency_seconds_count", type=kind) == 0
            assert bucket(samples, "gpumarket_dispatch_latency_seconds", kind, math.inf) == 0
        assert value(samples, "gpumarket_generated_tokens_total") == 0
        assert bucket(samples, "gpumarket_time_to_first_token_seconds", "generate", math.inf) == 0

        schema = (await api.http.get("/openapi.json")).json()
        assert "/metrics" not in schema["paths"]
        assert "/healthz" in schema["paths"]  # the check above can fail

        # apps in one process get registries of their own (no clash on metric names)
        apps = [create_app(api.services.settings, services=api.services) for _ in range(2)]
        registries = [app.state.metrics_registry for app in apps]
        assert registries[0] is not registries[1]
        assert [render(r) for r in registries] == [render(registries[0])] * 2

    run_any_api(body)


def test_metrics_count_jobs_workers_money_energy_and_latency(
    run_any_api: RunApi, clock: FakeClock
) -> None:
    async def body(api: Api) -> None:
        t0 = clock()
        client = await api.new_client()
        worker = await api.register_worker(offers=[offer(price=PRICE_WEI)])
        await api.register_worker()  # never seen again: offline once the lease TTL passes
        gone = await api.register_worker()
        resp = await api.http.post("/v1/workers/deregister", headers=gone.headers)
        assert resp.status_code == 200, resp.text

        # A: dispatched 3 s after submission, result 7 s after it, 2 texts
        a = (await api.submit(client))["id"]
        clock.advance(3)
        await lease_one(api, worker, a)
        await start(api, worker, a)
        clock.advance(4)
        assert (await complete(api, worker, a, units=2, energy_j=1.5))["cost_wei"] == "200"

        # B: dispatched after 0.2 s, result after 40.2 s, 5 texts
        b = (await api.submit(client, input={"texts": ["x"] * 5}))["id"]
        clock.advance(0.2)
        await lease_one(api, worker, b)
        await start(api, worker, b)
        clock.advance(40)
        assert (await complete(api, worker, b, units=5, energy_j=2.25))["cost_wei"] == "500"

        # C: started after 1 s, then given up for good; D: too cheap for anyone, stays queued
        c = (await api.submit(client))["id"]
        clock.advance(1)
        await lease_one(api, worker, c)
        await start(api, worker, c)
        resp = await api.http.post(
            f"/v1/workers/jobs/{c}/fail",
            json={"attempt": 1, "retryable": False, "reason": "input is not text"},
            headers=worker.headers,
        )
        assert resp.status_code == 200 and resp.json()["state"] == "failed", resp.text
        await api.submit(client, max_price_wei_per_unit="1")
        assert clock() - t0 > api.services.settings.lease_ttl_s

        samples = await scrape(api)
        expected_jobs = {("succeeded", "inference"): 2, ("failed", "inference"): 1}
        expected_jobs[("queued", "inference")] = 1
        for (name, labels), count in samples.items():
            if name == "gpumarket_jobs":
                key = (dict(labels)["state"], dict(labels)["type"])
                assert count == expected_jobs.get(key, 0), key
        assert value(samples, "gpumarket_queue_depth") == 1
        # C's worker said nothing of whose fault: a worker's, by default.
        assert value(samples, "gpumarket_jobs_failed", type="inference", fault="worker") == 1
        assert value(samples, "gpumarket_jobs_failed", type="inference", fault="input") == 0
        assert value(samples, "gpumarket_workers_registered") == 2
        assert value(samples, "gpumarket_workers_online") == 1
        assert value(samples, "gpumarket_job_cost_wei_total", type="inference") == 700
        assert value(samples, "gpumarket_job_cost_wei_total", type="transcode") == 0
        assert value(samples, "gpumarket_energy_joules_total", type="inference") == 3.75
        assert value(samples, "gpumarket_energy_joules_total", type="transcode") == 0

        latency = "gpumarket_job_latency_seconds"
        assert value(samples, f"{latency}_count", type="inference") == 2
        assert value(samples, f"{latency}_sum", type="inference") == pytest.approx(47.2, abs=1e-5)
        assert [bucket(samples, latency, "inference", le) for le in (5.0, 10.0, 30.0, 60.0)] == [
            0,
            1,
            1,
            2,
        ]
        assert bucket(samples, latency, "inference", math.inf) == 2
        dispatch = "gpumarket_dispatch_latency_seconds"
        assert value(samples, f"{dispatch}_count", type="inference") == 3
        assert value(samples, f"{dispatch}_sum", type="inference") == pytest.approx(4.2, abs=1e-5)
        assert [bucket(samples, dispatch, "inference", le) for le in (0.1, 0.25, 1.0, 5.0)] == [
            0,
            1,
            2,
            3,
        ]
        assert value(samples, f"{dispatch}_count", type="transcode") == 0
        # cumulative buckets never decrease
        counts = [bucket(samples, dispatch, "inference", le) for le in LATENCY_BUCKETS_S]
        assert counts == sorted(counts)

    run_any_api(body)


def test_wei_totals_are_exact_past_float_precision(run_any_api: RunApi, clock: FakeClock) -> None:
    """Ledger and redemption sums are Python ints from the store (SQLite keeps wei as text);
    only the Prometheus sample is a float."""
    big = 2**70 + 1  # not a float: float(big) == 2**70

    async def body(api: Api) -> None:
        client = await api.new_client()
        worker = await api.register_worker()
        job_id = (await api.submit(client))["id"]
        await lease_one(api, worker, job_id)
        await complete(api, worker, job_id, units=2, energy_j=1.0)
        payer, payee = "0x" + "11" * 20, worker.address
        with api.services.store.transaction() as s:
            for attempt, amount in [(1, big), (2, big + 1)]:
                s.add(
                    LedgerEntry(
                        job_id=job_id,
                        attempt=attempt,
                        payer=payer,
                        payee=payee,
                        amount_wei=amount,
                        created_at=clock(),
                    )
                )
            # The third is not confirmed yet (a reorg may undo it): not counted as paid.
            for log_index, (paid, confirmed) in enumerate([(big, True), (3, True), (big, False)]):
                s.add(
                    Redemption(
                        tx_hash="0x" + "ab" * 32,
                        log_index=log_index,
                        payer=payer,
                        payee=payee,
                        cumulative_wei=paid,
                        paid_wei=paid,
                        fee_wei=7,
                        block_number=1 + log_index,
                        block_hash="0x" + f"{log_index:02x}" * 32,
                        confirmed=confirmed,
                    )
                )

        snap = read_market_snapshot(api.services.store, clock(), 30.0)
        assert (snap.wei_owed, snap.wei_redeemed, snap.wei_fees) == (2 * big + 1, big + 3, 14)

        samples = await scrape(api)
        assert value(samples, "gpumarket_wei_owed_total") == float(2 * big + 1)
        assert value(samples, "gpumarket_wei_redeemed_total") == float(big + 3)
        assert value(samples, "gpumarket_wei_fees_total") == 14

    run_any_api(body)
