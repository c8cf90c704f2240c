"""The worker's voucher redeemer against the real orchestrator app and a real anvil chain.

The orchestrator runs in-process behind ``httpx.ASGITransport`` with on-chain payments on
(a deployment file, vouchers signed by dev key 1). Vouchers come into being as they do in
production: a client linked to a payer submits a paid job, the worker is matched, completes
it, and the orchestrator signs the new cumulative voucher. Roles (anvil dev keys): 0 deployer
and fee recipient, 1 orchestrator (voucher signer), 2 and 3 payers, 4 worker (payee), 5 and 7
unstaked workers, 6 a staked worker whose gas money is taken away.

Each test starts from the same chain state (evm_snapshot / evm_revert) with a fresh database
and fresh Chain objects, so no nonce is remembered across tests. pytest-asyncio is not
installed: async bodies run through ``run``, under a timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import shlex
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from typer.testing import CliRunner
from web3 import Web3

from contracts.anvil import DEV_PRIVATE_KEYS, Anvil, AnvilNotInstalled, anvil_binary
from contracts.broker import PaymentBroker
from contracts.chain import Chain
from contracts.deploy import Deployment, deploy, write_deployment
from contracts.registry import WorkerRegistry
from gpumarket.cli import app as cli_app
from orchestrator.app import create_app
from orchestrator.config import Settings
from orchestrator.services.auth import Principal
from orchestrator.store import Store
from orchestrator.wiring import Services, build_services
from protocol import JobSpec
from protocol.signing import sign_registration
from tests.conftest import FakeClock
from tests.support import EMBED_MODEL, TestWorker, completion, hardware, offer
from worker.client import OrchestratorClient
from worker.config import WorkerSettings
from worker.main import run_payments
from worker.metrics import WorkerMetrics
from worker.redeemer import Redeemer, RedeemOutcome, RedeemStatus, stake_if_needed
from worker.status import StatusBoard

ETH = 10**18
FEE_BPS = 100
MIN_STAKE_WEI = ETH // 10
THRESHOLD_WEI = 10**16
PRICE_WEI = 10**15  # per text: a 10-text job owes exactly the threshold
DEPOSIT_WEI = 10 * ETH
CAP_WEI = 5 * ETH
INTERVAL_S = 600.0
VOUCHER_TTL_S = 30 * 86_400
TEST_TIMEOUT_S = 20.0
WAIT_S = 10.0
LOOP_POLL_S = 0.05
BASE_URL = "http://orchestrator.test"
ADMIN_TOKEN = "operator-token-for-tests-0123456789abcdef"

DEPLOYER_KEY, SIGNER_KEY, PAYER_KEY, OTHER_PAYER_KEY, WORKER_KEY = DEV_PRIVATE_KEYS[:5]
UNSTAKED_KEY, BROKE_KEY, STAKED_BY_RUN_KEY = DEV_PRIVATE_KEYS[5:8]
PAYER = Account.from_key(PAYER_KEY).address
OTHER_PAYER = Account.from_key(OTHER_PAYER_KEY).address
SIGNER = Account.from_key(SIGNER_KEY).address


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(TEST_TIMEOUT_S):
            await body()

    asyncio.run(guarded())


def rpc(w3: Web3, method: str, *params: Any) -> Any:
    return w3.provider.make_request(method, list(params))  # type: ignore[arg-type]


async def eventually(check: Callable[[], bool]) -> None:
    """Wait until ``check`` (a blocking chain read) is true; fail after ``WAIT_S``."""
    async with asyncio.timeout(WAIT_S):
        while not await asyncio.to_thread(check):
            await asyncio.sleep(0.02)


# --- the chain -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[Anvil]:
    try:
        anvil_binary()
    except AnvilNotInstalled as exc:
        pytest.fail(f"{exc} (make install does this)")
    with Anvil() as anvil:
        yield anvil


@pytest.fixture(scope="module")
def deployment(node: Anvil) -> Deployment:
    """Both contracts; two payers that deposited and authorised the orchestrator's signer;
    two workers with the minimum stake."""
    chain = Chain.connect(node.url, DEPLOYER_KEY)
    deployed = deploy(chain, fee_bps=FEE_BPS, min_stake_wei=MIN_STAKE_WEI)
    for payer_key in (PAYER_KEY, OTHER_PAYER_KEY):
        payer = PaymentBroker(chain.with_key(payer_key), deployed.payment_broker)
        payer.deposit(DEPOSIT_WEI)
        payer.authorize(SIGNER, CAP_WEI)
    for worker_key in (WORKER_KEY, BROKE_KEY):
        WorkerRegistry(chain.with_key(worker_key), deployed.worker_registry).stake(MIN_STAKE_WEI)
    return deployed


@pytest.fixture(scope="module")
def deployment_file(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chain") / "deployment.json"
    write_deployment(deployment, path)
    return path


@dataclass
class Market:
    """The chain as the test sees it: balances, nonces and what the broker has paid."""

    node: Anvil
    deployment: Deployment
    w3: Web3

    def chain(self, key: str | bytes, **kwargs: Any) -> Chain:
        """A fresh Chain (and nonce book) signing with ``key``."""
        w3 = Web3(Web3.HTTPProvider(self.node.url, request_kwargs={"timeout": 10}))
        return Chain(w3, Account.from_key(key), **kwargs)

    def broker(self, key: str | bytes, **kwargs: Any) -> PaymentBroker:
        return PaymentBroker(self.chain(key, **kwargs), self.deployment.payment_broker)

    def now(self) -> float:
        return float(self.w3.eth.get_block("latest")["timestamp"])

    def balance(self, address: str) -> int:
        return int(self.w3.eth.get_balance(Web3.to_checksum_address(address)))

    def nonce(self, address: str) -> int:
        return int(self.w3.eth.get_transaction_count(Web3.to_checksum_address(address)))

    def gas_cost_wei(self, tx_hash: str) -> int:
        receipt = self.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
        return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])

    def redeemed(self, payer: str, payee: str) -> int:
        return self.broker(DEPLOYER_KEY).redeemed(payer, payee)


@pytest.fixture
def market(node: Anvil, deployment: Deployment) -> Iterator[Market]:
    w3 = Web3(Web3.HTTPProvider(node.url, request_kwargs={"timeout": 10}))
    snapshot = rpc(w3, "evm_snapshot")["result"]
    try:
        yield Market(node, deployment, w3)
    finally:
        rpc(w3, "evm_revert", snapshot)


# --- the orchestrator ------------------------------------------------------------------------


@dataclass
class Orchestrator:
    """The real services and app, with one client per payer, each linked on chain."""

    services: Services
    clients: dict[str, Principal]

    def paid_job(self, worker: TestWorker, texts: int, payer: str = PAYER) -> int:
        """Submit a ``texts``-text job paid by ``payer``, have ``worker`` complete it; the
        orchestrator signs the new cumulative voucher. Returns the job's cost in wei."""
        now = self.services.now()
        spec = JobSpec.model_validate(
            {
                "type": "inference",
                "model": EMBED_MODEL,
                "input": {"texts": [f"text {i}" for i in range(texts)]},
                "max_price_wei_per_unit": PRICE_WEI,
            }
        )
        job, _ = self.services.jobs.submit(self.clients[payer], spec, now)
        self.services.leases.open_poll(worker.principal, 1, until=now + 10, now=now)
        assert self.services.leases.dispatch(now) == [(job.id, worker.id)]
        [leased] = self.services.leases.claim(worker.principal, 1, now)
        output = {"embeddings": [[float(i)] for i in range(texts)]}
        req = completion(
            worker,
            job.id,
            leased.attempt,
            output,
            units=texts,
            price_wei_per_unit=leased.price_wei_per_unit,
        )
        result = self.services.leases.complete(worker.principal, job.id, req, now)
        return int(result.cost_wei or 0)


