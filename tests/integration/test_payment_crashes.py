"""Exactly-once payment across crashes: the orchestrator SIGKILLed again and again while a
worker completes paid jobs, and the worker "crashing" between sending its redemption and
seeing the receipt. After restarts, the wei paid on chain equal the ledger: no double, no loss.

The ledger entry and the new cumulative voucher are written in the completing transaction
itself, so there is no moment between them for a crash to fall into; these trials check that
from outside, at random kill points.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from contracts.abi import ErrorTable
from contracts.anvil import DEV_PRIVATE_KEYS, Anvil
from contracts.broker import PaymentBroker
from contracts.chain import Chain, ContractRevert
from contracts.deploy import deploy, write_deployment
from contracts.registry import WorkerRegistry
from gpumarket import Client
from protocol import CompleteRequest, HardwareDescriptor, LeasedJob, Offer
from protocol.signing import output_sha256, sign_result
from protocol.vouchers import Voucher
from tests.integration.conftest import OrchestratorProcess
from tests.support import EMBED_MODEL
from worker.client import OrchestratorClient, OrchestratorError

pytestmark = pytest.mark.slow

DEPLOYER, PAYER, WORKER = DEV_PRIVATE_KEYS[0], DEV_PRIVATE_KEYS[4], DEV_PRIVATE_KEYS[5]
PRICE = 10**12
JOBS = 24
KILLS = 6
RECONCILE_WAIT_S = 15.0


def _offer() -> Offer:
    return Offer.model_validate(
        {"job_type": "inference", "model": EMBED_MODEL, "price_wei_per_unit": str(PRICE)}
    )


def _spec(i: int) -> dict[str, object]:
    return {
        "type": "inference",
        "model": EMBED_MODEL,
        "input": {"texts": [f"job {i}", "x"]},
        "max_price_wei_per_unit": str(PRICE),
    }


async def _complete(worker: OrchestratorClient, job: LeasedJob) -> None:
    output = {"embeddings": [[1.0, float(job.attempt)], [0.5, 0.5]]}
    digest = output_sha256(output)
    await worker.complete(
        job.job_id,
        CompleteRequest(
            attempt=job.attempt,
            output=output,
            output_sha256=digest,
            signature=sign_result(
                worker.account.key, job.job_id, job.attempt, digest, 2, job.price_wei_per_unit
            ),
            duration_s=0.01,
            energy_j=0.01,
            energy_source="estimate",
            units=2,
        ),
    )


def test_orchestrator_and_worker_crashes_pay_exactly_the_ledger(tmp_path: Path) -> None:
    rng = random.Random(2026)
    with Anvil() as anvil:
        chain = Chain.connect(anvil.url, DEPLOYER)
        deployment = deploy(chain, min_stake_wei=10**17)
        write_deployment(deployment, tmp_path / "deployment.json")
        payer = PaymentBroker(Chain.connect(anvil.url, PAYER), deployment.payment_broker)
        payer.deposit(10**18)
        payer.authorize(chain.address, 10**18)
        WorkerRegistry(Chain.connect(anvil.url, WORKER), deployment.worker_registry).stake(10**17)

        proc = OrchestratorProcess(
            tmp_path / "orchestrator",
            GPUMARKET_DEPLOYMENT_FILE=str(tmp_path / "deployment.json"),
            GPUMARKET_RECONCILE_INTERVAL_S="0.5",
        )
        proc.start()
        try:
            with proc.operator() as op:
                key = op.post("/v1/clients", json={"name": "payer"}).json()["api_key"]
            with Client(proc.url, key) as client:
                client.link_payer(PAYER)
                ids = [
                    client.submit(_spec(i), idempotency_key=f"paid-{i}")["id"] for i in range(JOBS)
                ]
            asyncio.run(_work_through_kills(proc, rng))
            _redeem_with_a_crash(anvil.url, proc, deployment.payment_broker)
            _check_exactly_once(anvil.url, proc, deployment.payment_broker, key, ids)
        finally:
            proc.stop()


async def _work_through_kills(proc: OrchestratorProcess, rng: random.Random) -> None:
    """Complete every job while the orchestrator is SIGKILLed at random moments."""
    worker = OrchestratorClient(proc.url, Account.from_key(WORKER))
    await worker.register(HardwareDescriptor(), [_offer()], max_concurrency=4)
    kills_left, done = KILLS, 0
    async with asyncio.timeout(120):
        while done < JOBS:
            try:
                jobs = await worker.lease(max_jobs=4, wait_s=1)
                for job in jobs:
                    if kills_left and done % (JOBS // KILLS) == 1:
                        # Kill with the completion in flight or just landed: either way the
                        # retry below must neither lose nor double the payment.
                        task = asyncio.create_task(_complete(worker, job))
                        await asyncio.sleep(rng.uniform(0, 0.02))
                        proc.kill()
                        kills_left -= 1
                        await asyncio.gather(task, return_exceptions=True)
                        proc.start()
                    try:
                        await _complete(worker, job)  # idempotent when it already landed
                    except OrchestratorError as exc:
                        assert exc.status == 409, exc  # lease lost across a restart: re-queued
                        continue
                    done += 1
            except (httpx.TransportError, OrchestratorError) as exc:
                if isinstance(exc, OrchestratorError) and exc.status == 401:
                    raise
                await asyncio.sleep(0.2)
    assert kills_left == 0, f"only {KILLS - kills_left} of {KILLS} kills happened"
    await worker.aclose()


def _vouchers(proc: OrchestratorProcess) -> list[dict[str, object]]:
    """The worker's vouchers as served on the wire (after registering a fresh session)."""

    async def fetch() -> str:
        worker = OrchestratorClient(proc.url, Account.from_key(WORKER))
        registration = await worker.register(HardwareDescriptor(), [_offer()], max_concurrency=1)
        await worker.aclose()
        return registration.session_token

    token = asyncio.run(fetch())
    response = httpx.get(
        f"{proc.url}/v1/workers/vouchers", headers={"Authorization": f"Bearer {token}"}
    )
    response.raise_for_status()
    return list(response.json()["vouchers"])


