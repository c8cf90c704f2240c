"""The orchestrator's redemption rows follow a chain that rolls back, against a real anvil.

anvil's ``evm_snapshot``/``evm_revert`` and ``anvil_rollback`` roll the chain back for real;
new transactions then re-mine the same heights with other blocks (other hashes), as when anvil
restarts from an older state file. After each ``reconcile`` the rows must be exactly the
chain's Redeemed events: the same logs, from the same blocks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from sqlalchemy import select
from web3 import Web3

from contracts.anvil import DEV_PRIVATE_KEYS, Anvil
from contracts.broker import PaymentBroker
from contracts.chain import Chain
from contracts.deploy import deploy
from contracts.events import Redeemed
from contracts.registry import WorkerRegistry
from orchestrator.services import redemptions
from orchestrator.services.auth import Principal
from orchestrator.services.metrics import read_market_snapshot
from orchestrator.services.settlement import ChainPayments
from orchestrator.store import Store
from orchestrator.store.models import ChainCursor, Redemption
from orchestrator.wiring import Services
from tests.conftest import FakeClock
from tests.contracts.test_settlement import TEXTS, _client, _fund, _link, _paid_services, _spec
from tests.support import TestWorker, completion, offer, register_request

DEPLOYER, PAYER = DEV_PRIVATE_KEYS[0], DEV_PRIVATE_KEYS[2]
WORKER_KEYS = (DEV_PRIVATE_KEYS[3], DEV_PRIVATE_KEYS[4])
PRICE = 10**12
STAKE_WEI = 10**17
REPLICA_ROUNDS = 4
REPLICA_JOIN_TIMEOUT_S = 30.0
LOST_TX_RECEIPT_TIMEOUT_S = 5.0  # a transaction stuck behind a nonce gap never comes


def _rpc(w3: Web3, method: str, *params: Any) -> Any:
    return w3.provider.make_request(method, list(params))["result"]  # type: ignore[arg-type]


class PaidMarket:
    """An orchestrator's services on chain with one linked, funded payer and staked workers
    that redeem what the orchestrator's vouchers say, as the worker daemon does."""

    def __init__(self, anvil: Anvil, services: Services) -> None:
        self.anvil = anvil
        self.services = services
        assert isinstance(services.payments, ChainPayments)
        self.payments: ChainPayments = services.payments
        self.client = _client(services)
        _link(services, self.client, PAYER)
        _fund(anvil, services, deposit=10**18, cap=10**18)
        self.workers = [self._worker(key) for key in WORKER_KEYS]

    @property
    def clock(self) -> FakeClock:
        clock = self.services.clock
        assert isinstance(clock, FakeClock)
        return clock

    def _worker(self, key: str) -> TestWorker:
        deployment = self.payments.deployment
        WorkerRegistry(Chain.connect(self.anvil.url, key), deployment.worker_registry).stake(
            STAKE_WEI
        )
        account = Account.from_key(key)
        svc = self.services
        challenge = svc.workers.challenge(account.address, svc.now())
        req = register_request(
            account, challenge.nonce, challenge.message, offers=[offer(price=PRICE)]
        )
        resp = svc.workers.register(req, svc.now())
        return TestWorker(Principal("worker", resp.worker_id), account, resp.session_token)

    def paid_job(self, worker: TestWorker) -> None:
        """One job, leased to and completed by ``worker``: ledger entry and voucher."""
        svc = self.services
        job, _ = svc.jobs.submit(self.client, _spec(), svc.now())
        svc.leases.open_poll(worker.principal, 1, until=svc.now() + 5, now=svc.now())
        assert svc.leases.dispatch(svc.now()) == [(job.id, worker.id)]
        [leased] = svc.leases.claim(worker.principal, 1, svc.now())
        output = {"embeddings": [[1.0]] * len(TEXTS)}
        assert leased.price_wei_per_unit is not None
        req = completion(
            worker,
            job.id,
            leased.attempt,
            output,
            units=len(TEXTS),
            price_wei_per_unit=leased.price_wei_per_unit,
        )
        svc.leases.complete(worker.principal, job.id, req, svc.now())
        self.clock.advance(6)  # the poll above is over: the next job goes where it is sent

    def redeem(self, worker: TestWorker) -> str:
        """``worker`` redeems its latest voucher; returns the transaction hash."""
        [signed] = self.services.workers.vouchers(worker.principal, self.services.now())
        key = WORKER_KEYS[[w.id for w in self.workers].index(worker.id)]
        broker = PaymentBroker(
            Chain.connect(self.anvil.url, key), self.payments.deployment.payment_broker
        )
        return broker.redeem(signed.voucher, signed.signature).tx_hash

    def chain_events(self) -> set[tuple[str, int, str, int]]:
        """(tx hash, log index, block hash, paid wei) of the chain's Redeemed events now."""
        deployment = self.payments.deployment
        broker = PaymentBroker(Chain.connect(self.anvil.url), deployment.payment_broker)
        events = broker.events.read(Redeemed, deployment.deployed_at_block)
        return {(e.tx_hash, e.log_index, e.block_hash, e.paid_wei) for e in events}

    def rows(self) -> set[tuple[str, int, str, int]]:
        with self.services.store.read() as s:
            return {
                (r.tx_hash, r.log_index, r.block_hash, r.paid_wei)
                for r in s.scalars(select(Redemption))
            }