OrchestratorFactory = Callable[..., Orchestrator]


@pytest.fixture
def orchestrator(
    market: Market, deployment_file: Path, tmp_path: Path
) -> Iterator[OrchestratorFactory]:
    """Build the orchestrator; ``lag_s`` sets its clock that far behind the chain's, and
    ``voucher_ttl_s`` how long its vouchers last (together: vouchers that are already expired)."""
    stores: list[Store] = []

    def make(*, voucher_ttl_s: int = VOUCHER_TTL_S, lag_s: float = 0.0) -> Orchestrator:
        settings = Settings(
            data_dir=tmp_path / "data",
            admin_token=ADMIN_TOKEN,
            deployment_file=deployment_file,
            signer_key=SIGNER_KEY,  # anvil's dev key 1: the dev chain only
            voucher_ttl_s=voucher_ttl_s,
        )
        store = Store(f"sqlite:///{tmp_path / 'orchestrator.db'}")
        store.migrate()
        stores.append(store)
        clock = FakeClock(market.now() - lag_s)
        services = build_services(settings, store=store, clock=clock, rng=random.Random(3))
        clients = {payer: _linked_client(services, key) for payer, key in PAYER_KEYS.items()}
        return Orchestrator(services, clients)

    yield make
    for store in stores:
        store.dispose()


