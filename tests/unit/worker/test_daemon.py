"""The worker daemon against the real orchestrator app, in-process over httpx.ASGITransport.

pytest-asyncio is not installed: each test is a sync function that hands an async body to
``run``, which guards it with a timeout so that nothing can hang. The orchestrator runs on the
wall clock (the lease long-poll waits in real seconds) with short heartbeats; the worker uses
small fake executors, except for one slow test with the real MiniLM pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import hashlib
import math
import random
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from fastapi import FastAPI

from orchestrator.app import create_app
from orchestrator.config import Settings
from orchestrator.exceptions import TooManyRequests
from orchestrator.services.auth import Principal
from orchestrator.services.ratelimit import RateLimiter
from orchestrator.store import Store
from orchestrator.wiring import Services, build_services
from protocol import JobType, LeasedJob, Offer, Precision
from protocol.signing import (
    output_sha256,
    recover_job_result_signer,
    recover_result_signer,
)
from protocol.workers import EnergySource
from tests.support import EMBED_MODEL, damaged_clip, hardware, video_clip
from worker.client import OrchestratorClient
from worker.config import WorkerSettings
from worker.daemon import REPORT_ATTEMPTS, WorkerDaemon
from worker.energy import EnergyMeasurement, EnergyMeter, EnergyReading, PendingMeasurement
from worker.executors.base import (
    Capability,
    Execution,
    Executor,
    FetchBlob,
    JobRejected,
    OutputFile,
)
from worker.executors.pipelines import TranscodePipeline
from worker.executors.transcode import make_test_clip

BASE_URL = "http://orchestrator"
TEST_TIMEOUT_S = 30.0
WAIT_S = 10.0
POLL_S = 0.02
# Long enough for a misbehaving daemon to take what it must not (several lease rounds).
SETTLE_S = 0.4
METERED_J = 12.0
INFERENCE_PRICE_WEI = 7
TRANSCODE_PRICE_WEI = 2
MAX_PRICE_WEI = 1_000

TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


def _billed(result: dict[str, Any]) -> tuple[int, int]:
    """The units and price (wei per unit) a result's signature covers."""
    return result["units"], int(result["price_wei_per_unit"])


# --- running an async body -------------------------------------------------------------------


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(TEST_TIMEOUT_S):
            await body()

    asyncio.run(guarded())