def _redeem_with_a_crash(rpc_url: str, proc: OrchestratorProcess, broker_address: str) -> None:
    """Send the redemption and 'crash' before the receipt; on restart, redeem again."""
    [entry] = _vouchers(proc)
    voucher = Voucher.model_validate(entry["voucher"])
    worker_chain = Chain.connect(rpc_url, WORKER)
    broker = PaymentBroker(worker_chain, broker_address)
    contract = broker.contract
    signature = bytes.fromhex(str(entry["signature"])[2:])
    data = contract.encode_abi("redeem", args=[voucher.as_struct(), signature])
    worker_chain.send(contract.address, data, ErrorTable.from_abi(contract.abi))  # no wait
    # ...the worker process dies here. The restarted worker only knows the voucher:
    restarted = PaymentBroker(Chain.connect(rpc_url, WORKER), broker_address)
    try:
        restarted.redeem(voucher, str(entry["signature"]))
    except ContractRevert as exc:
        assert exc.name == "NotIncreasing", exc  # already paid: the replay pays nothing
    assert restarted.redeemed(voucher.payer, voucher.payee) == voucher.cumulative_amount


def _check_exactly_once(
    rpc_url: str, proc: OrchestratorProcess, broker_address: str, api_key: str, ids: list[str]
) -> None:
    with Client(proc.url, api_key) as client:
        jobs = [client.get(i) for i in ids]
    assert all(j["state"] == "succeeded" for j in jobs)
    billed = sum(int(j["cost_wei"]) for j in jobs)
    assert billed == JOBS * 2 * PRICE
    broker = PaymentBroker(Chain.connect(rpc_url), broker_address)
    payer, payee = Account.from_key(PAYER).address, Account.from_key(WORKER).address
    assert broker.redeemed(payer, payee) == billed  # on chain == what the jobs cost
    with proc.operator() as op:  # the orchestrator reads the redemption back from the chain
        deadline = time.monotonic() + RECONCILE_WAIT_S
        while True:
            report = op.get("/v1/settlement").json()
            if report["pairs"] and report["pairs"][0]["redeemed_wei"] == str(billed):
                break
            assert time.monotonic() < deadline, report
            time.sleep(0.2)
    [pair] = report["pairs"]
    assert pair["ledger_wei"] == pair["voucher_wei"] == pair["redeemed_wei"] == str(billed)
    assert report["ledger_entries"] == JOBS and report["consistent"]