PAYER_KEYS = {PAYER: PAYER_KEY, OTHER_PAYER: OTHER_PAYER_KEY}


def _linked_client(services: Services, payer_key: str) -> Principal:
    client_id, _ = services.auth.create_client("payer-client", services.now())
    client = Principal("client", client_id)
    address = Account.from_key(payer_key).address
    challenge = services.accounts.payer_challenge(client, address, services.now())
    signature = sign_registration(payer_key, challenge.message)
    services.accounts.link_payer(client, address, challenge.nonce, signature, services.now())
    return client


class RewriteVouchers(httpx.AsyncBaseTransport):
    """The real app, with GET /v1/workers/vouchers' body passed through ``rewrite``: an
    orchestrator that is misconfigured (or lies)."""

    def __init__(
        self, inner: httpx.AsyncBaseTransport, rewrite: Callable[[dict[str, Any]], Any]
    ) -> None:
        self.inner = inner
        self.rewrite = rewrite

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path != "/v1/workers/vouchers" or response.status_code != 200:
            return response
        body = json.loads(await response.aread())
        return httpx.Response(200, content=json.dumps(self.rewrite(body)))


@dataclass
class Worker:
    account: LocalAccount
    orchestrator: Orchestrator
    client: OrchestratorClient
    redeemer: Redeemer
    clock: FakeClock

    @property
    def address(self) -> str:
        return str(self.account.address)

    @property
    def signer(self) -> TestWorker:
        registration = self.client.registration
        assert registration is not None
        principal = Principal("worker", registration.worker_id)
        return TestWorker(principal, self.account, registration.session_token)

    def paid_job(self, texts: int, payer: str = PAYER) -> int:
        return self.orchestrator.paid_job(self.signer, texts, payer)


Body = Callable[[Worker], Awaitable[None]]


def with_worker(
    market: Market,
    orchestrator: Orchestrator,
    body: Body,
    *,
    key: str = WORKER_KEY,
    interval_s: float = 0.0,
    broker: PaymentBroker | None = None,
    receipt_timeout_s: float | None = None,
    rewrite: Callable[[dict[str, Any]], Any] | None = None,
) -> None:
    """Run ``body`` with the app up, the worker registered over HTTP, and its redeemer."""
    account = Account.from_key(key)
    clock = FakeClock(time.time())
    extra = {} if receipt_timeout_s is None else {"receipt_timeout_s": receipt_timeout_s}
    services = orchestrator.services

    async def main() -> None:
        app = create_app(services.settings, services=services, run_sweeper=False)
        async with app.router.lifespan_context(app):
            transport: httpx.AsyncBaseTransport = httpx.ASGITransport(app=app)
            if rewrite is not None:
                transport = RewriteVouchers(transport, rewrite)
            client = OrchestratorClient(BASE_URL, account, transport=transport)
            try:
                await client.register(hardware(), [offer(price=PRICE_WEI)], max_concurrency=1)
                redeemer = Redeemer(
                    client,
                    broker or market.broker(key, **extra),
                    account,
                    THRESHOLD_WEI,
                    interval_s,
                    clock,
                )
                await body(Worker(account, orchestrator, client, redeemer, clock))
            finally:
                await client.aclose()

    run(main)


def only(outcomes: list[RedeemOutcome]) -> RedeemOutcome:
    assert len(outcomes) == 1, outcomes
    return outcomes[0]


def fee_of(delta_wei: int) -> int:
    return delta_wei * FEE_BPS // 10_000


# --- threshold, interval, idempotence ----------------------------------------------------------


