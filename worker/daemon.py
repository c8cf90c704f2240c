"""The worker daemon: register, pull jobs over a long-poll, run them, report signed results.

Outbound connections only, so a worker behind a home router needs no open port. While the
orchestrator is unreachable the daemon backs off with jitter; after an orchestrator restart
that lost its session it registers again. SIGTERM drains (finish running jobs, take no new
ones, deregister); a second SIGTERM stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from protocol import (
    Fault,
    HardwareDescriptor,
    JobRef,
    LeasedJob,
    Offer,
    OutputBlob,
)
from protocol.batches import BatchResult
from protocol.signing import output_sha256
from worker.batching import BatcherPool
from worker.client import OrchestratorClient, OrchestratorError
from worker.config import WorkerSettings
from worker.energy import EnergyMeter, apportion
from worker.executors.base import Execution, Executor, JobRejected
from worker.metrics import WorkerMetrics
from worker.reporting import ResultReporter

log = logging.getLogger("gpumarket.worker")

REPORT_ATTEMPTS = 5
TRANSIENT = (httpx.TransportError, httpx.TimeoutException)


def _worth_retrying(exc: Exception) -> bool:
    """Network trouble, or an orchestrator that is overloaded or restarting."""
    return isinstance(exc, TRANSIENT) or (isinstance(exc, OrchestratorError) and exc.retryable)


@dataclass
class RunningJob:
    job: LeasedJob
    task: asyncio.Task[None]
    started: float = field(default_factory=time.monotonic)
    # The executor is done and the result is being reported. Heartbeats still extend the
    # lease (uploads take time), but a cancel now is most likely the orchestrator having
    # recorded our completion; finishing the report is harmless either way.
    reporting: bool = False


class Backoff:
    """Exponential backoff with full jitter, in seconds."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.initial_s * 2**self._attempt)
        self._attempt += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self._attempt = 0


