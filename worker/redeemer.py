"""Redeem the worker's payment vouchers on-chain, by threshold or by interval, idempotently.

The orchestrator keeps, per payer, the latest cumulative voucher owed to this worker; the
PaymentBroker pays the increase over what it already paid for (payer, payee). What is owed is
always read from the chain, never remembered: after a crash between sending a redemption and
seeing its receipt, the chain says what was paid, and the contract refuses a replay
(``NotIncreasing``), which counts here as done. Payers due together go in one ``redeemBatch``
transaction. web3 blocks, so each chain call runs in a thread under a named timeout; errors
are logged and the next round tries again, they never stop the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import httpx
from eth_account.signers.local import LocalAccount
from eth_typing import HexStr
from web3.exceptions import TransactionNotFound, Web3Exception

from contracts.anvil import DEV_CHAIN_ID, fund_command
from contracts.broker import PaymentBroker, RedeemResult
from contracts.chain import (
    RPC_TIMEOUT_S,
    Chain,
    ChainError,
    ContractRevert,
    InsufficientFundsForGas,
    ReceiptTimeout,
    TxResult,
)
from contracts.registry import WorkerRegistry
from worker.client import OrchestratorClient, OrchestratorError, SignedVoucher
from worker.metrics import WorkerMetrics

log = logging.getLogger("gpumarket.worker.redeemer")

POLL_INTERVAL_S = 60.0
"""How often ``run`` fetches the vouchers and decides what is due."""
SESSION_WAIT_S = 2.0
"""Pause between looks while the daemon has no session with the orchestrator yet."""
CHAIN_READ_TIMEOUT_S = 2 * RPC_TIMEOUT_S
"""Limit on one read from the chain (one JSON-RPC request, plus room for the thread)."""
SEND_RPC_ALLOWANCE_S = 6 * RPC_TIMEOUT_S
"""Added to the receipt timeout for a write: fees, estimate, balance, nonce and send requests."""
EXPIRY_MARGIN_S = 60
"""A voucher expiring within this many seconds is skipped: it could be mined after expiry."""
REDEEM_BEFORE_EXPIRY_S = 86_400
"""A voucher expiring within this many seconds is due whatever it owes: once expired, it pays
nothing (with ``interval_s`` 0, a small amount would otherwise wait for the threshold and lapse)."""

CHAIN_FAILURES = (ChainError, Web3Exception, OSError, TimeoutError)
"""What a chain call may raise: our error tree, web3's, the connection's, our own timeout."""
ORCHESTRATOR_FAILURES = (OrchestratorError, httpx.HTTPError)

T = TypeVar("T")


class RedeemStatus(enum.StrEnum):
    REDEEMED = "redeemed"
    """Sent now and mined: ``paid_wei`` reached this worker."""
    ALREADY_REDEEMED = "already_redeemed"
    """The chain already holds this cumulative amount (an earlier run, or another sender)."""
    BELOW_THRESHOLD = "below_threshold"
    EXPIRED = "expired"
    NOT_FOR_US = "not_for_us"
    """Another payee, chain or broker than this worker's: redeeming it would revert."""
    PENDING = "pending"
    """A redemption of this payer's voucher was sent and is not mined yet."""
    FAILED = "failed"


@dataclass(frozen=True)
class RedeemOutcome:
    """What became of one payer's voucher in a round. Amounts in wei; ``owed_wei`` is the
    cumulative amount minus what the chain had paid before this round (0 when unknown)."""

    payer: str
    cumulative_wei: int
    status: RedeemStatus
    owed_wei: int = 0
    paid_wei: int = 0
    fee_wei: int = 0
    tx_hash: str | None = None
    detail: str = ""

    @property
    def done(self) -> bool:
        """The chain has paid this voucher's cumulative amount."""
        return self.status in (RedeemStatus.REDEEMED, RedeemStatus.ALREADY_REDEEMED)