def test_a_voucher_over_the_threshold_is_redeemed_and_pays_exactly_its_delta(
    market: Market, orchestrator: OrchestratorFactory
) -> None:
    async def body(worker: Worker) -> None:
        cumulative = worker.paid_job(texts=20)
        assert cumulative == 20 * PRICE_WEI == 2 * THRESHOLD_WEI
        before = market.balance(worker.address)
        outcome = only(await worker.redeemer.redeem_due())
        assert outcome.status is RedeemStatus.REDEEMED and outcome.done
        assert outcome.tx_hash is not None
        assert (outcome.payer, outcome.cumulative_wei, outcome.owed_wei) == (
            PAYER,
            cumulative,
            cumulative,
        )
        assert (outcome.paid_wei, outcome.fee_wei) == (
            cumulative - fee_of(cumulative),
            fee_of(cumulative),
        )
        gas_wei = market.gas_cost_wei(outcome.tx_hash)
        after = market.balance(worker.address)
        assert after == before + cumulative - fee_of(cumulative) - gas_wei
        assert market.redeemed(PAYER, worker.address) == cumulative

    with_worker(market, orchestrator(), body)


def test_below_the_threshold_nothing_is_sent(
    market: Market, orchestrator: OrchestratorFactory
) -> None:
    async def body(worker: Worker) -> None:
        owed = worker.paid_job(texts=9)
        assert owed < THRESHOLD_WEI
        before = (market.balance(worker.address), market.nonce(worker.address))
        outcome = only(await worker.redeemer.redeem_due())
        assert outcome.status is RedeemStatus.BELOW_THRESHOLD
        assert (outcome.owed_wei, outcome.tx_hash) == (owed, None)
        assert (market.balance(worker.address), market.nonce(worker.address)) == before
        assert market.redeemed(PAYER, worker.address) == 0

    with_worker(market, orchestrator(), body)


def test_the_interval_redeems_a_small_amount_and_restarts(
    market: Market, orchestrator: OrchestratorFactory
) -> None:
    async def body(worker: Worker) -> None:
        small = worker.paid_job(texts=1)
        worker.clock.advance(INTERVAL_S - 1)
        assert only(await worker.redeemer.redeem_due()).status is RedeemStatus.BELOW_THRESHOLD
        worker.clock.advance(1)
        outcome = only(await worker.redeemer.redeem_due())
        assert outcome.status is RedeemStatus.REDEEMED
        assert outcome.paid_wei == small - fee_of(small)
        # The interval counts again from this redemption.
        more = worker.paid_job(texts=2)
        worker.clock.advance(INTERVAL_S / 2)
        outcome = only(await worker.redeemer.redeem_due())
        assert (outcome.status, outcome.owed_wei) == (RedeemStatus.BELOW_THRESHOLD, more)

    with_worker(market, orchestrator(), body, interval_s=INTERVAL_S)


def test_a_small_voucher_close_to_expiry_is_redeemed_before_it_lapses(
    market: Market, orchestrator: OrchestratorFactory
) -> None:
    async def body(worker: Worker) -> None:
        owed = worker.paid_job(texts=1)
        outcome = only(await worker.redeemer.redeem_due())
        assert (outcome.status, outcome.owed_wei) == (RedeemStatus.REDEEMED, owed)

    # Vouchers that last an hour: well inside REDEEM_BEFORE_EXPIRY_S, well before expiry.
    with_worker(market, orchestrator(voucher_ttl_s=3_600), body)


def test_force_redeems_anything_owed(market: Market, orchestrator: OrchestratorFactory) -> None:
    async def body(worker: Worker) -> None:
        owed = worker.paid_job(texts=1)
        assert only(await worker.redeemer.redeem_due()).status is RedeemStatus.BELOW_THRESHOLD
        assert only(await worker.redeemer.redeem_due(force=True)).status is RedeemStatus.REDEEMED
        assert market.redeemed(PAYER, worker.address) == owed

    with_worker(market, orchestrator(), body)


def test_the_same_voucher_again_sends_nothing(
    market: Market, orchestrator: OrchestratorFactory
) -> None:
    async def body(worker: Worker) -> None:
        worker.paid_job(texts=10)
        assert only(await worker.redeemer.redeem_due()).status is RedeemStatus.REDEEMED
        before = (market.balance(worker.address), market.nonce(worker.address))
        for force in (False, True):
            outcome = only(await worker.redeemer.redeem_due(force=force))
            assert (outcome.status, outcome.owed_wei) == (RedeemStatus.ALREADY_REDEEMED, 0)
            assert outcome.done and outcome.tx_hash is None
        assert (market.balance(worker.address), market.nonce(worker.address)) == before

    with_worker(market, orchestrator(), body)