async def eventually(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``WAIT_S`` seconds."""
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                value = await check()
                if value:
                    return value
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


# --- the orchestrator ------------------------------------------------------------------------


@pytest.fixture
def orchestrator_settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        admin_token="operator-token-for-tests-0123456789abcdef",
        lease_ttl_s=10.0,
        heartbeat_interval_s=0.1,
        long_poll_max_s=2.0,
        max_blob_bytes=1024 * 1024,
    )


@pytest.fixture
def live_services(orchestrator_settings: Settings, sqlite_store: Store) -> Services:
    """Services on the wall clock: the daemon's long-polls and heartbeats are real."""
    return build_services(
        orchestrator_settings, store=sqlite_store, clock=time.time, rng=random.Random(7)
    )


@pytest.fixture
def worker_settings(tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(
        work_dir=tmp_path / "work",
        max_concurrency=2,
        lease_wait_s=0.5,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        prices_wei={"inference": INFERENCE_PRICE_WEI, "transcode": TRANSCODE_PRICE_WEI},
    )


@dataclass
class Market:
    """The orchestrator app and a client account talking to it over HTTP."""

    services: Services
    app: FastAPI
    http: httpx.AsyncClient
    client: dict[str, str]

    def transport(self) -> httpx.ASGITransport:
        return httpx.ASGITransport(app=self.app)

    async def submit(self, *texts: str, **overrides: Any) -> str:
        spec = {
            "type": "inference",
            "model": EMBED_MODEL,
            "input": {"texts": list(texts)},
            "max_price_wei_per_unit": str(MAX_PRICE_WEI),
            **overrides,
        }
        resp = await self.http.post("/v1/jobs", json=spec, headers=self.client)
        assert resp.status_code == 201, resp.text
        job_id: str = resp.json()["id"]
        return job_id

    async def job(self, job_id: str) -> dict[str, Any]:
        resp = await self.http.get(f"/v1/jobs/{job_id}", headers=self.client)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    async def result(self, job_id: str) -> dict[str, Any]:
        resp = await self.http.get(f"/v1/jobs/{job_id}/result", headers=self.client)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    async def wait_final(self, job_id: str) -> dict[str, Any]:
        async def final() -> dict[str, Any] | None:
            job = await self.job(job_id)
            return job if job["state"] in TERMINAL else None

        job: dict[str, Any] = await eventually(final, f"job {job_id} to finish")
        return job

    async def wait_state(self, job_id: str, state: str, attempt: int = 1) -> dict[str, Any]:
        async def there() -> dict[str, Any] | None:
            job = await self.job(job_id)
            return job if (job["state"], job["attempt"]) == (state, attempt) else None

        job: dict[str, Any] = await eventually(there, f"job {job_id} {state} (attempt {attempt})")
        return job


@contextlib.asynccontextmanager
async def open_market(services: Services) -> AsyncIterator[Market]:
    app = create_app(services.settings, services=services, run_sweeper=False)
    async with app.router.lifespan_context(app):
        _, key = services.auth.create_client("tests", services.now())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
            yield Market(services, app, http, {"Authorization": f"Bearer {key}"})


# --- the worker ------------------------------------------------------------------------------


class FixedEnergyMeter:
    """Every interval costs ``METERED_J`` joules, labelled as a RAPL reading."""

    source: EnergySource = "rapl"

    def start(self) -> EnergyReading:
        return EnergyReading(counter_j=0.0, time_s=time.monotonic())

    def stop(self, reading: EnergyReading) -> EnergyMeasurement:
        duration_s = time.monotonic() - reading.time_s
        return EnergyMeasurement(energy_j=METERED_J, duration_s=duration_s, source=self.source)

    @contextlib.contextmanager
    def measure(self) -> Iterator[PendingMeasurement]:
        pending = PendingMeasurement()
        reading = self.start()
        try:
            yield pending
        finally:
            pending.result = self.stop(reading)

    def close(self) -> None:
        return None


class ScriptedEmbedder:
    """Inference stand-in. A job's first text says what to do: ``reject`` raises JobRejected,
    ``crash`` raises RuntimeError, ``block`` waits for ``release``; anything else returns one
    small vector per text at once. With ``scripted=False`` every job just succeeds."""

    job_type = JobType.INFERENCE

    def __init__(self, models: tuple[str, ...] = (EMBED_MODEL,), *, scripted: bool = True) -> None:
        self.models = models
        self.scripted = scripted
        self.release = asyncio.Event()
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.folders: list[bool] = []  # whether each job's scratch folder existed when it ran
        self.active = 0
        self.peak = 0

    def capabilities(self) -> list[Capability]:
        return [Capability(model=m, precision=Precision.FP32, max_batch=8) for m in self.models]

    async def warm_up(self) -> None:
        return None

    async def run(self, job: LeasedJob, workdir: Path, fetch: FetchBlob) -> Execution:
        assert job.input is not None
        texts: list[str] = job.input["texts"]
        self.started.append(job.job_id)
        self.folders.append(workdir.exists())
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.scripted:
                await self._follow_script(texts[0])
        except asyncio.CancelledError:
            self.cancelled.append(job.job_id)
            raise
        finally:
            self.active -= 1
        self.finished.append(job.job_id)
        return Execution(units=len(texts), output={"embeddings": vectors(texts)})

    async def _follow_script(self, first_text: str) -> None:
        if first_text.startswith("reject"):
            raise JobRejected("texts must be in English, this one is not")
        if first_text.startswith("crash"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if first_text.startswith("block"):
            await self.release.wait()

    async def close(self) -> None:
        return None


def vectors(texts: list[str]) -> list[list[float]]:
    return [[float(len(text)), 0.5] for text in texts]


class FakeTranscoder:
    """Transcode stand-in: writes two small real H.264 "renditions", whatever the input (the
    orchestrator bills the frames and sizes it finds in the files)."""

    job_type = JobType.TRANSCODE
    RENDITIONS = (("720p", 1280, 720), ("360p", 640, 360))
    FRAMES = 3

    def capabilities(self) -> list[Capability]:
        return [Capability(model="h264", precision=Precision.FP32)]

    async def warm_up(self) -> None:
        return None

    async def run(self, job: LeasedJob, workdir: Path, fetch: FetchBlob) -> Execution:
        assert job.input_blob is not None
        source = (await fetch(job.input_blob, workdir / "input")).read_bytes()
        files = []
        for name, width, height in self.RENDITIONS:
            path = workdir / f"{name}.mp4"
            path.write_bytes(rendition_bytes(source, name))
            files.append(OutputFile(name, path, width=width, height=height, frames=self.FRAMES))
        pixels = sum(w * h * self.FRAMES for _, w, h in self.RENDITIONS)
        return Execution(units=pixels, files=tuple(files))

    async def close(self) -> None:
        return None


def rendition_bytes(source: bytes, name: str) -> bytes:
    """The file FakeTranscoder writes for rendition ``name`` (the same for any ``source``)."""
    return _rendition_clip(name)


@functools.cache
def _rendition_clip(name: str) -> bytes:
    [(width, height)] = [(w, h) for n, w, h in FakeTranscoder.RENDITIONS if n == name]
    with tempfile.TemporaryDirectory() as tmp:
        path = make_test_clip(Path(tmp) / "clip.mp4", width, height, FakeTranscoder.FRAMES, 24)
        return path.read_bytes()


@dataclass
class RunningWorker:
    daemon: WorkerDaemon
    task: asyncio.Task[None]
    account: LocalAccount = field(repr=False)

    @property
    def address(self) -> str:
        return str(self.account.address)

    async def registered(self) -> str:
        """Wait for the first registration; returns the session token."""

        async def token() -> str | None:
            reg = self.daemon.client.registration
            return reg.session_token if reg else None

        session: str = await eventually(token, "the worker to register")
        return session

    async def completed(self, count: int) -> None:
        """Wait until the daemon has counted ``count`` completions (it counts after the
        orchestrator has answered, so a client may see the result first)."""

        async def counted() -> bool:
            return self.daemon.completed == count

        await eventually(counted, f"{count} completions")

    async def finished(self) -> None:
        """Wait for ``run()`` to return on its own."""
        async with asyncio.timeout(WAIT_S):
            await asyncio.shield(self.task)


@contextlib.asynccontextmanager
async def start_worker(
    market: Market,
    executors: list[Executor],
    settings: WorkerSettings,
    *,
    energy: EnergyMeter | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    account: LocalAccount | None = None,
) -> AsyncIterator[RunningWorker]:
    account = account or Account.create()
    client = OrchestratorClient(BASE_URL, account, transport=transport or market.transport())
    daemon = WorkerDaemon(settings, client, executors, hardware(), energy or FixedEnergyMeter())
    task = asyncio.create_task(daemon.run())
    try:
        yield RunningWorker(daemon, task, account)
    finally:
        daemon.stop()
        try:
            async with asyncio.timeout(WAIT_S):
                await task
        finally:
            await client.aclose()


def worker_principal(worker_id: str) -> Principal:
    return Principal("worker", worker_id)


# --- offers ----------------------------------------------------------------------------------


def test_offers_come_from_executors_and_a_models_own_price_wins(
    live_services: Services, tmp_path: Path
) -> None:
    settings = WorkerSettings(
        work_dir=tmp_path / "work",
        lease_wait_s=0.5,
        prices_wei={"inference": 7, "tiny-embed": 3},
    )
    embedder = ScriptedEmbedder(models=(EMBED_MODEL, "tiny-embed"))

    async def body() -> None:
        async with open_market(live_services) as market:
            async with start_worker(market, [embedder, FakeTranscoder()], settings) as worker:
                offers = worker.daemon.offers()
                assert offers == [
                    Offer(
                        job_type=JobType.INFERENCE,
                        model=EMBED_MODEL,
                        precision=Precision.FP32,
                        price_wei_per_unit=7,
                        max_batch=8,
                    ),
                    Offer(
                        job_type=JobType.INFERENCE,
                        model="tiny-embed",
                        precision=Precision.FP32,
                        price_wei_per_unit=3,
                        max_batch=8,
                    ),
                    Offer(
                        job_type=JobType.TRANSCODE,
                        model="h264",
                        precision=Precision.FP32,
                        # no transcode price configured: the built-in default per pixel
                        price_wei_per_unit=1_000,
                        max_batch=1,
                    ),
                ]
                await worker.registered()
                (seen,) = market.services.workers.list(time.time())
                assert seen.address == worker.address
                assert seen.offers == offers
                assert seen.max_concurrency == settings.max_concurrency

    run(body)


# --- the happy path --------------------------------------------------------------------------


def test_submitted_jobs_are_leased_run_and_completed_with_signed_priced_metered_results(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    embedder = ScriptedEmbedder()

    async def body() -> None:
        async with open_market(live_services) as market:
            async with start_worker(market, [embedder], worker_settings) as worker:
                await worker.registered()
                texts = ["a cat sat on the mat", "GPUs are scarce", "hi"]
                job_id = await market.submit(*texts)
                job = await market.wait_final(job_id)
                assert job["state"] == "succeeded", job
                assert [e["state"] for e in job["history"]] == [
                    "queued",
                    "assigned",
                    "running",
                    "succeeded",
                ]
                result = await market.result(job_id)
                assert result["output"] == {"embeddings": vectors(texts)}
                assert result["output_blobs"] is None
                assert result["output_sha256"] == output_sha256(result["output"])
                signer = recover_result_signer(
                    job_id, 1, result["output_sha256"], *_billed(result), result["signature"]
                )
                assert signer == worker.address == result["worker_address"]
                assert result["units"] == 3
                assert int(result["cost_wei"]) == 3 * INFERENCE_PRICE_WEI
                assert result["energy_j"] == METERED_J  # alone on the device: all of it
                assert result["energy_source"] == "rapl"
                assert result["duration_s"] >= 0

                # a few more at once: all complete, each with its share of the energy
                more = [await market.submit(f"sentence {i}") for i in range(5)]
                for other in more:
                    assert (await market.wait_final(other))["state"] == "succeeded"
                    res = await market.result(other)
                    assert res["units"] == 1 and int(res["cost_wei"]) == INFERENCE_PRICE_WEI
                    assert 0 < res["energy_j"] <= METERED_J
                    assert res["energy_source"] == "rapl"
                await worker.completed(6)
                assert sorted(embedder.finished) == sorted([job_id, *more])
                # inline inputs: no scratch folder made (or removed) for any of them
                assert embedder.folders == [False] * 6
                assert not worker_settings.work_dir.exists() or not any(
                    worker_settings.work_dir.iterdir()
                )

    run(body)


def test_results_ready_together_are_reported_in_one_request_under_one_signature(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    embedder = ScriptedEmbedder()
    settings = worker_settings.model_copy(update={"max_concurrency": 4})

    async def body() -> None:
        async with open_market(live_services) as market:
            async with start_worker(market, [embedder], settings) as worker:
                await worker.registered()
                jobs = [await market.submit(f"block {i}") for i in range(4)]

                async def all_started() -> bool:
                    return len(embedder.started) == 4

                await eventually(all_started, "4 jobs running at once")
                for job_id in jobs:  # running from the lease on, with no /start call
                    assert (await market.job(job_id))["state"] == "running"
                sent = worker.daemon.reporter.requests
                embedder.release.set()  # all four finish together
                await worker.completed(4)
                assert worker.daemon.reporter.requests == sent + 1
                for job_id in jobs:
                    result = await market.result(job_id)
                    proof = result["batch"]
                    assert proof["count"] == 4 and len(proof["path"]) == 2  # log2(4)
                    signer = recover_job_result_signer(
                        job_id,
                        1,
                        result["output_sha256"],
                        *_billed(result),
                        proof["signature"],
                        index=proof["index"],
                        batch_count=proof["count"],
                        batch_path=proof["path"],
                    )
                    assert signer == worker.address == result["worker_address"]

    run(body)


# --- failures --------------------------------------------------------------------------------


def test_rejected_job_fails_for_good_a_crash_is_retried_elsewhere_and_the_worker_goes_on(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    embedder = ScriptedEmbedder()

    async def body() -> None:
        async with open_market(live_services) as market:
            async with start_worker(market, [embedder], worker_settings) as worker:
                await worker.registered()
                rejected = await market.submit("reject this one")
                job = await market.wait_final(rejected)
                assert job["state"] == "failed" and job["attempt"] == 1
                assert "texts must be in English" in job["failure_reason"]
                assert worker.address in job["failure_reason"]
                # Its input's fault, believed because no other worker could be asked.
                assert job["fault"] == "input"
                assert "no other worker can run this job" in job["failure_reason"]

                crashed = await market.submit("crash on this one")
                job = await market.wait_state(crashed, "queued", attempt=2)
                assert job["failure_reason"] is None
                retried = job["history"][-1]
                assert retried["state"] == "queued" and retried["attempt"] == 1
                assert "RuntimeError: CUDA error" in retried["detail"]

                # the worker survived both and still takes work
                fine = await market.submit("all good")
                assert (await market.wait_final(fine))["state"] == "succeeded"
                await worker.completed(1)
                assert not worker.task.done()

                # the crashed job was not lost: another worker runs attempt 2
                async with start_worker(
                    market, [ScriptedEmbedder(scripted=False)], worker_settings
                ) as other:
                    job = await market.wait_final(crashed)
                    assert job["state"] == "succeeded" and job["attempt"] == 2
                    assert job["worker_address"] == other.address
                    result = await market.result(crashed)
                    signer = recover_result_signer(
                        crashed, 2, result["output_sha256"], *_billed(result), result["signature"]
                    )
                    assert signer == other.address
                # the first worker was excluded from the retry
                assert embedder.started.count(crashed) == 1

    run(body)


# --- concurrency -----------------------------------------------------------------------------


def test_never_more_jobs_at_once_than_max_concurrency(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    embedder = ScriptedEmbedder()
    assert worker_settings.max_concurrency == 2

    async def body() -> None:
        async with open_market(live_services) as market:
            jobs = [await market.submit(f"block {i}") for i in range(6)]
            async with start_worker(market, [embedder], worker_settings) as worker:

                async def two_running() -> bool:
                    return embedder.active == 2

                await eventually(two_running, "two jobs running")
                await asyncio.sleep(SETTLE_S)  # more lease rounds: no third job may start
                assert embedder.active == embedder.peak == 2
                assert len(worker.daemon.running) == 2
                states = [(await market.job(j))["state"] for j in jobs]
                assert sorted(states).count("queued") == 4, states

                embedder.release.set()
                for job_id in jobs:
                    assert (await market.wait_final(job_id))["state"] == "succeeded"
                assert embedder.peak == 2
                assert sorted(embedder.finished) == sorted(jobs)

    run(body)


# --- drain and stop --------------------------------------------------------------------------


def test_drain_finishes_the_running_job_takes_no_new_one_and_deregisters(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    embedder = ScriptedEmbedder()

    async def body() -> None:
        async with open_market(live_services) as market:
            async with start_worker(market, [embedder], worker_settings) as worker:
                token = await worker.registered()
                running = await market.submit("block until released")

                async def started() -> bool:
                    return running in embedder.started

                await eventually(started, "the job to start")
                worker.daemon.drain()

                async def draining() -> bool:
                    (view,) = market.services.workers.list(time.time())
                    return view.status == "draining"

                await eventually(draining, "the orchestrator to see the drain")
                late = await market.submit("too late for this worker")
                await asyncio.sleep(SETTLE_S)
                assert not worker.task.done()  # still finishing its job

                embedder.release.set()
                await worker.finished()

                job = await market.job(running)
                assert job["state"] == "succeeded"
                assert job["worker_address"] == worker.address
                assert embedder.started == [running]
                job = await market.job(late)
                assert (job["state"], job["attempt"]) == ("queued", 1)
                assert [e["state"] for e in job["history"]] == ["queued"]

                # it left the market: its session is gone
                resp = await market.http.post(
                    "/v1/workers/heartbeat",
                    json={"jobs": []},
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert resp.status_code == 401, resp.text
                assert market.services.workers.list(time.time()) == []
                (gone,) = market.services.workers.list(time.time(), include_gone=True)
                assert gone.status == "deregistered"

    run(body)


def test_stop_during_a_drain_cancels_the_running_job_and_returns(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    embedder = ScriptedEmbedder()

    async def body() -> None:
        async with open_market(live_services) as market:
            async with start_worker(market, [embedder], worker_settings) as worker:
                await worker.registered()
                job_id = await market.submit("block forever")

                async def started() -> bool:
                    return job_id in embedder.started

                await eventually(started, "the job to start")
                worker.daemon.drain()
                await asyncio.sleep(SETTLE_S)
                assert not worker.task.done()
                worker.daemon.drain()  # a second SIGTERM stops at once
                await worker.finished()

                assert embedder.cancelled == [job_id]
                assert embedder.finished == []
                assert worker.daemon.running == {}
                # deregistering gave the job back to the queue for another worker
                job = await market.job(job_id)
                assert (job["state"], job["attempt"]) == ("queued", 2)
                assert "deregistered" in job["history"][-1]["detail"]

    run(body)


# --- cancellation ----------------------------------------------------------------------------


def test_a_client_cancel_reaches_the_running_job_at_the_next_heartbeat(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    embedder = ScriptedEmbedder()

    async def body() -> None:
        async with open_market(live_services) as market:
            async with start_worker(market, [embedder], worker_settings) as worker:
                await worker.registered()
                doomed = await market.submit("block: will be cancelled")
                kept = await market.submit("block: will be released")

                async def both_started() -> bool:
                    return set(embedder.started) == {doomed, kept}

                await eventually(both_started, "both jobs to start")
                resp = await market.http.post(f"/v1/jobs/{doomed}/cancel", headers=market.client)
                assert resp.status_code == 200, resp.text

                async def stopped() -> bool:
                    return embedder.cancelled == [doomed] and doomed not in worker.daemon.running

                await eventually(stopped, "the heartbeat to cancel the job")
                assert kept in worker.daemon.running  # only the cancelled job was stopped

                embedder.release.set()
                assert (await market.wait_final(kept))["state"] == "succeeded"
                assert (await market.job(doomed))["state"] == "cancelled"
                # and the freed slot takes new work
                after = await market.submit("after the cancel")
                assert (await market.wait_final(after))["state"] == "succeeded"

    run(body)


# --- an unreliable network -------------------------------------------------------------------


class FlakyTransport(httpx.AsyncBaseTransport):
    """Forwards to ``inner``, except for the requests that ``fail_next`` picks: those are
    refused (no connection) or, given a ``status``, answered by a proxy in front of a
    restarting orchestrator."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.refused: list[str] = []
        self._failures: list[tuple[str, int, int | None]] = []
        self._slow: dict[str, float] = {}

    def slow_answers(self, path_suffix: str, delay_s: float) -> None:
        """Answers to these requests arrive ``delay_s`` seconds after the app has acted."""
        self._slow[path_suffix] = delay_s

    def fail_next(self, count: int, path_suffix: str = "", status: int | None = None) -> None:
        self._failures.append((path_suffix, count, status))

    def _failure(self, path: str) -> tuple[bool, int | None]:
        for i, (suffix, left, status) in enumerate(self._failures):
            if left > 0 and path.endswith(suffix):
                self._failures[i] = (suffix, left - 1, status)
                return True, status
        return False, None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        fail, status = self._failure(request.url.path)
        if not fail:
            response = await self.inner.handle_async_request(request)
            for suffix, delay_s in self._slow.items():
                if request.url.path.endswith(suffix):
                    await asyncio.sleep(delay_s)
            return response
        self.refused.append(request.url.path)
        if status is None:
            raise httpx.ConnectError("connection refused", request=request)
        await request.aread()
        problem = {"status": status, "code": "unavailable", "detail": "upstream is restarting"}
        return httpx.Response(status, json=problem, request=request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_heartbeat_during_a_slow_completion_answer_does_not_cancel_the_report(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    heartbeat_s = live_services.settings.heartbeat_interval_s
    embedder = ScriptedEmbedder()

    async def body() -> None:
        async with open_market(live_services) as market:
            flaky = FlakyTransport(market.transport())
            # recorded at once, answered after several heartbeats (which then list the job
            # as no longer leased, because it has succeeded)
            flaky.slow_answers("/complete", 5 * heartbeat_s)
            async with start_worker(market, [embedder], worker_settings, transport=flaky) as worker:
                await worker.registered()
                job_id = await market.submit("answered slowly")
                assert (await market.wait_final(job_id))["state"] == "succeeded"
                await worker.completed(1)
                assert embedder.finished == [job_id]

    run(body)


def test_registers_after_backoff_while_the_orchestrator_is_unreachable(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    async def body() -> None:
        async with open_market(live_services) as market:
            flaky = FlakyTransport(market.transport())
            flaky.fail_next(4)
            async with start_worker(
                market, [ScriptedEmbedder()], worker_settings, transport=flaky
            ) as worker:
                await worker.registered()
                assert flaky.refused == ["/v1/workers/challenge"] * 4
                job_id = await market.submit("works once connected")
                assert (await market.wait_final(job_id))["state"] == "succeeded"

    run(body)


def test_a_rate_limited_registration_waits_as_long_as_it_is_told(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    """A 429's retry_after_s (1 s here) outweighs the worker's own short backoff (0.05 s): one
    refusal, then the registration goes through, instead of a burst of refused retries."""
    limit = RateLimiter(2.0, 2, what="worker registrations")
    live_services.registration_limit = limit
    refusals: list[float] = []
    take = limit.take

    def counted_take(key: str, now: float) -> None:
        try:
            take(key, now)
        except TooManyRequests:
            refusals.append(now)
            raise

    limit.take = counted_take  # type: ignore[method-assign]
    for _ in range(2):  # someone else at this address spent the burst
        limit.take("127.0.0.1", time.time())

    async def body() -> None:
        async with open_market(live_services) as market:
            async with start_worker(market, [ScriptedEmbedder()], worker_settings) as worker:
                await worker.registered()
        assert len(refusals) == 1

    run(body)


def test_lost_lease_polls_and_reports_are_retried(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    async def body() -> None:
        async with open_market(live_services) as market:
            flaky = FlakyTransport(market.transport())
            flaky.fail_next(3, "/lease")  # the first polls after registering
            flaky.fail_next(2, "/complete")
            flaky.fail_next(1, "/fail")
            async with start_worker(
                market, [ScriptedEmbedder()], worker_settings, transport=flaky
            ) as worker:
                await worker.registered()
                done = await market.submit("delivered despite the network")
                rejected = await market.submit("reject, reported despite the network")
                assert (await market.wait_final(done))["state"] == "succeeded"
                assert (await market.wait_final(rejected))["state"] == "failed"
                assert flaky.refused.count("/v1/workers/lease") == 3
                assert flaky.refused.count(f"/v1/workers/jobs/{done}/complete") == 2
                assert len([p for p in flaky.refused if p.endswith("/fail")]) == 1
                await worker.completed(1)

    run(body)


def test_proxy_errors_from_a_restarting_orchestrator_are_retried_not_fatal(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    async def body() -> None:
        async with open_market(live_services) as market:
            flaky = FlakyTransport(market.transport())
            flaky.fail_next(2, "/challenge", status=503)
            flaky.fail_next(1, "/register", status=502)
            async with start_worker(
                market, [ScriptedEmbedder()], worker_settings, transport=flaky
            ) as worker:
                await worker.registered()
                flaky.fail_next(2, "/complete", status=503)
                job_id = await market.submit("delivered through a flaky proxy")
                assert (await market.wait_final(job_id))["state"] == "succeeded"
                assert flaky.refused.count("/v1/workers/challenge") == 2
                assert flaky.refused.count("/v1/workers/register") == 1
                assert flaky.refused.count(f"/v1/workers/jobs/{job_id}/complete") == 2
                await worker.completed(1)

    run(body)


def test_a_report_that_never_gets_through_is_given_up_without_a_crashed_task(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    async def body() -> None:
        loop_errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
        async with open_market(live_services) as market:
            flaky = FlakyTransport(market.transport())
            async with start_worker(
                market, [ScriptedEmbedder()], worker_settings, transport=flaky
            ) as worker:
                await worker.registered()
                flaky.fail_next(10_000, "/fail")
                lost = await market.submit("reject, but nobody will hear of it")

                async def given_up() -> bool:
                    return len(flaky.refused) >= REPORT_ATTEMPTS and not worker.daemon.running

                await eventually(given_up, "the worker to give the report up")
                # the orchestrator never heard: the lease will expire and re-queue the job
                assert (await market.job(lost))["state"] == "running"
                assert flaky.refused == [f"/v1/workers/jobs/{lost}/fail"] * REPORT_ATTEMPTS
                later = await market.submit("the worker goes on")
                assert (await market.wait_final(later))["state"] == "succeeded"
        gc.collect()  # an unretrieved task exception is reported when the task is collected
        assert loop_errors == []

    run(body)


def test_drain_while_the_orchestrator_is_unreachable_returns_without_registering(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    async def body() -> None:
        async with open_market(live_services) as market:
            flaky = FlakyTransport(market.transport())
            flaky.fail_next(10_000)  # down for good
            async with start_worker(
                market, [ScriptedEmbedder()], worker_settings, transport=flaky
            ) as worker:

                async def retrying() -> bool:
                    return len(flaky.refused) >= 2

                await eventually(retrying, "registration retries")
                worker.daemon.drain()  # one SIGTERM must be enough: nothing is running
                await worker.finished()
                assert worker.daemon.client.registration is None
                assert set(flaky.refused) == {"/v1/workers/challenge"}

    run(body)


# --- re-registration -------------------------------------------------------------------------


def test_registers_again_when_the_orchestrator_forgets_the_session(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    async def body() -> None:
        async with open_market(live_services) as market:
            async with start_worker(market, [ScriptedEmbedder()], worker_settings) as worker:
                first = await worker.registered()
                registration = worker.daemon.client.registration
                assert registration is not None
                worker_id = registration.worker_id
                market.services.workers.deregister(worker_principal(worker_id), time.time())

                async def new_session() -> bool:
                    reg = worker.daemon.client.registration
                    return reg is not None and reg.session_token != first

                await eventually(new_session, "the worker to register again")
                again = worker.daemon.client.registration
                assert again is not None and again.worker_id == worker_id  # same key, same row
                job_id = await market.submit("after re-registering")
                job = await market.wait_final(job_id)
                assert job["state"] == "succeeded"
                assert job["worker_address"] == worker.address

    run(body)


class SwitchableTransport(httpx.AsyncBaseTransport):
    """Whatever app ``inner`` points at now: an orchestrator replaced under the worker."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)


def test_registers_with_a_fresh_orchestrator_that_never_knew_it(
    live_services: Services,
    worker_settings: WorkerSettings,
    orchestrator_settings: Settings,
    tmp_path: Path,
) -> None:
    fresh_store = Store(f"sqlite:///{tmp_path / 'fresh.db'}")
    fresh_store.migrate()
    fresh_settings = orchestrator_settings.model_copy(update={"data_dir": tmp_path / "fresh"})
    fresh = build_services(fresh_settings, store=fresh_store, clock=time.time)

    async def body() -> None:
        async with open_market(live_services) as old, open_market(fresh) as new:
            switch = SwitchableTransport(old.transport())
            async with start_worker(
                old, [ScriptedEmbedder()], worker_settings, transport=switch
            ) as worker:
                await worker.registered()
                before = await old.submit("on the old orchestrator")
                assert (await old.wait_final(before))["state"] == "succeeded"

                switch.inner = new.transport()
                job_id = await new.submit("on the new orchestrator")
                job = await new.wait_final(job_id)
                assert job["state"] == "succeeded"
                assert job["worker_address"] == worker.address
                (seen,) = new.services.workers.list(time.time())
                assert seen.address == worker.address

    try:
        run(body)
    finally:
        fresh_store.dispose()


# --- output files ----------------------------------------------------------------------------


def test_output_files_are_uploaded_and_the_client_can_download_them(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    video = video_clip(1280, 720, frames=2)

    async def body() -> None:
        async with open_market(live_services) as market:
            async with start_worker(market, [FakeTranscoder()], worker_settings) as worker:
                await worker.registered()
                resp = await market.http.post("/v1/blobs", content=video, headers=market.client)
                assert resp.status_code == 201, resp.text
                spec = {
                    "type": "transcode",
                    "input_blob": resp.json()["sha256"],
                    "max_price_wei_per_unit": str(MAX_PRICE_WEI),
                }
                resp = await market.http.post("/v1/jobs", json=spec, headers=market.client)
                assert resp.status_code == 201, resp.text
                job_id = resp.json()["id"]
                assert (await market.wait_final(job_id))["state"] == "succeeded"

                result = await market.result(job_id)
                assert result["output"] is None
                blobs = result["output_blobs"]
                assert [(b["name"], b["width"], b["height"], b["frames"]) for b in blobs] == [
                    ("720p", 1280, 720, 3),
                    ("360p", 640, 360, 3),
                ]
                for blob in blobs:
                    expected = rendition_bytes(video, blob["name"])
                    assert blob["sha256"] == hashlib.sha256(expected).hexdigest()
                    assert blob["size"] == len(expected)
                    got = await market.http.get(
                        f"/v1/blobs/{blob['sha256']}", headers=market.client
                    )
                    assert got.status_code == 200, got.text
                    assert got.content == expected
                assert result["output_sha256"] == output_sha256(blobs)
                signer = recover_result_signer(
                    job_id, 1, result["output_sha256"], *_billed(result), result["signature"]
                )
                assert signer == worker.address
                pixels = (1280 * 720 + 640 * 360) * 3
                assert result["units"] == pixels
                assert int(result["cost_wei"]) == pixels * TRANSCODE_PRICE_WEI
                # the job's scratch folder is gone once the result is in
                assert list(worker_settings.work_dir.iterdir()) == []

    run(body)


def test_a_result_the_orchestrator_cannot_store_is_handed_back_at_once(
    live_services: Services, worker_settings: WorkerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blob disk is full (507) when the worker uploads its renditions: the worker reports
    a retryable failure, so the job is queued again now, not after its lease runs out."""
    video = video_clip(1280, 720, frames=2)

    def no_space(*_: object, **__: object) -> object:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def body() -> None:
        async with open_market(live_services) as market:
            resp = await market.http.post("/v1/blobs", content=video, headers=market.client)
            assert resp.status_code == 201, resp.text
            spec = {
                "type": "transcode",
                "input_blob": resp.json()["sha256"],
                "max_price_wei_per_unit": str(MAX_PRICE_WEI),
                "max_attempts": 1,
            }
            resp = await market.http.post("/v1/jobs", json=spec, headers=market.client)
            assert resp.status_code == 201, resp.text
            job_id = resp.json()["id"]
            monkeypatch.setattr(tempfile, "mkstemp", no_space)  # the disk fills up
            async with start_worker(market, [FakeTranscoder()], worker_settings):
                job = await market.wait_final(job_id)
            assert job["state"] == "failed"  # its one attempt was handed back, not lost
            assert "could not take the result" in job["failure_reason"]
            assert "507" in job["failure_reason"]
            assert job["fault"] == "none"  # the orchestrator's disk: nobody's fault, no blame

    run(body)


def test_inputs_that_fail_on_workers_cost_the_client_and_never_the_workers(
    live_services: Services, worker_settings: WorkerSettings
) -> None:
    """Two daemons with the real PyAV transcoder. A client floods transcodes of videos whose
    index is sound (they pass the probe at submit) but whose picture data is damaged: each
    worker's refusal is confirmed by the other's, the job fails for its input, no worker's
    record moves, a repeat of a failed input is refused at submit, the client is throttled,
    and another client's embedding job is served as usual."""
    # Four input failures below (three jobs and one refused submit), fading a little while
    # the test runs: over this limit only after the fourth.
    live_services.settings.client_input_failure_limit = 3.5
    ladder = [{"height": 90, "bitrate_kbps": 150}]

    async def submit_video(market: Market, seed: int) -> httpx.Response:
        upload = await market.http.post(
            "/v1/blobs", content=damaged_clip(seed), headers=market.client
        )
        assert upload.status_code == 201, upload.text
        spec = {
            "type": "transcode",
            "input_blob": upload.json()["sha256"],
            "renditions": ladder,
            "max_price_wei_per_unit": str(MAX_PRICE_WEI),
        }
        return await market.http.post("/v1/jobs", json=spec, headers=market.client)

    def records() -> dict[str, tuple[int, float]]:
        views = live_services.workers.list(live_services.now())
        return {v.address: (v.jobs_failed, v.reputation) for v in views}

    async def body() -> None:
        async with open_market(live_services) as market:
            executors = [[TranscodePipeline(threads=1), ScriptedEmbedder()] for _ in range(2)]
            async with (
                start_worker(market, executors[0], worker_settings) as first,
                start_worker(market, executors[1], worker_settings) as second,
            ):
                await first.registered()
                await second.registered()
                before = records()
                assert set(before) == {first.address, second.address}

                for seed in range(3):
                    resp = await submit_video(market, seed)
                    assert resp.status_code == 201, resp.text  # nothing to see before running
                    job = await market.wait_final(resp.json()["id"])
                    assert (job["state"], job["fault"]) == ("failed", "input"), job
                    assert "corrupt or truncated" in job["failure_reason"]
                    assert "confirmed by a second worker" in job["failure_reason"]
                    if seed == 0:  # the same input again: refused before any worker sees it
                        again = await submit_video(market, 0)
                        assert again.status_code == 422, again.text
                        assert "this input already failed" in again.json()["detail"]
                throttled = await submit_video(market, 3)
                assert throttled.status_code == 429, throttled.text
                assert int(throttled.headers["retry-after"]) > 0

                assert records() == before  # no worker paid for the client's inputs
                _, key = live_services.auth.create_client("another", live_services.now())
                other = {"Authorization": f"Bearer {key}"}
                spec = {
                    "type": "inference",
                    "model": EMBED_MODEL,
                    "input": {"texts": ["a normal job"]},
                    "max_price_wei_per_unit": str(MAX_PRICE_WEI),
                }
                resp = await market.http.post("/v1/jobs", json=spec, headers=other)
                assert resp.status_code == 201, resp.text
                served = await market.http.get(
                    f"/v1/jobs/{resp.json()['id']}?wait_s=5", headers=other
                )
                assert served.json()["state"] == "succeeded", served.text

    run(body)


# --- the real inference pipeline -------------------------------------------------------------

SLOW_JOBS = 32
UNIT_NORM_TOLERANCE = 1e-4
MIN_COSINE_TO_DIRECT = 0.9999


@pytest.mark.slow
def test_real_minilm_pipeline_batches_concurrent_single_sentence_jobs(
    live_services: Services, tmp_path: Path
) -> None:
    from worker.energy import EstimatedEnergyMeter
    from worker.executors.inference import BUILTIN_EMBEDDING_MODEL, EMBEDDING_DIM, ModelRegistry
    from worker.executors.pipelines import InferencePipeline

    settings = WorkerSettings(
        work_dir=tmp_path / "work",
        max_concurrency=SLOW_JOBS,
        lease_wait_s=0.5,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        max_batch=SLOW_JOBS,
        batch_wait_s=0.05,
        prices_wei={"inference": INFERENCE_PRICE_WEI},
    )
    registry = ModelRegistry(device="cpu")
    pipeline = InferencePipeline(
        registry, max_batch=settings.max_batch, max_wait_s=settings.batch_wait_s
    )
    sentences = [f"Sentence number {i} is about GPUs and the weather." for i in range(SLOW_JOBS)]
    direct = registry.get(BUILTIN_EMBEDDING_MODEL, Precision.FP32).run_batch(sentences)

    async def body() -> None:
        await pipeline.warm_up()
        try:
            async with open_market(live_services) as market:
                # queued before the worker arrives, so one lease hands it all of them at once
                jobs = [await market.submit(s, model=BUILTIN_EMBEDDING_MODEL) for s in sentences]
                meter = EstimatedEnergyMeter(100.0)
                async with start_worker(market, [pipeline], settings, energy=meter) as worker:
                    for job_id, expected in zip(jobs, direct, strict=True):
                        job = await market.wait_final(job_id)
                        assert job["state"] == "succeeded", job
                        result = await market.result(job_id)
                        (vector,) = result["output"]["embeddings"]
                        assert len(vector) == EMBEDDING_DIM == 384
                        norm = math.sqrt(sum(x * x for x in vector))
                        assert abs(norm - 1.0) < UNIT_NORM_TOLERANCE
                        cosine = sum(a * b for a, b in zip(vector, expected, strict=True))
                        assert cosine > MIN_COSINE_TO_DIRECT
                        assert result["units"] == 1
                        assert result["energy_source"] == "estimate"
                        assert result["worker_address"] == worker.address
                    await worker.completed(SLOW_JOBS)
        finally:
            await pipeline.close()
        stats = pipeline.batchers.stats()[(BUILTIN_EMBEDDING_MODEL, Precision.FP32.value)]
        assert stats.items == SLOW_JOBS
        assert stats.max_batch_size > 1, stats.batch_sizes
        assert stats.batches < SLOW_JOBS

    run(body)