@pytest.fixture
def market(anvil: Anvil, w3: Web3, tmp_path: Path, store: Store) -> Iterator[PaidMarket]:
    services = _paid_services(anvil, w3, tmp_path, store, verify_rate=0.0, verify_rate_new=0.0)
    yield PaidMarket(anvil, services)


def test_a_rollback_re_mined_with_other_transactions_rebuilds_the_rows(
    market: PaidMarket, w3: Web3
) -> None:
    first, second = market.workers
    market.paid_job(first)
    market.redeem(first)
    assert market.payments.reconcile() == 1
    snapshot = _rpc(w3, "evm_snapshot")

    market.paid_job(first)
    market.redeem(first)
    market.paid_job(second)
    lost = market.redeem(second)
    assert market.payments.reconcile() == 2
    assert market.rows() == market.chain_events()
    report = market.services.accounts.settlement()
    assert report.consistent, report.problems
    head_before = w3.eth.block_number

    assert _rpc(w3, "evm_revert", snapshot)  # the last two redemptions are gone from the chain
    report = market.services.accounts.settlement()
    assert not report.consistent
    assert any("no longer has block" in p for p in report.problems), report.problems
    assert sum("is not on chain" in p for p in report.problems) == 2, report.problems

    # Other transactions re-mine the same heights: the second worker's redemption first, one
    # block lower, at another base fee: another transaction (the very same one, re-mined, is
    # not new: test_the_same_transaction_re_mined_elsewhere_is_read_again_not_new).
    assert market.redeem(second) != lost
    while w3.eth.block_number < head_before:
        PaymentBroker(
            Chain.connect(market.anvil.url, PAYER), market.payments.deployment.payment_broker
        ).deposit(1)
    assert w3.eth.block_number == head_before  # same height as read, other blocks

    assert market.payments.reconcile() == 1  # the second worker's new redemption
    assert market.rows() == market.chain_events()
    assert len(market.rows()) == 2
    report = market.services.accounts.settlement()
    assert report.consistent, report.problems
    by_payee = {p.payee: p for p in report.pairs}
    one_job = PRICE * len(TEXTS)
    assert by_payee[first.address].redeemed_wei == one_job  # its second redemption was undone
    assert by_payee[first.address].ledger_wei == 2 * one_job
    assert by_payee[second.address].redeemed_wei == one_job
    for pair in report.pairs:
        assert (pair.redemptions, pair.paid_wei, pair.fee_wei) == (
            pair.chain_redemptions,
            pair.chain_paid_wei,
            pair.chain_fee_wei,
        )
    budget = market.services.accounts.account(market.client).budget
    assert budget is not None and budget.unredeemed_wei == one_job  # the first worker's 2nd job
    _assert_metrics_and_dashboard_show_the_chain(market)

    market.redeem(first)  # the undone redemption, sent again
    assert market.payments.reconcile() == 1
    assert market.rows() == market.chain_events()
    assert market.services.accounts.settlement().consistent
    assert market.payments.reconcile() == 0  # idempotent