def test_only_the_increase_is_paid_when_the_voucher_grows(
    market: Market, orchestrator: OrchestratorFactory
) -> None:
    async def body(worker: Worker) -> None:
        first = worker.paid_job(texts=10)
        assert only(await worker.redeemer.redeem_due()).status is RedeemStatus.REDEEMED
        second = worker.paid_job(texts=20)
        outcome = only(await worker.redeemer.redeem_due())
        assert (outcome.status, outcome.owed_wei) == (RedeemStatus.REDEEMED, second)
        assert outcome.cumulative_wei == first + second
        assert outcome.paid_wei + outcome.fee_wei == second
        assert market.redeemed(PAYER, worker.address) == first + second

    with_worker(market, orchestrator(), body)


# --- crash safety ----------------------------------------------------------------------------


def test_a_redemption_sent_before_a_crash_is_not_paid_twice(
    market: Market, orchestrator: OrchestratorFactory
) -> None:
    async def body(worker: Worker) -> None:
        cumulative = worker.paid_job(texts=20)
        [signed] = await worker.client.vouchers()
        # The process that crashed: it sent the redemption from the worker's key and died
        # before it saw the receipt. The restarted one has no memory of it.
        market.broker(WORKER_KEY).redeem(signed.voucher, signed.signature)
        deposit = market.broker(DEPLOYER_KEY).balance_of(PAYER)
        before = (market.balance(worker.address), market.nonce(worker.address))
        outcome = only(await worker.redeemer.redeem_due())
        assert outcome.status is RedeemStatus.ALREADY_REDEEMED and outcome.done
        assert (market.balance(worker.address), market.nonce(worker.address)) == before
        assert market.broker(DEPLOYER_KEY).balance_of(PAYER) == deposit
        assert market.redeemed(PAYER, worker.address) == cumulative

    with_worker(market, orchestrator(), body)


class StaleBroker(PaymentBroker):
    """Reads ``redeemed`` as 0: the read happened before the crashed process's redemption
    was mined, so the contract's NotIncreasing is the only guard left."""

    def redeemed(self, payer: str, payee: str) -> int:
        return 0


def test_not_increasing_from_the_contract_counts_as_done(
    market: Market, orchestrator: OrchestratorFactory
) -> None:
    stale = StaleBroker(market.chain(WORKER_KEY), market.deployment.payment_broker)

    async def body(worker: Worker) -> None:
        worker.paid_job(texts=20)
        [signed] = await worker.client.vouchers()
        market.broker(WORKER_KEY).redeem(signed.voucher, signed.signature)
        before = (market.balance(worker.address), market.nonce(worker.address))
        outcome = only(await worker.redeemer.redeem_due())
        assert outcome.status is RedeemStatus.ALREADY_REDEEMED and outcome.done
        assert "NotIncreasing" in outcome.detail
        assert (market.balance(worker.address), market.nonce(worker.address)) == before

    with_worker(market, orchestrator(), body, broker=stale)


def test_a_redemption_not_mined_in_time_is_not_sent_again(
    market: Market, orchestrator: OrchestratorFactory
) -> None:
    async def body(worker: Worker) -> None:
        cumulative = worker.paid_job(texts=20)
        rpc(market.w3, "evm_setAutomine", False)
        try:
            first = only(await worker.redeemer.redeem_due())
            assert first.status is RedeemStatus.PENDING and first.tx_hash is not None
            again = only(await worker.redeemer.redeem_due())
            assert (again.status, again.tx_hash) == (RedeemStatus.PENDING, first.tx_hash)
            pending = market.w3.eth.get_transaction_count(worker.account.address, "pending")
            assert pending == market.nonce(worker.address) + 1  # one transaction, not two
        finally:
            rpc(market.w3, "evm_setAutomine", True)
        rpc(market.w3, "evm_mine")
        done = only(await worker.redeemer.redeem_due())
        assert done.status is RedeemStatus.ALREADY_REDEEMED
        assert market.redeemed(PAYER, worker.address) == cumulative

    with_worker(market, orchestrator(), body, receipt_timeout_s=0.3)


