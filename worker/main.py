"""Assemble a worker process: probe, executors, energy meter, daemon, payments, signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

import httpx
from eth_account.signers.local import LocalAccount
from web3.exceptions import Web3Exception

from contracts.broker import PaymentBroker
from contracts.chain import Chain, ChainError
from contracts.deploy import Deployment, check_deployment
from contracts.registry import WorkerRegistry
from protocol import HardwareDescriptor, JobType
from worker.client import OrchestratorClient, OrchestratorError
from worker.config import WorkerSettings
from worker.daemon import Backoff, WorkerDaemon
from worker.energy import select_energy_meter
from worker.executors.base import Executor
from worker.hardware import probe_hardware
from worker.metrics import MetricsServer, WorkerMetrics
from worker.redeemer import POLL_INTERVAL_S, Redeemer, stake_if_needed
from worker.status import StatusBoard, show_status

log = logging.getLogger("gpumarket.worker")

PAYMENTS_RETRY_MAX_S = 300.0
"""Longest pause between tries to learn the orchestrator's chain or to reach its RPC."""
CHAIN_CONNECT_TIMEOUT_S = 60.0
"""Limit on connecting to the chain and checking the deployment there (several RPC reads)."""
PAYMENTS_STOP_TIMEOUT_S = 5.0
"""How long stopping waits for a redemption in progress before cancelling it: a sent
transaction stays sent, and the next start reads from the chain what it paid."""


def build_executors(settings: WorkerSettings) -> list[Executor]:
    """The pipelines this worker offers; torch and PyAV load only if their job type is on."""
    executors: list[Executor] = []
    if JobType.INFERENCE in settings.job_types:
        from worker.executors.inference import ModelRegistry
        from worker.executors.pipelines import InferencePipeline

        registry = ModelRegistry(settings.models_dir)
        executors.append(
            InferencePipeline(
                registry, max_batch=settings.max_batch, max_wait_s=settings.batch_wait_s
            )
        )
    if JobType.GENERATE in settings.job_types:
        from worker.executors.generation import (
            builtin_generation_specs,
            discover_generation_models,
        )
        from worker.executors.pipelines import GENERATION_BATCH_WAIT_S, GenerationPipeline

        specs = builtin_generation_specs() + discover_generation_models(settings.models_dir)
        executors.append(
            GenerationPipeline(
                specs,
                max_batch=settings.max_batch,
                max_wait_s=max(settings.batch_wait_s, GENERATION_BATCH_WAIT_S),
            )
        )
    if JobType.TRANSCODE in settings.job_types:
        from worker.executors.pipelines import TranscodePipeline

        executors.append(TranscodePipeline())
    return executors


async def run_payments(
    settings: WorkerSettings,
    client: OrchestratorClient,
    account: LocalAccount,
    stop: asyncio.Event,
    *,
    poll_interval_s: float = POLL_INTERVAL_S,
    metrics: WorkerMetrics | None = None,
    board: StatusBoard | None = None,
) -> None:
    """Stake if asked, then redeem this worker's vouchers until ``stop`` is set, looking every
    ``poll_interval_s`` seconds. Returns at once when the orchestrator runs without payments.
    A worker left without the stake paid jobs need is said loudly on ``board``."""
    found = await _connect_to_chain(settings, client, account, stop)
    if found is None:
        return
    chain, deployment = found
    registry = WorkerRegistry(chain, deployment.worker_registry)
    if settings.stake_wei is not None:
        await stake_if_needed(registry, settings.stake_wei)
    if board is not None:
        await _check_eligible(registry, board)
    broker = PaymentBroker(chain, deployment.payment_broker)
    redeemer = Redeemer(
        client,
        broker,
        account,
        settings.redeem_threshold_wei,
        settings.redeem_interval_s,
        poll_interval_s=poll_interval_s,
        metrics=metrics,
    )
    log.info(
        "redeeming vouchers through PaymentBroker %s on chain %d at %d wei owed or every %.0fs",
        deployment.payment_broker,
        deployment.chain_id,
        settings.redeem_threshold_wei,
        settings.redeem_interval_s,
    )
    await redeemer.run(stop)


async def _check_eligible(registry: WorkerRegistry, board: StatusBoard) -> None:
    """Tell the operator when the registry does not count this worker as staked: the
    orchestrator then gives it no paid job, however long it waits."""
    address = registry.chain.address
    try:
        eligible, stake_wei, minimum_wei = await asyncio.wait_for(
            asyncio.to_thread(
                lambda: (
                    registry.is_eligible(address),
                    registry.stake_of(address),
                    registry.min_stake_wei(),
                )
            ),
            timeout=CHAIN_CONNECT_TIMEOUT_S,
        )
    except (ChainError, Web3Exception, OSError, TimeoutError) as exc:
        log.warning("cannot read this worker's stake: %r", exc)
        return
    if not eligible:
        board.cannot_get_work(
            f"{address} is not eligible in WorkerRegistry (active stake {stake_wei} wei, "
            f"minimum {minimum_wei} wei, or unbonding or slashed): the orchestrator gives it "
            f"no paid jobs; set GPUMARKET_WORKER_STAKE_WEI={minimum_wei} to stake at start"
        )


