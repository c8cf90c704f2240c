"""The worker's Prometheus metrics, scraped over a real socket while the daemon runs jobs
against the orchestrator app in-process (the harness of ``test_daemon``)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpumarket.logs import JsonFormatter
from orchestrator.config import Settings
from orchestrator.store import Store
from orchestrator.wiring import Services, build_services
from protocol import JobType, LeasedJob, Precision
from tests.support import EMBED_MODEL
from tests.unit.worker.test_daemon import (
    METERED_J,
    FixedEnergyMeter,
    eventually,
    open_market,
    run,
    start_worker,
)
from worker.batching import BatcherPool
from worker.config import WorkerSettings
from worker.executors.base import Capability, Execution, FetchBlob, JobRejected
from worker.metrics import WorkerMetrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def live_services(tmp_path: Path, sqlite_store: Store) -> Services:
    settings = Settings(
        data_dir=tmp_path / "data",
        admin_token="operator-token-for-tests-0123456789abcdef",
        lease_ttl_s=10.0,
        heartbeat_interval_s=0.1,
        long_poll_max_s=2.0,
        verify_rate=0.0,  # no checks: a sampled job would wait for a second worker
        verify_rate_new=0.0,
    )
    return build_services(settings, store=sqlite_store, clock=time.time, rng=random.Random(7))


@pytest.fixture
def worker_settings(tmp_path: Path) -> WorkerSettings:
    # One job at a time: each batch is one job's texts, and each job gets all the energy.
    return WorkerSettings(
        work_dir=tmp_path / "work",
        max_concurrency=1,
        lease_wait_s=0.5,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        prices_wei={"inference": 7},
    )


class EchoModel:
    """A BatchTarget: one small vector per text."""

    max_batch = 64

    def run_batch(self, items: list[Any]) -> list[Any]:
        return [[float(len(str(item)))] for item in items]

    def check_items(self, items: list[Any]) -> None:
        return None


class BatchingEmbedder:
    """Inference through a real BatcherPool. A job's first text says what to do: ``reject``,
    ``crash`` or ``block`` (until ``release``); anything else is embedded."""

    job_type = JobType.INFERENCE

    def __init__(self) -> None:
        self.batchers = BatcherPool(lambda model, precision: EchoModel(), max_wait_s=0.0)
        self.release = asyncio.Event()

    def capabilities(self) -> list[Capability]:
        return [Capability(model=EMBED_MODEL, precision=Precision.FP32, max_batch=64)]

    async def warm_up(self) -> None:
        return None

    async def run(self, job: LeasedJob, workdir: Path, fetch: FetchBlob) -> Execution:
        assert job.input is not None
        texts: list[str] = job.input["texts"]
        if texts[0] == "reject":
            raise JobRejected("not a language this model knows")
        if texts[0] == "crash":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if texts[0] == "block":
            await self.release.wait()
        vectors = await self.batchers.submit(job.model, job.precision.value, texts)
        return Execution(units=len(texts), output={"embeddings": vectors})

    async def close(self) -> None:
        await self.batchers.close()


async def scrape(port: int) -> Samples:
    async with httpx.AsyncClient() as http:
        resp = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0)
    assert resp.status_code == 200, resp.text
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_a_running_worker_serves_its_job_energy_and_batch_metrics(
    live_services: Services, worker_settings: WorkerSettings, caplog: pytest.LogCaptureFixture
) -> None:
    embedder = BatchingEmbedder()
    caplog.set_level(logging.INFO, logger="gpumarket.worker")

    async def body() -> None:
        async with open_market(live_services) as market:
            async with start_worker(
                market, [embedder], worker_settings, energy=FixedEnergyMeter()
            ) as worker:
                server = worker.daemon.metrics.serve("127.0.0.1", 0)
                try:
                    await worker.registered()
                    await check_zeros(server.port)
                    await check(market, worker, server.port)
                finally:
                    server.close()

    async def check_zeros(port: int) -> None:
        """Before any job, every series is there at 0 (transcode is not offered here)."""
        samples = await scrape(port)
        assert value(samples, "gpumarket_worker_jobs_completed_total", type="inference") == 0
        for retryable in ("true", "false"):
            labels = {"type": "inference", "retryable": retryable}
            assert value(samples, "gpumarket_worker_jobs_failed_total", **labels) == 0
        assert value(samples, "gpumarket_worker_energy_joules_total", source="rapl") == 0
        assert not any(dict(labels).get("type") == "transcode" for _, labels in samples)

    async def check(market: Any, worker: Any, port: int) -> None:
        blocked = await market.submit("block", "until released")
        await market.wait_state(blocked, "running")
        assert value(await scrape(port), "gpumarket_worker_jobs_in_flight") == 1
        embedder.release.set()
        assert (await market.wait_final(blocked))["state"] == "succeeded"

        three = await market.submit("a", "bb", "ccc")
        assert (await market.wait_final(three))["state"] == "succeeded"
        rejected = await market.submit("reject")
        assert (await market.wait_final(rejected))["state"] == "failed"
        crashed = await market.submit("crash")
        await market.wait_state(crashed, "queued", attempt=2)  # no other worker: stays queued
        await worker.completed(2)

        async def idle() -> Samples | None:
            samples = await scrape(port)
            return samples if value(samples, "gpumarket_worker_jobs_in_flight") == 0 else None

        samples: Samples = await eventually(idle, "no job in flight")
        kind = "inference"
        assert value(samples, "gpumarket_worker_jobs_completed_total", type=kind) == 2
        failed = "gpumarket_worker_jobs_failed_total"
        assert value(samples, failed, type=kind, retryable="false") == 1
        assert value(samples, failed, type=kind, retryable="true") == 1
        execution = "gpumarket_worker_job_execution_seconds"
        assert value(samples, f"{execution}_count", type=kind) == 2
        assert value(samples, f"{execution}_sum", type=kind) >= 0
        # one job at a time: each finished job was metered alone, and got all of it
        assert value(samples, "gpumarket_worker_energy_joules_total", source="rapl") == (
            2 * METERED_J
        )
        # a batch per job: 2 texts, then 3
        batch = "gpumarket_worker_batch_size"
        labels = {"model": EMBED_MODEL, "precision": "fp32"}
        assert value(samples, f"{batch}_count", **labels) == 2
        assert value(samples, f"{batch}_sum", **labels) == 5
        sizes = [value(samples, f"{batch}_bucket", le=le, **labels) for le in ("1.0", "2.0", "4.0")]
        assert sizes == [0, 1, 2]
        assert value(samples, f"{batch}_bucket", le="+Inf", **labels) == 2
        assert not any(name == "gpumarket_worker_voucher_cumulative_wei" for name, _ in samples)

        # the failure lines name the job and the worker as fields, for JSON logs
        registration = worker.daemon.client.registration
        lines = [
            json.loads(JsonFormatter().format(r))
            for r in caplog.records
            if getattr(r, "job_id", None) in (rejected, crashed)
        ]
        assert {line["job_id"] for line in lines} == {rejected, crashed}
        assert {line["worker_id"] for line in lines} == {registration.worker_id}
        assert any(rejected in line["message"] for line in lines)

    run(body)


def test_voucher_gauge_appears_once_payments_report_a_voucher() -> None:
    metrics = WorkerMetrics()
    gauge = "gpumarket_worker_voucher_cumulative_wei"
    assert metrics.registry.get_sample_value(gauge) is None  # no payments, no gauge
    metrics.vouchers_seen(3 * 10**15)
    metrics.vouchers_seen(5 * 10**15)  # the latest vouchers' sum, not a running total
    assert metrics.registry.get_sample_value(gauge) == 5e15