# --- batches -------------------------------------------------------------------------------


def test_two_payers_due_are_redeemed_in_one_transaction(
    market: Market, orchestrator: OrchestratorFactory
) -> None:
    async def body(worker: Worker) -> None:
        amounts = {PAYER: worker.paid_job(texts=20), OTHER_PAYER: worker.paid_job(30, OTHER_PAYER)}
        before = (market.balance(worker.address), market.nonce(worker.address))
        outcomes = await worker.redeemer.redeem_due()
        assert {o.payer: o.status for o in outcomes} == {
            PAYER: RedeemStatus.REDEEMED,
            OTHER_PAYER: RedeemStatus.REDEEMED,
        }
        tx_hashes = {o.tx_hash for o in outcomes}
        assert len(tx_hashes) == 1
        assert market.nonce(worker.address) == before[1] + 1
        for outcome in outcomes:
            assert outcome.fee_wei == fee_of(amounts[outcome.payer])
            assert outcome.paid_wei == amounts[outcome.payer] - outcome.fee_wei
            assert market.redeemed(outcome.payer, worker.address) == amounts[outcome.payer]
        (tx_hash,) = tx_hashes
        assert tx_hash is not None
        paid = sum(o.paid_wei for o in outcomes)
        assert market.balance(worker.address) == before[0] + paid - market.gas_cost_wei(tx_hash)

    with_worker(market, orchestrator(), body)


def test_one_refused_voucher_does_not_block_the_others(
    market: Market, orchestrator: OrchestratorFactory
) -> None:
    async def body(worker: Worker) -> None:
        owed = worker.paid_job(texts=10)
        worker.paid_job(texts=10, payer=OTHER_PAYER)
        # The other payer revokes the orchestrator after the job: the contract refuses its
        # voucher, which would revert the whole batch.
        market.broker(OTHER_PAYER_KEY).authorize(SIGNER, 0)
        delay = market.broker(OTHER_PAYER_KEY).withdraw_delay_s()
        rpc(market.w3, "evm_increaseTime", delay + 1)  # a revocation waits out the delay
        rpc(market.w3, "evm_mine")
        outcomes = {o.payer: o for o in await worker.redeemer.redeem_due()}
        assert outcomes[PAYER].status is RedeemStatus.REDEEMED
        assert outcomes[OTHER_PAYER].status is RedeemStatus.FAILED
        assert "UnauthorizedSigner" in outcomes[OTHER_PAYER].detail
        assert market.redeemed(PAYER, worker.address) == owed
        assert market.redeemed(OTHER_PAYER, worker.address) == 0

    with_worker(market, orchestrator(), body)


# --- skips and failures ----------------------------------------------------------------------


