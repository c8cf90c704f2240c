"""The FastAPI application: wiring of settings, store, services, routes and the sweeper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from contracts.chain import ChainUnavailable
from orchestrator.api.openapi import install_openapi
from orchestrator.api.problems import install_problem_handlers
from orchestrator.api.routes import (
    accounts,
    blobs,
    dashboard,
    health,
    jobs,
    metrics,
    openai,
    operator,
    workers,
)
from orchestrator.config import Settings
from orchestrator.metrics import build_registry
from orchestrator.wiring import Services, build_services

log = logging.getLogger("gpumarket.orchestrator")
CHAIN_DOWN_LOG_EVERY_S = 30.0


async def _sweep_forever(services: Services) -> None:
    """Every ``sweep_interval_s``: write this replica's noted heartbeats; then, on the one
    replica that holds the duties lock, expire leases and deadlines, release stalled
    verifications, dispatch and send slashes, and with payments read redemptions from the
    chain and refresh stakes every ``reconcile_interval_s``."""
    next_settle = 0.0
    quiet_until = 0.0  # chain-down warnings: one per CHAIN_DOWN_LOG_EVERY_S
    try:
        while True:
            await asyncio.sleep(services.settings.sweep_interval_s)
            try:
                await run_in_threadpool(services.workers.flush_seen)
                await run_in_threadpool(services.replicas.touch, services.now())
                if not await run_in_threadpool(services.duties.held):
                    continue
                next_settle = await _run_duties(services, next_settle)
            except ChainUnavailable as exc:  # the chain is down or restarting: one line
                now = services.now()
                if now >= quiet_until:
                    quiet_until = now + CHAIN_DOWN_LOG_EVERY_S
                    log.warning(
                        "chain unavailable (%s); settlement waits, jobs go on; retrying every "
                        "%.1fs",
                        exc,
                        services.settings.sweep_interval_s,
                    )
            except Exception:  # the sweeper must outlive a failed round (a DB or RPC restart)
                log.exception(
                    "sweep round failed; retrying in %.1fs", services.settings.sweep_interval_s
                )
    finally:
        await run_in_threadpool(services.duties.release)


async def _run_duties(services: Services, next_settle: float) -> float:
    """One round of the background duties; returns when the next settlement round is due."""
    report = await run_in_threadpool(services.leases.sweep, services.now())
    if report.leases_expired or report.deadlines_passed:
        log.info(
            "sweep: %d leases expired, %d deadlines passed",
            report.leases_expired,
            report.deadlines_passed,
        )
    await run_in_threadpool(services.verification.resolve_stalled, services.now())
    await run_in_threadpool(services.leases.dispatch, services.now())
    await run_in_threadpool(services.verification.send_slashes)
    await run_in_threadpool(services.replicas.prune, services.now())
    if services.payments.enabled and services.now() >= next_settle:
        next_settle = services.now() + services.settings.reconcile_interval_s
        await run_in_threadpool(services.payments.reconcile)
        await run_in_threadpool(services.workers.refresh_stakes, services.now())
    return next_settle


def create_app(
    settings: Settings | None = None,
    *,
    services: Services | None = None,
    run_sweeper: bool = True,
) -> FastAPI:
    settings = settings or (services.settings if services else Settings())
    svc = services or build_services(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.auto_migrate:
            await run_in_threadpool(svc.store.migrate)
        # Refuses to start beside a live replica whose shared settings differ.
        await run_in_threadpool(svc.replicas.join, svc.now())
        svc.hub.bind(asyncio.get_running_loop())
        if svc.bus is not None:
            svc.bus.start()
        sweeper = asyncio.create_task(_sweep_forever(svc)) if run_sweeper else None
        try:
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
            if svc.bus is not None:
                await run_in_threadpool(svc.bus.stop)
            with contextlib.suppress(Exception):  # a database already gone: the row goes stale
                await run_in_threadpool(svc.replicas.leave)

    app = FastAPI(
        title="gpumarket orchestrator",
        version="0.1.0",
        description=(
            "Submit inference and transcoding jobs; workers register, lease jobs and report "
            "signed results. Errors are RFC 9457 problem documents."
        ),
        lifespan=lifespan,
    )
    app.state.services = svc
    app.state.metrics_registry = build_registry(svc)
    install_problem_handlers(app)
    install_openapi(app)
    for module in (jobs, blobs, workers, accounts, operator, health, dashboard, metrics, openai):
        app.include_router(module.router)
    return app