def _assert_metrics_and_dashboard_show_the_chain(market: PaidMarket) -> None:
    """/metrics' and the dashboard's redeemed wei are the chain's, per worker and in total."""
    deployment = market.payments.deployment
    broker = PaymentBroker(Chain.connect(market.anvil.url), deployment.payment_broker)
    paid: dict[str, int] = {}
    fees = 0
    for e in broker.events.read(Redeemed, deployment.deployed_at_block):
        paid[e.payee] = paid.get(e.payee, 0) + e.paid_wei
        fees += e.fee_wei
    now = market.services.now()
    snapshot = read_market_snapshot(market.services.store, now, online_window_s=3600)
    assert (snapshot.wei_redeemed, snapshot.wei_fees) == (sum(paid.values()), fees)
    board = market.services.dashboard.snapshot(now, window_s=300, bucket_s=60)
    assert board.totals.wei_redeemed_total == sum(paid.values())
    assert {w.address: w.redeemed_wei for w in board.workers if w.redeemed_wei} == paid


def test_the_same_transaction_re_mined_elsewhere_is_read_again_not_new(
    market: PaidMarket, w3: Web3
) -> None:
    """A reorg usually re-includes the lost transactions, at another height: the row follows
    its transaction to its new block and is not counted again."""
    first, _ = market.workers
    market.paid_job(first)
    # At anvil's lowest base fee (7 wei) fees no longer move, so the worker's redemption, sent
    # again at the same nonce after the rollback, is the very same transaction.
    _rpc(w3, "anvil_setNextBlockBaseFeePerGas", hex(7))
    _rpc(w3, "evm_mine")
    snapshot = _rpc(w3, "evm_snapshot")
    lost = market.redeem(first)
    assert market.payments.reconcile() == 1
    [(_, _, lost_block, _)] = market.rows()

    assert _rpc(w3, "evm_revert", snapshot)
    PaymentBroker(
        Chain.connect(market.anvil.url, PAYER), market.payments.deployment.payment_broker
    ).deposit(1)  # another transaction takes the lost block's height
    assert market.redeem(first) == lost  # mined again, one block higher
    assert market.payments.reconcile() == 0  # the same redemption, not a new one
    assert market.rows() == market.chain_events()
    [(tx_hash, _, block_hash, _)] = market.rows()
    assert tx_hash == lost
    assert block_hash != lost_block  # the row moved with its transaction
    report = market.services.accounts.settlement()
    assert report.consistent, report.problems
    assert market.payments.reconcile() == 0


def test_a_head_below_the_cursor_drops_the_rows_above_it(market: PaidMarket, w3: Web3) -> None:
    first, second = market.workers
    market.paid_job(first)
    market.paid_job(second)
    market.redeem(first)
    kept = w3.eth.block_number
    market.redeem(second)
    assert market.payments.reconcile() == 2

    _rpc(w3, "anvil_rollback", 1)  # the second redemption's block is gone, nothing replaces it
    assert w3.eth.block_number == kept
    assert market.payments.reconcile() == 0
    assert market.rows() == market.chain_events()
    assert {p.payee: p.redemptions for p in market.services.accounts.settlement().pairs} == {
        first.address: 1,
        second.address: 0,
    }


def test_a_rollback_below_every_row_reads_again_from_the_deployment(
    market: PaidMarket, w3: Web3
) -> None:
    first, _ = market.workers
    market.paid_job(first)
    snapshot = _rpc(w3, "evm_snapshot")
    market.redeem(first)
    assert market.payments.reconcile() == 1
    _rpc(w3, "evm_revert", snapshot)
    assert market.payments.reconcile() == 0
    assert market.rows() == market.chain_events() == set()
    market.redeem(first)
    assert market.payments.reconcile() == 1
    assert market.rows() == market.chain_events()


def test_rows_count_as_paid_only_after_the_confirmations(
    anvil: Anvil, w3: Web3, tmp_path: Path, store: Store
) -> None:
    services = _paid_services(
        anvil,
        w3,
        tmp_path,
        store,
        verify_rate=0.0,
        verify_rate_new=0.0,
        redemption_confirmations=2,
    )
    market = PaidMarket(anvil, services)
    first, _ = market.workers
    market.paid_job(first)
    market.redeem(first)
    assert market.payments.reconcile() == 1
    [pair] = services.accounts.settlement().pairs
    assert (pair.redemptions, pair.unconfirmed_redemptions, pair.redeemed_wei) == (1, 1, 0)
    budget = services.accounts.account(market.client).budget
    assert budget is not None and budget.unredeemed_wei == PRICE * len(TEXTS)  # still owed

    _rpc(w3, "evm_mine")
    market.payments.reconcile()
    assert services.accounts.settlement().pairs[0].redeemed_wei == 0  # one block on top
    _rpc(w3, "evm_mine")
    market.payments.reconcile()
    [pair] = services.accounts.settlement().pairs
    assert (pair.unconfirmed_redemptions, pair.redeemed_wei) == (0, PRICE * len(TEXTS))
    budget = services.accounts.account(market.client).budget
    assert budget is not None and budget.unredeemed_wei == 0