@dataclass(frozen=True)
class _Claim:
    signed: SignedVoucher
    owed_wei: int

    @property
    def payer(self) -> str:
        return self.signed.voucher.payer

    @property
    def cumulative_wei(self) -> int:
        return self.signed.voucher.cumulative_amount

    def outcome(
        self,
        status: RedeemStatus,
        *,
        paid_wei: int = 0,
        fee_wei: int = 0,
        tx_hash: str | None = None,
        detail: str = "",
    ) -> RedeemOutcome:
        return RedeemOutcome(
            payer=self.payer,
            cumulative_wei=self.cumulative_wei,
            status=status,
            owed_wei=self.owed_wei,
            paid_wei=paid_wei,
            fee_wei=fee_wei,
            tx_hash=tx_hash,
            detail=detail,
        )


async def _on_chain(call: Callable[[], T], timeout_s: float) -> T:
    """Run a blocking web3 call in a thread, waiting at most ``timeout_s`` seconds for it."""
    return await asyncio.wait_for(asyncio.to_thread(call), timeout=timeout_s)


class Redeemer:
    """Redeems the vouchers owed to ``account`` through ``broker`` (whose chain key pays the
    gas). A payer's voucher is due when it owes at least ``threshold_wei``, when ``interval_s``
    seconds have passed since this redeemer last redeemed (0: threshold only), or when it
    expires within ``REDEEM_BEFORE_EXPIRY_S``. ``clock`` gives unix seconds."""

    def __init__(
        self,
        client: OrchestratorClient,
        broker: PaymentBroker,
        account: LocalAccount,
        threshold_wei: int,
        interval_s: float = 0.0,
        clock: Callable[[], float] = time.time,
        *,
        poll_interval_s: float = POLL_INTERVAL_S,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        if threshold_wei < 1:
            raise ValueError("threshold_wei must be at least 1 wei")
        self.client = client
        self.broker = broker
        self.payee = account.address
        self.threshold_wei = threshold_wei
        self.interval_s = interval_s
        self.clock = clock
        self.poll_interval_s = poll_interval_s
        self.metrics = metrics
        # The interval counts from start-up: a worker that restarts often does not pay gas
        # for small amounts at every start.
        self.last_redeemed_at = clock()
        self._send_timeout_s = broker.chain.receipt_timeout_s + SEND_RPC_ALLOWANCE_S
        self._chain_id: int | None = None
        # Sent but unmined redemptions (tx hash -> payers): not a record of amounts, only a
        # guard against paying gas twice for one redemption while the first is still pending.
        self._in_flight: dict[str, tuple[str, ...]] = {}
        self._round = asyncio.Lock()

    # --- the loop ------------------------------------------------------------------------

    async def run(self, stop_event: asyncio.Event) -> None:
        """Every ``poll_interval_s`` seconds until ``stop_event`` is set, redeem what is due.
        A failed round is logged and the next one tries again."""
        while not stop_event.is_set():
            wait_s = min(SESSION_WAIT_S, self.poll_interval_s)
            if self.client.registered:
                await self._round_logged()
                wait_s = self.poll_interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_event.wait(), timeout=wait_s)

    async def _round_logged(self) -> None:
        try:
            await self.redeem_due()
        except ORCHESTRATOR_FAILURES as exc:
            log.warning("could not fetch vouchers from the orchestrator: %s", exc)
        except CHAIN_FAILURES as exc:
            log.warning("could not read redeemed amounts from the chain: %r", exc)
        except Exception:  # payments must never take the worker (and its running jobs) down
            log.exception("redemption round failed")

    # --- one round -----------------------------------------------------------------------

    async def redeem_due(self, force: bool = False) -> list[RedeemOutcome]:
        """Fetch the vouchers, read from the chain what each payer still owes, and redeem
        those due (all with anything owed when ``force``), in one transaction. Returns one
        outcome per payer. Fetch and read errors propagate; send errors become FAILED."""
        async with self._round:
            signed = await self.client.vouchers()
            chain_id = await self._chain_id_once()
            await self._settle_in_flight()
            now = self.clock()
            interval_due = force or (
                self.interval_s > 0 and now - self.last_redeemed_at >= self.interval_s
            )
            outcomes: list[RedeemOutcome] = []
            due: list[_Claim] = []
            latest = self._latest_per_payer(signed, chain_id, outcomes)
            if self.metrics is not None:
                self.metrics.vouchers_seen(sum(v.voucher.cumulative_amount for v in latest))
            for voucher in latest:
                assessed = await self._assess(voucher, now, interval_due)
                if isinstance(assessed, _Claim):
                    due.append(assessed)
                else:
                    outcomes.append(assessed)
            if due:
                sent = await self._redeem(due)
                if any(outcome.done for outcome in sent):
                    self.last_redeemed_at = now
                outcomes.extend(sent)
            return outcomes

    async def _chain_id_once(self) -> int:
        if self._chain_id is None:
            chain = self.broker.chain
            self._chain_id = await _on_chain(lambda: chain.chain_id, CHAIN_READ_TIMEOUT_S)
        return self._chain_id

    def _latest_per_payer(
        self, signed: Sequence[SignedVoucher], chain_id: int, outcomes: list[RedeemOutcome]
    ) -> list[SignedVoucher]:
        """Ours only (others go to ``outcomes`` as NOT_FOR_US), the highest per payer."""
        latest: dict[str, SignedVoucher] = {}
        for item in signed:
            mismatch = self._mismatch(item, chain_id)
            if mismatch:
                log.warning("ignoring a voucher from payer %s: %s", item.voucher.payer, mismatch)
                claim = _Claim(item, 0)
                outcomes.append(claim.outcome(RedeemStatus.NOT_FOR_US, detail=mismatch))
                continue
            known = latest.get(item.voucher.payer)
            if known is None or item.voucher.cumulative_amount > known.voucher.cumulative_amount:
                latest[item.voucher.payer] = item
        return list(latest.values())

    def _mismatch(self, item: SignedVoucher, chain_id: int) -> str:
        if item.voucher.payee != self.payee:
            return f"payee {item.voucher.payee} is not this worker ({self.payee})"
        if item.chain_id != chain_id:
            return f"signed for chain {item.chain_id}; the RPC serves chain {chain_id}"
        if item.payment_broker != self.broker.address:
            return f"signed for broker {item.payment_broker}, not {self.broker.address}"
        return ""

    async def _assess(
        self, item: SignedVoucher, now: float, interval_due: bool
    ) -> _Claim | RedeemOutcome:
        """The claim to redeem now, or the outcome that says why not."""
        voucher = item.voucher
        pending_tx = self._pending_tx(voucher.payer)
        if pending_tx is not None:
            detail = "an earlier redemption is not mined yet"
            return _Claim(item, 0).outcome(RedeemStatus.PENDING, tx_hash=pending_tx, detail=detail)
        broker = self.broker
        already_wei = await _on_chain(
            lambda: broker.redeemed(voucher.payer, voucher.payee), CHAIN_READ_TIMEOUT_S
        )
        claim = _Claim(item, max(voucher.cumulative_amount - already_wei, 0))
        if claim.owed_wei == 0:
            return claim.outcome(
                RedeemStatus.ALREADY_REDEEMED,
                detail=f"the chain has paid {already_wei} wei for this payer",
            )
        if voucher.expiry <= now + EXPIRY_MARGIN_S:
            log.warning(
                "voucher from payer %s (%d wei unredeemed) has expired or is about to (expiry "
                "%d unix s): skipping it; the orchestrator signs a fresh one with this payer's "
                "next job",
                voucher.payer,
                claim.owed_wei,
                voucher.expiry,
            )
            return claim.outcome(RedeemStatus.EXPIRED, detail=f"expiry {voucher.expiry}")
        expiring = voucher.expiry <= now + REDEEM_BEFORE_EXPIRY_S
        if claim.owed_wei >= self.threshold_wei or interval_due or expiring:
            return claim
        # A payer withdrawing its deposit: redeem now, whatever the threshold says.
        if await _on_chain(lambda: broker.unlock_at(voucher.payer), CHAIN_READ_TIMEOUT_S):
            return claim
        return claim.outcome(
            RedeemStatus.BELOW_THRESHOLD,
            detail=f"owed {claim.owed_wei} < threshold {self.threshold_wei} wei",
        )

    # --- sending -------------------------------------------------------------------------

    async def _redeem(self, due: list[_Claim]) -> list[RedeemOutcome]:
        if len(due) == 1:
            return [await self._redeem_one(due[0])]
        broker = self.broker
        vouchers = [claim.signed.voucher for claim in due]
        signatures = [claim.signed.signature for claim in due]
        try:
            result = await _on_chain(
                lambda: broker.redeem_batch(vouchers, signatures), self._send_timeout_s
            )
        except ContractRevert as exc:
            # One refused voucher reverts the whole batch: redeem them one by one, so the
            # others are paid and each refusal is reported for its own payer.
            log.warning("batch of %d vouchers refused (%s); redeeming one by one", len(due), exc)
            return [await self._redeem_one(claim) for claim in due]
        except CHAIN_FAILURES as exc:
            return [self._send_failed(claim, exc) for claim in due]
        return self._redeemed(due, result)

    async def _redeem_one(self, claim: _Claim) -> RedeemOutcome:
        broker = self.broker
        voucher, signature = claim.signed.voucher, claim.signed.signature
        try:
            result = await _on_chain(
                lambda: broker.redeem(voucher, signature), self._send_timeout_s
            )
        except ContractRevert as exc:
            if exc.name == "NotIncreasing" and _covers(exc, claim.cumulative_wei):
                log.info(
                    "voucher from payer %s for %d wei was already redeemed on chain",
                    claim.payer,
                    claim.cumulative_wei,
                )
                return claim.outcome(RedeemStatus.ALREADY_REDEEMED, detail=str(exc))
            log.error("redeeming the voucher from payer %s was refused: %s", claim.payer, exc)
            return claim.outcome(RedeemStatus.FAILED, tx_hash=exc.tx_hash, detail=str(exc))
        except CHAIN_FAILURES as exc:
            return self._send_failed(claim, exc)
        return self._redeemed([claim], result)[0]

    def _redeemed(self, due: list[_Claim], result: RedeemResult) -> list[RedeemOutcome]:
        events = {event.payer: event for event in result.redemptions}
        log.info(
            "redeemed %d voucher(s) in tx %s: %d wei paid to %s, %d wei fee, %d gas",
            len(due),
            result.tx_hash,
            result.paid_wei,
            self.payee,
            result.fee_wei,
            result.gas_used,
        )
        if self.metrics is not None:
            self.metrics.redeemed(result.paid_wei)
        outcomes = []
        for claim in due:
            event = events.get(claim.payer)
            outcomes.append(
                claim.outcome(
                    RedeemStatus.REDEEMED,
                    paid_wei=event.paid_wei if event else 0,
                    fee_wei=event.fee_wei if event else 0,
                    tx_hash=result.tx_hash,
                )
            )
        return outcomes

    def _send_failed(self, claim: _Claim, exc: Exception) -> RedeemOutcome:
        if isinstance(exc, ReceiptTimeout):
            self._in_flight.setdefault(exc.tx_hash, ())
            self._in_flight[exc.tx_hash] += (claim.payer,)
            log.warning("redemption for payer %s not mined yet: %s", claim.payer, exc)
            return claim.outcome(RedeemStatus.PENDING, tx_hash=exc.tx_hash, detail=str(exc))
        if isinstance(exc, InsufficientFundsForGas):
            log.error(
                "cannot pay the gas to redeem %d wei from payer %s: account %s holds %d wei, "
                "needs %d wei; send it at least %d wei%s",
                claim.owed_wei,
                claim.payer,
                exc.address,
                exc.balance_wei,
                exc.needed_wei,
                exc.needed_wei - exc.balance_wei,
                dev_chain_fund_hint(self.broker.chain, exc.address),
            )
        elif isinstance(exc, TimeoutError):
            log.error(
                "redeeming for payer %s: no answer within %.0fs; the chain will tell next round",
                claim.payer,
                self._send_timeout_s,
            )
        else:
            log.error("redeeming for payer %s failed: %r", claim.payer, exc)
        detail = f"{exc.__class__.__name__}: {exc}"
        return claim.outcome(RedeemStatus.FAILED, detail=detail)

    def _pending_tx(self, payer: str) -> str | None:
        return next((tx for tx, payers in self._in_flight.items() if payer in payers), None)

    async def _settle_in_flight(self) -> None:
        """Forget sent redemptions that were mined or dropped; the chain now tells the rest."""
        w3 = self.broker.chain.w3
        for tx_hash in list(self._in_flight):
            try:
                lookup = functools.partial(w3.eth.get_transaction, HexStr(tx_hash))
                tx = await _on_chain(lookup, CHAIN_READ_TIMEOUT_S)
            except TransactionNotFound:
                del self._in_flight[tx_hash]  # dropped from the node's pool: never mined
                continue
            if tx.get("blockNumber") is not None:
                del self._in_flight[tx_hash]