async def _connect_to_chain(
    settings: WorkerSettings,
    client: OrchestratorClient,
    account: LocalAccount,
    stop: asyncio.Event,
) -> tuple[Chain, Deployment] | None:
    """The orchestrator's chain, connected with the worker's key and checked against its
    deployment; retried with backoff until ``stop``. None without payments."""
    backoff = Backoff(settings.backoff_initial_s, PAYMENTS_RETRY_MAX_S)
    while not stop.is_set():
        try:
            deployment = await client.chain_info()
        except (OrchestratorError, httpx.HTTPError) as exc:
            why = f"cannot ask the orchestrator for its chain ({exc!r})"
        else:
            if deployment is None:
                log.info("the orchestrator runs without payments: no vouchers to redeem")
                return None
            rpc_url = settings.chain_rpc_url or deployment.rpc_url
            try:
                chain = await asyncio.wait_for(
                    asyncio.to_thread(_checked_chain, rpc_url, account, deployment),
                    timeout=CHAIN_CONNECT_TIMEOUT_S,
                )
                return chain, deployment
            except (ChainError, Web3Exception, OSError, TimeoutError) as exc:
                why = (
                    f"cannot use the chain at {rpc_url} ({exc!r}); if that URL is not reachable "
                    "from here, set GPUMARKET_WORKER_CHAIN_RPC_URL"
                )
        delay = backoff.next_delay()
        log.warning("payments: %s; retrying in %.1fs", why, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
    return None


def _checked_chain(rpc_url: str, account: LocalAccount, deployment: Deployment) -> Chain:
    chain = Chain.connect(rpc_url, account.key)
    check_deployment(chain, deployment)
    return chain


async def _stop_payments(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    done, _ = await asyncio.wait({task}, timeout=PAYMENTS_STOP_TIMEOUT_S)
    if not done:
        log.warning("payments: not waiting for a redemption in progress; the chain keeps it")
        task.cancel()
    (result,) = await asyncio.gather(task, return_exceptions=True)
    if isinstance(result, Exception):
        log.error("payments stopped with an error: %r", result)


async def serve(settings: WorkerSettings, account: LocalAccount) -> WorkerDaemon:
    hardware = HardwareDescriptor.model_validate(probe_hardware())
    energy = select_energy_meter(assumed_watts=settings.assumed_watts)
    executors = build_executors(settings)
    client = OrchestratorClient(settings.orchestrator_urls, account)
    metrics = WorkerMetrics()
    daemon = WorkerDaemon(settings, client, executors, hardware, energy, metrics)
    board = StatusBoard(
        address=account.address,
        metrics=metrics,
        prices={offer.model: offer.price_wei_per_unit for offer in daemon.offers()},
        running=lambda: len(daemon.running),
        capacity=settings.max_concurrency,
    )
    metrics_server: MetricsServer | None = None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.drain)
    # Beside the daemon, until it has drained (or stopped) and left: redeeming uses its session.
    stop_payments = asyncio.Event()
    payments = asyncio.create_task(
        run_payments(
            settings,
            client,
            account,
            stop_payments,
            poll_interval_s=settings.redeem_poll_s,
            metrics=metrics,
            board=board,
        ),
        name="payments",
    )
    stop_status = asyncio.Event()
    status = asyncio.create_task(show_status(board, stop_status), name="status")
    log.info(
        "hardware: %s, %d cores, %d GPU(s); energy from %s",
        hardware.cpu_model,
        hardware.cpu_cores,
        len(hardware.gpus),
        energy.source,
    )
    try:
        metrics_server = _serve_metrics(settings, metrics)
        board.phase = "loading models"
        began = time.monotonic()
        for executor in executors:
            await executor.warm_up()
        board.phase = None
        log.info("models loaded in %.1f s; taking jobs", time.monotonic() - began)
        await daemon.run()
    finally:
        await _stop_payments(payments, stop_payments)
        stop_status.set()
        await status
        for executor in executors:
            await executor.close()
        await client.aclose()
        energy.close()
        if metrics_server is not None:
            metrics_server.close()
    return daemon


def _serve_metrics(settings: WorkerSettings, metrics: WorkerMetrics) -> MetricsServer | None:
    if settings.metrics_port is None:
        return None
    server = metrics.serve(settings.metrics_host, settings.metrics_port)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, server.port)
    return server


def run_worker(settings: WorkerSettings, account: LocalAccount) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(serve(settings, account))