def test_a_round_that_fails_midway_changes_nothing(
    market: PaidMarket, w3: Web3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crash safety: rows and cursor move together in one transaction, or not at all."""
    first, second = market.workers
    market.paid_job(first)
    market.redeem(first)
    snapshot = _rpc(w3, "evm_snapshot")
    market.paid_job(second)
    market.redeem(second)
    assert market.payments.reconcile() == 2
    rows = market.rows()
    with market.services.store.read() as s:
        cursor = s.get(ChainCursor, "broker.redeemed")
        assert cursor is not None
        kept_cursor = (cursor.next_block, cursor.block_hash)

    _rpc(w3, "evm_revert", snapshot)
    # The second worker redeems again, one block later: another transaction takes its old
    # height (re-mined alone within the same second, its block would be the very same block).
    payer = PaymentBroker(
        Chain.connect(market.anvil.url, PAYER), market.payments.deployment.payment_broker
    )
    payer.deposit(1)
    market.redeem(second)

    def crash(*_: object, **__: object) -> Redemption:
        raise RuntimeError("the process died between dropping the old rows and adding the new")

    monkeypatch.setattr(redemptions, "_row", crash)
    with pytest.raises(RuntimeError, match="process died"):
        market.payments.reconcile()
    assert market.rows() == rows  # the rollback was seen, but nothing was half-applied
    with market.services.store.read() as s:
        cursor = s.get(ChainCursor, "broker.redeemed")
        assert cursor is not None and (cursor.next_block, cursor.block_hash) == kept_cursor
    monkeypatch.undo()

    market.payments.reconcile()
    assert market.rows() == market.chain_events()
    assert len(market.rows()) == 2
    assert market.rows() != rows  # the second worker's redemption, from another block


def test_a_sender_whose_transaction_the_chain_lost_sends_at_the_nodes_nonce(
    anvil: Anvil, w3: Web3
) -> None:
    """A worker that redeemed in a block the chain then lost must not count its nonce past
    the node's: its next transaction would wait forever behind the gap."""
    deployment = deploy(Chain.connect(anvil.url, DEPLOYER))
    chain = Chain.connect(anvil.url, PAYER, receipt_timeout_s=LOST_TX_RECEIPT_TIMEOUT_S)
    broker = PaymentBroker(chain, deployment.payment_broker)
    snapshot = _rpc(w3, "evm_snapshot")
    broker.deposit(1)
    _rpc(w3, "evm_revert", snapshot)  # the deposit's block is gone, and its nonce is free

    broker.deposit(2)  # mined at the node's nonce, not one past it
    assert broker.balance_of(chain.address) == 2
    broker.deposit(3)  # and the book counts on from there
    assert broker.balance_of(chain.address) == 5


def test_two_replicas_reconciling_at_once_see_no_rollback(
    market: PaidMarket, caplog: pytest.LogCaptureFixture
) -> None:
    """Replicas share the cursor: one that read the head before the other moved the cursor
    must not take the cursor ahead of its head for a rollback."""
    other = ChainPayments(
        market.services.store,
        Chain.connect(market.anvil.url),
        market.payments.deployment,
        Account.from_key(DEPLOYER),
        voucher_ttl_s=market.services.settings.voucher_ttl_s,
    )
    stop = threading.Event()
    errors: list[BaseException] = []

    def reconcile_until_stopped(payments: ChainPayments) -> None:
        while not stop.is_set():
            try:
                payments.reconcile()
            except BaseException as exc:  # reported by the test, not lost in the thread
                errors.append(exc)
                return

    replicas = [
        threading.Thread(target=reconcile_until_stopped, args=(p,))
        for p in (market.payments, other)
    ]
    for thread in replicas:
        thread.start()
    try:
        for _ in range(REPLICA_ROUNDS):
            for worker in market.workers:
                market.paid_job(worker)
                market.redeem(worker)
    finally:
        stop.set()
        for thread in replicas:
            thread.join(timeout=REPLICA_JOIN_TIMEOUT_S)
    assert errors == []
    market.payments.reconcile()
    assert market.rows() == market.chain_events()
    assert len(market.rows()) == REPLICA_ROUNDS * len(market.workers)
    assert "rolled back" not in caplog.text