def _covers(exc: ContractRevert, cumulative_wei: int) -> bool:
    """``NotIncreasing(redeemed, cumulative)``: the chain already paid at least this much."""
    redeemed = exc.named_args.get("redeemed", exc.error_args[0] if exc.error_args else None)
    return isinstance(redeemed, int) and redeemed >= cumulative_wei


# --- stake ---------------------------------------------------------------------------------


def dev_chain_fund_hint(chain: Chain, address: str) -> str:
    """On anvil's dev chain, the command that funds ``address``, as a clause to append to an
    error; elsewhere nothing (real money comes from the operator's own wallet)."""
    try:
        if chain.chain_id != DEV_CHAIN_ID or chain.rpc_url is None:
            return ""
    except CHAIN_FAILURES:
        return ""
    return f" (on the dev chain: `{fund_command(address, chain.rpc_url)}`)"


async def stake_if_needed(registry: WorkerRegistry, stake_wei: int) -> TxResult | None:
    """If the sender's active stake is below the registry's minimum, stake the difference up
    to ``stake_wei`` in total (wei). Returns the mined stake, or None when nothing was sent
    (enough stake already, ``stake_wei`` below the minimum, slashed, or an error, logged)."""
    address = registry.chain.address
    try:
        current_wei, minimum_wei, slashed = await _on_chain(
            lambda: (
                registry.stake_of(address),
                registry.min_stake_wei(),
                registry.is_slashed(address),
            ),
            3 * CHAIN_READ_TIMEOUT_S,
        )
        if current_wei >= minimum_wei:
            log.info("stake %d wei meets the minimum %d wei", current_wei, minimum_wei)
            return None
        if slashed:
            log.error("worker %s was slashed: staking more would not make it eligible", address)
            return None
        if stake_wei < minimum_wei:
            log.warning(
                "stake_wei %d is below the registry's minimum %d wei: not staking; without "
                "stake this worker gets no paid jobs",
                stake_wei,
                minimum_wei,
            )
            return None
        amount_wei = stake_wei - current_wei
        send_timeout_s = registry.chain.receipt_timeout_s + SEND_RPC_ALLOWANCE_S
        result = await _on_chain(lambda: registry.stake(amount_wei), send_timeout_s)
    except InsufficientFundsForGas as exc:
        log.error(
            "cannot stake: %s%s; without stake this worker gets no paid jobs",
            exc,
            dev_chain_fund_hint(registry.chain, exc.address),
        )
        return None
    except CHAIN_FAILURES as exc:
        log.error("staking failed: %r", exc)
        return None
    log.info(
        "staked %d wei (tx %s); active stake now %d wei", amount_wei, result.tx_hash, stake_wei
    )
    return result