def test_an_expired_voucher_is_skipped_with_its_reason(
    market: Market, orchestrator: OrchestratorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpumarket.worker")
    # An orchestrator whose vouchers last 60 s, signing 10 minutes ago.
    lagging = orchestrator(voucher_ttl_s=60, lag_s=600)

    async def body(worker: Worker) -> None:
        worker.paid_job(texts=20)
        [signed] = await worker.client.vouchers()
        before = market.nonce(worker.address)
        outcome = only(await worker.redeemer.redeem_due(force=True))
        assert outcome.status is RedeemStatus.EXPIRED and not outcome.done
        assert str(signed.voucher.expiry) in outcome.detail
        assert market.nonce(worker.address) == before
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("expired" in m and PAYER in m for m in warned), warned

    with_worker(market, lagging, body)


def test_vouchers_for_another_payee_chain_or_broker_are_not_sent(
    market: Market, orchestrator: OrchestratorFactory
) -> None:
    def misconfigured(body: dict[str, Any]) -> dict[str, Any]:
        [item] = body["vouchers"]
        other_payee = {**item, "voucher": {**item["voucher"], "payee": SIGNER}}
        other_chain = {**item, "chain_id": 1}
        other_broker = {**item, "payment_broker": market.deployment.worker_registry}
        return {"vouchers": [other_payee, other_chain, other_broker]}

    async def body(worker: Worker) -> None:
        worker.paid_job(texts=20)
        before = market.nonce(worker.address)
        outcomes = await worker.redeemer.redeem_due(force=True)
        assert [o.status for o in outcomes] == [RedeemStatus.NOT_FOR_US] * 3
        assert "payee" in outcomes[0].detail and "chain 1" in outcomes[1].detail
        assert "broker" in outcomes[2].detail
        assert market.nonce(worker.address) == before

    with_worker(market, orchestrator(), body, rewrite=misconfigured)


def test_an_unfunded_worker_logs_the_gas_it_needs_and_keeps_running(
    market: Market, orchestrator: OrchestratorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpumarket.worker")
    broke = Account.from_key(BROKE_KEY).address
    rpc(market.w3, "anvil_setBalance", broke, "0x0")  # staked, but nothing left for gas

    async def body(worker: Worker) -> None:
        worker.paid_job(texts=20)
        outcome = only(await worker.redeemer.redeem_due())
        assert outcome.status is RedeemStatus.FAILED
        assert outcome.detail.startswith("InsufficientFundsForGas")
        (record,) = [r for r in caplog.records if "cannot pay the gas" in r.getMessage()]
        assert broke in record.getMessage() and record.levelno == logging.ERROR
        # The loop goes on after the failure, until told to stop.
        stop = asyncio.Event()
        worker.redeemer.poll_interval_s = LOOP_POLL_S
        loop = asyncio.create_task(worker.redeemer.run(stop))
        await asyncio.sleep(6 * LOOP_POLL_S)
        assert not loop.done()
        stop.set()
        await asyncio.wait_for(loop, WAIT_S)
        assert market.redeemed(PAYER, worker.address) == 0

    with_worker(market, orchestrator(), body, key=BROKE_KEY)


def test_the_loop_redeems_when_due_and_stops_on_request(
    market: Market, orchestrator: OrchestratorFactory
) -> None:
    async def body(worker: Worker) -> None:
        worker.redeemer.poll_interval_s = LOOP_POLL_S
        stop = asyncio.Event()
        loop = asyncio.create_task(worker.redeemer.run(stop))
        owed = worker.paid_job(texts=10)
        await eventually(lambda: market.redeemed(PAYER, worker.address) == owed)
        stop.set()
        await asyncio.wait_for(loop, WAIT_S)

    with_worker(market, orchestrator(), body)


# --- stake and wiring ------------------------------------------------------------------------


def test_stake_if_needed_tops_up_to_stake_wei_once(market: Market) -> None:
    registry = WorkerRegistry(market.chain(UNSTAKED_KEY), market.deployment.worker_registry)
    address = registry.chain.address

    async def body() -> None:
        assert await stake_if_needed(registry, MIN_STAKE_WEI - 1) is None
        assert registry.stake_of(address) == 0
        staked = await stake_if_needed(registry, 2 * MIN_STAKE_WEI)
        assert staked is not None
        assert registry.stake_of(address) == 2 * MIN_STAKE_WEI
        assert registry.is_eligible(address)
        assert await stake_if_needed(registry, 3 * MIN_STAKE_WEI) is None

    run(body)


def test_run_payments_stakes_then_redeems_what_the_jobs_earned(
    market: Market, orchestrator: OrchestratorFactory
) -> None:
    """The wiring of ``worker run``: the chain from GET /v1/chain, stake at start-up (so the
    orchestrator will match the worker), then vouchers redeemed as jobs complete."""
    account = Account.from_key(STAKED_BY_RUN_KEY)
    paying = orchestrator()
    settings = WorkerSettings(redeem_threshold_wei=THRESHOLD_WEI, stake_wei=MIN_STAKE_WEI)
    registry = WorkerRegistry(market.chain(DEPLOYER_KEY), market.deployment.worker_registry)
    services = paying.services
    metrics = WorkerMetrics()
    board = StatusBoard(account.address, metrics, {EMBED_MODEL: PRICE_WEI}, lambda: 0, 1)

    async def body() -> None:
        app = create_app(services.settings, services=services, run_sweeper=False)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            client = OrchestratorClient(BASE_URL, account, transport=transport)
            try:
                stop = asyncio.Event()
                payments = asyncio.create_task(
                    run_payments(
                        settings,
                        client,
                        account,
                        stop,
                        poll_interval_s=LOOP_POLL_S,
                        metrics=metrics,
                        board=board,
                    )
                )
                await eventually(lambda: registry.stake_of(account.address) == MIN_STAKE_WEI)
                registration = await client.register(
                    hardware(), [offer(price=PRICE_WEI)], max_concurrency=1
                )
                principal = Principal("worker", registration.worker_id)
                worker = TestWorker(principal, account, registration.session_token)
                owed = paying.paid_job(worker, texts=10)
                await eventually(lambda: market.redeemed(PAYER, account.address) == owed)
                stop.set()
                await asyncio.wait_for(payments, WAIT_S)
            finally:
                await client.aclose()
        # The status line's money: what the vouchers say, and what reached the account.
        assert board.problem is None
        assert metrics.earned_wei == owed
        assert metrics.redeemed_wei == owed - owed * FEE_BPS // 10_000
        assert f"vouchers {owed} wei, redeemed {metrics.redeemed_wei} wei" in board.line()

    run(body)


def test_an_unstaked_worker_is_told_loudly_it_gets_no_work(
    market: Market, orchestrator: OrchestratorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    account = Account.create()  # no ETH, no stake, and not asked to stake
    services = orchestrator().services
    board = StatusBoard(account.address, WorkerMetrics(), {EMBED_MODEL: PRICE_WEI}, lambda: 0, 1)

    async def body() -> None:
        app = create_app(services.settings, services=services, run_sweeper=False)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            client = OrchestratorClient(BASE_URL, account, transport=transport)
            try:
                stop = asyncio.Event()
                payments = asyncio.create_task(
                    run_payments(
                        WorkerSettings(),
                        client,
                        account,
                        stop,
                        poll_interval_s=LOOP_POLL_S,
                        board=board,
                    )
                )
                await eventually(lambda: board.problem is not None)
                stop.set()
                await asyncio.wait_for(payments, WAIT_S)
            finally:
                await client.aclose()

    with caplog.at_level(logging.ERROR, logger="gpumarket.worker.status"):
        run(body)
    [loud] = [r.getMessage() for r in caplog.records if r.name == "gpumarket.worker.status"]
    assert loud.startswith(f"NO WORK FOR THIS WORKER: {account.address} is not eligible")
    assert f"minimum {MIN_STAKE_WEI} wei" in loud
    assert f"GPUMARKET_WORKER_STAKE_WEI={MIN_STAKE_WEI}" in loud
    assert "NO WORK: " in board.line()


def test_run_payments_returns_at_once_when_the_orchestrator_does_not_pay(
    tmp_path: Path,
) -> None:
    account = Account.create()
    settings = Settings(data_dir=tmp_path / "data", admin_token=ADMIN_TOKEN)
    services = build_services(settings, store=Store(f"sqlite:///{tmp_path / 'free.db'}"))

    async def body() -> None:
        app = create_app(settings, services=services, run_sweeper=False)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            client = OrchestratorClient(BASE_URL, account, transport=transport)
            try:
                assert await client.chain_info() is None
                await asyncio.wait_for(
                    run_payments(WorkerSettings(), client, account, asyncio.Event()), WAIT_S
                )
            finally:
                await client.aclose()

    try:
        run(body)
    finally:
        services.store.dispose()


def test_an_unfunded_worker_is_told_the_command_that_funds_it(
    market: Market, caplog: pytest.LogCaptureFixture
) -> None:
    """The stake error names `gpumarket chain fund`; run as printed, it makes staking work."""
    new_key = Account.create().key
    registry = WorkerRegistry(market.chain(new_key), market.deployment.worker_registry)
    address = registry.chain.address

    async def refused() -> None:
        assert await stake_if_needed(registry, MIN_STAKE_WEI) is None

    async def staked() -> None:
        assert await stake_if_needed(registry, MIN_STAKE_WEI) is not None

    with caplog.at_level(logging.ERROR, logger="gpumarket.worker.redeemer"):
        run(refused)
    [line] = [r.getMessage() for r in caplog.records if "cannot stake" in r.getMessage()]
    assert "without stake this worker gets no paid jobs" in line
    command = re.search(r"`(gpumarket chain fund [^`]+)`", line)
    assert command, line
    assert address in command.group(1) and market.node.url in command.group(1)

    program, *args = shlex.split(command.group(1))
    assert program == "gpumarket"
    funded = CliRunner().invoke(cli_app, args, env={"COLUMNS": "80"})
    assert funded.exit_code == 0, funded.output
    assert f"to {address}" in funded.output
    run(staked)
    assert registry.is_eligible(address)