class WorkerDaemon:
    def __init__(
        self,
        settings: WorkerSettings,
        client: OrchestratorClient,
        executors: list[Executor],
        hardware: HardwareDescriptor,
        energy: EnergyMeter,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.executors = {ex.job_type: ex for ex in executors}
        self.hardware = hardware
        self.energy = energy
        self.running: dict[str, RunningJob] = {}
        self.completed = 0
        self._draining = asyncio.Event()
        self._stopped = asyncio.Event()
        self._registered = False
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self.reporter = ResultReporter(client)
        self.metrics = metrics or WorkerMetrics()
        self.metrics.start_at_zero(self.executors, energy.source)
        self.metrics.count_in_flight(lambda: len(self.running))
        # Executors that batch (inference) expose their BatcherPool as ``batchers``.
        pools = [getattr(ex, "batchers", None) for ex in executors]
        self.metrics.watch_batchers(p for p in pools if isinstance(p, BatcherPool))
        for ex in executors:  # executors that stream (generate) send their chunks through us
            if hasattr(ex, "publish"):
                ex.publish = self.client.stream_many

    # -- offers and registration ---------------------------------------------------------------

    def offers(self) -> list[Offer]:
        offers = []
        for job_type, executor in self.executors.items():
            for cap in executor.capabilities():
                offers.append(
                    Offer(
                        job_type=job_type,
                        model=cap.model,
                        precision=cap.precision,
                        price_wei_per_unit=self.settings.price_for(job_type, cap.model),
                        prompt_price_wei_per_unit=self.settings.prompt_price_for(
                            job_type, cap.model
                        ),
                        max_batch=cap.max_batch,
                        units_per_s=cap.units_per_s,
                        input=cap.input,
                        context_tokens=cap.context_tokens,
                        max_token_bytes=cap.max_token_bytes,
                    )
                )
        return offers

    async def register(self) -> None:
        """Register, retrying with backoff until the orchestrator answers or we are told to
        drain or stop (nothing runs yet, so a drain has nothing to wait for)."""
        while not self._draining.is_set():
            try:
                reg = await self.client.register(
                    self.hardware,
                    self.offers(),
                    self.settings.max_concurrency,
                    self.settings.carbon_intensity_g_per_kwh,
                )
                self._registered = True
                self._backoff.reset()
                log.info(
                    "registered as %s (worker %s)",
                    self.client.account.address,
                    reg.worker_id,
                    extra={"worker_id": reg.worker_id},
                )
                return
            except TRANSIENT as exc:
                await self._sleep_backoff(f"orchestrator unreachable ({exc.__class__.__name__})")
            except OrchestratorError as exc:
                if not exc.retryable:
                    raise
                await self._sleep_backoff(
                    f"orchestrator unavailable ({exc})", at_least_s=exc.retry_after_s
                )

    async def _sleep_backoff(self, why: str, *, at_least_s: float | None = None) -> None:
        """Wait before the next try (at least ``at_least_s``, when the orchestrator said how
        long); a drain or stop ends the wait (both loops then end)."""
        delay = max(self._backoff.next_delay(), at_least_s or 0.0)
        log.warning("%s; retrying in %.1fs", why, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._draining.wait(), timeout=delay)

    # -- the loops -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until drained or stopped: pull jobs, run them, heartbeat."""
        await self.register()
        heartbeats = asyncio.create_task(self._heartbeat_loop())
        try:
            await self._pull_loop()
            await self._announce_drain()
            await self._finish_running()
        finally:
            heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeats
            await self._leave()

    async def _pull_loop(self) -> None:
        while not (self._draining.is_set() or self._stopped.is_set()):
            free = self.settings.max_concurrency - len(self.running)
            if free <= 0:
                await self._wait_for_slot()
                continue
            try:
                jobs = await self._lease(free)
            except TRANSIENT as exc:
                await self._sleep_backoff(f"lease failed ({exc.__class__.__name__})")
                continue
            except OrchestratorError as exc:
                if exc.status == 401:
                    log.warning("session no longer valid (%s); registering again", exc.detail)
                    await self.register()
                    continue
                await self._sleep_backoff(f"lease refused: {exc}")
                continue
            self._backoff.reset()
            for job in jobs:
                self._spawn(job)

    async def _lease(self, free: int) -> list[LeasedJob]:
        lease = asyncio.create_task(self.client.lease(free, self.settings.lease_wait_s))
        drained = asyncio.create_task(self._draining.wait())
        done, _ = await asyncio.wait({lease, drained}, return_when=asyncio.FIRST_COMPLETED)
        drained.cancel()
        if lease in done:
            return lease.result()
        # Draining: stop polling, but a lease that already carries jobs must not be dropped.
        lease.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            return await lease
        return []

    async def _wait_for_slot(self) -> None:
        tasks = [r.task for r in self.running.values()]
        if tasks:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED, timeout=1.0)

    async def _heartbeat_loop(self) -> None:
        while True:
            interval = (
                self.client.registration.heartbeat_interval_s if self.client.registration else 10.0
            )
            await asyncio.sleep(interval)
            refs = [
                JobRef(job_id=r.job.job_id, attempt=r.job.attempt) for r in self.running.values()
            ]
            try:
                answer = await self.client.heartbeat(refs)
            except (OrchestratorError, *TRANSIENT) as exc:
                log.warning("heartbeat failed: %s", exc)
                continue
            for ref in answer.cancel:
                running = self.running.get(ref.job_id)
                if running is not None and running.job.attempt == ref.attempt:
                    if running.reporting:
                        continue
                    log.info(
                        "job %s: cancelled by the orchestrator; stopping it",
                        ref.job_id,
                        extra=self._log_fields(ref),
                    )
                    running.task.cancel()

    async def _finish_running(self) -> None:
        """Let running jobs finish (drain) unless told to stop now; then cancel the rest."""
        stop = asyncio.create_task(self._stopped.wait())
        try:
            while not self._stopped.is_set():
                pending = [r.task for r in self.running.values() if not r.task.done()]
                if not pending:
                    break
                log.info("draining: waiting for %d running job(s)", len(pending))
                await asyncio.wait([*pending, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        leftovers = [r.task for r in self.running.values()]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    async def _announce_drain(self) -> None:
        """Have the orchestrator assign us nothing more while running jobs finish: a lease
        poll we gave up on may still be open on its side."""
        if not self._registered or self._stopped.is_set():
            return
        with contextlib.suppress(OrchestratorError, *TRANSIENT):
            await self.client.drain()

    async def _leave(self) -> None:
        if not self._registered:
            return
        with contextlib.suppress(OrchestratorError, *TRANSIENT):
            await self.client.deregister()
            log.info("deregistered")

    # -- control ------------------------------------------------------------------------------

    def drain(self) -> None:
        """First SIGTERM: finish what is running, take nothing new, deregister."""
        if self._draining.is_set():
            self.stop()
            return
        log.info("drain requested: finishing %d running job(s)", len(self.running))
        self._draining.set()

    def stop(self) -> None:
        """Second SIGTERM: stop now; the orchestrator re-queues our jobs."""
        log.info("stopping now")
        self._draining.set()
        self._stopped.set()

    # -- one job -------------------------------------------------------------------------------

    def _spawn(self, job: LeasedJob) -> None:
        task = asyncio.create_task(self._run_job(job), name=f"job-{job.job_id}")
        self.running[job.job_id] = RunningJob(job, task)
        job_id = job.job_id

        def forget(_: asyncio.Task[None]) -> None:
            self.running.pop(job_id, None)

        task.add_done_callback(forget)

    async def _run_job(self, job: LeasedJob) -> None:
        workdir = self.settings.work_dir / f"{job.job_id}-{job.attempt}"
        # Only a job with an input file needs a folder (its download, a transcode's outputs):
        # an inline job makes none, sparing the event loop a mkdir and an rmtree per job.
        with_files = job.input_blob is not None
        if with_files:
            workdir.mkdir(parents=True, exist_ok=True)
        try:
            executor = self.executors.get(job.type)
            if executor is None:
                await self._report_fail(
                    job, retryable=False, reason=f"no {job.type} executor here", fault=Fault.WORKER
                )
                return
            # No /start call: the lease marked the job running (the endpoint stays for others).
            with self.energy.measure() as metered:
                began = time.monotonic()
                execution = await executor.run(job, workdir, self.client.download)
                duration_s = time.monotonic() - began
            energy_j = self._energy_share(
                metered.result.energy_j if metered.result else None, duration_s
            )
            if (running := self.running.get(job.job_id)) is not None:
                running.reporting = True
            self.metrics.job_finished(job.type, duration_s, energy_j, self.energy.source)
            await self._report_success(job, execution, duration_s, energy_j)
            self.completed += 1
            log.info(
                "job %s: done, %d unit(s) in %.2f s, %.1f J",
                job.job_id,
                execution.units,
                duration_s,
                energy_j,
                extra=self._log_fields(job),
            )
            self.metrics.job_completed(job.type)
        except asyncio.CancelledError:
            log.info("job %s: stopped", job.job_id, extra=self._log_fields(job))
            raise
        except JobRejected as exc:
            await self._report_fail(job, retryable=False, reason=str(exc), fault=exc.fault)
        except OrchestratorError as exc:
            if exc.retryable:  # e.g. 507: its disk is full. Hand the job back to run again now,
                # rather than leave it to wait out the lease. Nobody's fault: not ours.
                await self._report_fail(
                    job,
                    retryable=True,
                    reason=f"the orchestrator could not take the result: {exc}",
                    fault=Fault.NONE,
                )
            else:  # 409/403: the lease is gone or the job is not ours any more
                log.warning(
                    "job %s: orchestrator refused (%s); dropping it",
                    job.job_id,
                    exc,
                    extra=self._log_fields(job),
                )
        except Exception as exc:  # any executor crash must fail the job, not the worker
            log.exception("job %s: failed", job.job_id, extra=self._log_fields(job))
            await self._report_fail(job, retryable=True, reason=f"{exc.__class__.__name__}: {exc}")
        finally:
            if with_files:
                shutil.rmtree(workdir, ignore_errors=True)

    def _log_fields(self, job: LeasedJob | JobRef) -> dict[str, object]:
        """Structured fields for a log line about ``job`` (see gpumarket/logs.py)."""
        reg = self.client.registration
        return {
            "job_id": job.job_id,
            "attempt": job.attempt,
            "worker_id": reg.worker_id if reg else None,
        }

    def _energy_share(self, device_j: float | None, duration_s: float) -> float:
        """This job's part of the device's energy: split evenly among the jobs running now."""
        if device_j is None:
            return 0.0
        sharing = max(len(self.running), 1)
        return apportion(device_j, [1.0] * sharing)[0]

    async def _report_success(
        self, job: LeasedJob, execution: Execution, duration_s: float, energy_j: float
    ) -> None:
        blobs: list[OutputBlob] | None = None
        if execution.files:
            blobs = []
            for f in execution.files:
                sha = await self.client.upload(f.path)
                blobs.append(
                    OutputBlob(
                        name=f.name,
                        sha256=sha,
                        size=f.path.stat().st_size,
                        width=f.width,
                        height=f.height,
                        frames=f.frames,
                    )
                )
            digest = output_sha256([b.model_dump(mode="json") for b in blobs])
        else:
            digest = output_sha256(execution.output)
        result = BatchResult(
            job_id=job.job_id,
            attempt=job.attempt,
            output=execution.output if not blobs else None,
            output_blobs=blobs,
            output_sha256=digest,
            price_wei_per_unit=job.price_wei_per_unit,
            prompt_price_wei_per_unit=job.prompt_price_wei_per_unit,
            duration_s=duration_s,
            energy_j=energy_j,
            energy_source=self.energy.source,
            units=execution.units,
            prompt_units=execution.prompt_units,
            skipped_renditions=list(execution.skipped) if blobs else None,
        )
        # Signed by the reporter: alone, or with the results ready beside it under one signature.
        await self._with_retries(lambda: self.reporter.report(result))

    async def _report_fail(
        self, job: LeasedJob, *, retryable: bool, reason: str, fault: Fault = Fault.WORKER
    ) -> None:
        log.warning(
            "job %s: %s failure (%s fault): %s",
            job.job_id,
            "retryable" if retryable else "final",
            fault,
            reason,
            extra=self._log_fields(job),
        )
        self.metrics.job_failed(job.type, retryable=retryable)
        # If the report never gets through, the lease expires and the job is re-queued anyway.
        with contextlib.suppress(OrchestratorError, *TRANSIENT):
            await self._with_retries(
                lambda: self.client.fail(job.job_id, job.attempt, retryable, reason, fault)
            )

    async def _with_retries(self, call: Callable[[], Awaitable[object]]) -> None:
        """Reports are idempotent on the orchestrator, so a lost answer is safe to resend."""
        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        for attempt in range(REPORT_ATTEMPTS):
            try:
                await call()
                return
            except (OrchestratorError, *TRANSIENT) as exc:
                if not _worth_retrying(exc) or attempt == REPORT_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(backoff.next_delay())
