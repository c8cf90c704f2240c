"""Settlement: who pays, how much may still be spent, the ledger, and cumulative vouchers.

Every paid completion writes, in the completing transaction itself, one ledger entry keyed by
(job, attempt) and the new cumulative voucher for (payer, worker), signed by the orchestrator's
key. So there is no moment at which the ledger and the voucher disagree: a crash either keeps
both or neither. Workers redeem the latest voucher when they choose; the contract pays only
the delta since the last redemption, so a voucher redeemed twice pays once.

Admission: a job is accepted only if its most it can cost (max price x max units) fits in
what the payer can still pay: min(authorised cap - spent, deposit) on chain, minus vouchers
issued but not yet redeemed, minus the most the payer's unfinished jobs can cost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from eth_account.signers.local import LocalAccount
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from contracts.broker import PaymentBroker
from contracts.chain import Chain, ChainError, ContractRevert
from contracts.deploy import Deployment
from contracts.registry import WorkerRegistry
from orchestrator.exceptions import PaymentRequired
from orchestrator.services.redemptions import RedemptionAudit, RedemptionBook
from orchestrator.store import Store
from orchestrator.store.engine import before_commit
from orchestrator.store.models import Client, Job, LedgerEntry, Redemption, VoucherRow
from protocol import FINAL_STATES, JobState
from protocol.vouchers import Voucher, sign_voucher

log = logging.getLogger("gpumarket.orchestrator.settlement")

STAKES_CURSOR = "registry.stakes"
ELIGIBILITY_BATCH = 500
"""isEligible reads per JSON-RPC batch request (one HTTP round trip each)."""
RESIGN_BEFORE_EXPIRY_S = 2 * 24 * 3600
UNFINISHED = [s.value for s in JobState if s not in FINAL_STATES]


@dataclass(frozen=True)
class Budget:
    """What a payer can still be charged, in wei, and how that figure was reached."""

    payer: str
    deposit_wei: int
    cap_remaining_wei: int
    unredeemed_wei: int
    reserved_wei: int
    unlocking: bool

    @property
    def available_wei(self) -> int:
        return max(
            0,
            min(self.deposit_wei, self.cap_remaining_wei) - self.unredeemed_wei - self.reserved_wei,
        )


@dataclass(frozen=True)
class SignedVoucher:
    voucher: Voucher
    signature: str


class PaidJob(Protocol):
    """What ``Payments.record`` reads of a job: a ``Job``, or a job recorded set-based."""

    @property
    def id(self) -> str: ...

    @property
    def attempt(self) -> int: ...

    @property
    def payer_address(self) -> str | None: ...

    @property
    def cost_wei(self) -> int | None: ...


class Payments(Protocol):
    """The settlement seam: ``NoPayments`` for a free orchestrator, ``ChainPayments`` on chain."""

    @property
    def enabled(self) -> bool: ...

    @property
    def deployment(self) -> Deployment | None: ...

    def admit(
        self, s: Session, client: Client, max_cost_wei: int, now: float, how: str | None = None
    ) -> str | None: ...

    def record(self, s: Session, job: PaidJob, payee: str, now: float) -> None: ...

    def budget(self, s: Session, payer: str) -> Budget | None: ...

    def is_eligible(self, address: str) -> bool | None: ...

    def eligibility(self, addresses: Sequence[str]) -> dict[str, bool] | None: ...

    def stake_changes(self, from_block: int | None) -> tuple[set[str], int] | None: ...

    def reconcile(self) -> int: ...

    def audit_redemptions(self) -> RedemptionAudit | None: ...

    def vouchers(self, payee: str, now: float) -> list[SignedVoucher]: ...

    @property
    def verification_payer(self) -> str | None: ...

    def slash(self, worker: str, amount_wei: int, evidence_hash: str) -> SlashOutcome: ...


@dataclass(frozen=True)
class SlashOutcome:
    """``sent``: the chain took ``slashed_wei`` (or had already, for this evidence);
    ``skipped``: nothing to take (no chain, or no stake left)."""

    status: str
    tx_hash: str | None = None
    slashed_wei: int = 0
    detail: str = ""


class NoPayments:
    """Jobs cost nothing on chain: no payer, no ledger, every worker eligible."""

    enabled = False
    deployment = None

    def admit(
        self, s: Session, client: Client, max_cost_wei: int, now: float, how: str | None = None
    ) -> str | None:
        return None

    def record(self, s: Session, job: PaidJob, payee: str, now: float) -> None:
        return None

    def budget(self, s: Session, payer: str) -> Budget | None:
        return None

    def is_eligible(self, address: str) -> bool | None:
        return None

    def eligibility(self, addresses: Sequence[str]) -> dict[str, bool] | None:
        return None

    def stake_changes(self, from_block: int | None) -> tuple[set[str], int] | None:
        return None

    def reconcile(self) -> int:
        return 0

    def audit_redemptions(self) -> RedemptionAudit | None:
        return None

    def vouchers(self, payee: str, now: float) -> list[SignedVoucher]:
        return []

    verification_payer = None

    def slash(self, worker: str, amount_wei: int, evidence_hash: str) -> SlashOutcome:
        return SlashOutcome("skipped", detail="this orchestrator runs without a chain")


def _owed_by_payer(s: Session, payer: str) -> int:
    """Vouchers issued to all payees minus what the chain has paid of them (wei). Only
    confirmed redemptions count as paid: one a reorg may still undo leaves the debt owed."""
    issued = {
        row.payee: row.cumulative_wei
        for row in s.scalars(select(VoucherRow).where(VoucherRow.payer == payer))
    }
    redeemed: dict[str, int] = {}
    confirmed = select(Redemption).where(Redemption.payer == payer, Redemption.confirmed.is_(True))
    for row in s.scalars(confirmed):
        redeemed[row.payee] = max(redeemed.get(row.payee, 0), row.cumulative_wei)
    return sum(max(0, total - redeemed.get(payee, 0)) for payee, total in issued.items())


def _reserved_by_payer(s: Session, payer: str) -> int:
    """The most the payer's unfinished jobs can still cost (wei)."""
    rows = s.execute(
        select(Job.max_cost_wei, Job.max_price_wei_per_unit, Job.max_units).where(
            Job.payer_address == payer, Job.state.in_(UNFINISHED)
        )
    ).all()
    # Jobs from before max_cost_wei was kept: max_units at the max price.
    return sum(bound if bound is not None else price * (units or 0) for bound, price, units in rows)


class ChainPayments:
    def __init__(
        self,
        store: Store,
        chain: Chain,
        deployment: Deployment,
        signer: LocalAccount,
        *,
        voucher_ttl_s: int,
        clock: Callable[[], float] = time.time,
        verification_payer: str | None = None,
        redemption_confirmations: int = 0,
    ) -> None:
        self.enabled = True
        self.verification_payer = verification_payer or str(signer.address)
        self.deployment = deployment
        self._store = store
        self._chain = chain
        self._signer = signer
        self._ttl_s = voucher_ttl_s
        self._clock = clock
        self.broker = PaymentBroker(chain, deployment.payment_broker)
        self.registry = WorkerRegistry(chain, deployment.worker_registry)
        self.redemptions = RedemptionBook(
            store,
            chain,
            self.broker.events,
            signer=self.signer_address,
            deployed_at_block=deployment.deployed_at_block,
            confirmations=redemption_confirmations,
        )

    @property
    def signer_address(self) -> str:
        return str(self._signer.address)

    def budget(self, s: Session, payer: str) -> Budget:
        # Reserved before owed: a completion committing in between is then counted twice
        # (safe), never missed. Both before the chain reads, for the same reason.
        reserved = _reserved_by_payer(s, payer)
        unredeemed = _owed_by_payer(s, payer)
        allowance = self.broker.allowance(payer, self.signer_address)
        cap_wei = allowance.cap_wei
        lower_cap, effective_at = self.broker.pending_cap(payer, self.signer_address)
        if effective_at:  # new work must fit the lower cap the payer is moving to
            cap_wei = min(cap_wei, lower_cap)
        return Budget(
            payer=payer,
            deposit_wei=self.broker.balance_of(payer),
            cap_remaining_wei=max(0, cap_wei - allowance.spent_wei),
            unredeemed_wei=unredeemed,
            reserved_wei=reserved,
            unlocking=self.broker.unlock_at(payer) != 0,
        )

    def admit(
        self, s: Session, client: Client, max_cost_wei: int, now: float, how: str | None = None
    ) -> str:
        """The payer to charge, or PaymentRequired with the numbers (``how``: how the job's
        bound of ``max_cost_wei`` is reached, in words)."""
        payer = client.payer_address
        if payer is None:
            raise PaymentRequired(
                "this orchestrator charges on chain: link a payer account first "
                "(POST /v1/account/payer/challenge, then POST /v1/account/payer)"
            )
        budget = self.budget(s, payer)
        if budget.unlocking:
            raise PaymentRequired(
                f"payer {payer} has asked to withdraw its deposit (unlock); relock it to "
                "submit jobs"
            )
        if max_cost_wei > budget.available_wei:
            raise PaymentRequired(
                f"job may cost up to {max_cost_wei} wei{f' ({how})' if how else ''} but payer "
                f"{payer} can pay "
                f"{budget.available_wei} more (deposit {budget.deposit_wei}, authorised to "
                f"{self.signer_address}: {budget.cap_remaining_wei} left, unredeemed "
                f"{budget.unredeemed_wei}, reserved by unfinished jobs {budget.reserved_wei}); "
                "deposit or authorise more",
                needed_wei=str(max_cost_wei),
                available_wei=str(budget.available_wei),
                payer=payer,
                signer=self.signer_address,
            )
        return payer

    def record(self, s: Session, job: PaidJob, payee: str, now: float) -> None:
        """Ledger entry and new cumulative voucher, in the caller's transaction."""
        payer, amount = job.payer_address, job.cost_wei or 0
        if payer is None or amount <= 0:
            return
        s.add(
            LedgerEntry(
                job_id=job.id,
                attempt=job.attempt,
                payer=payer,
                payee=payee,
                amount_wei=amount,
                created_at=now,
            )
        )
        self._ensure_voucher_row(s, payer, payee, now)
        row = s.get(VoucherRow, (payer, payee), with_for_update=True)
        assert row is not None
        row.cumulative_wei += amount
        row.entries += 1
        row.updated_at = now
        # Signed once per transaction, over its final amount: a batch of results paid into
        # the same voucher costs one signature (about 1 ms), not one per job.
        expiry = int(now) + self._ttl_s
        before_commit(s, ("voucher", payer, payee), lambda: self._sign(row, expiry))

    def _sign(self, row: VoucherRow, expiry: int) -> Voucher:
        voucher = Voucher(
            payer=row.payer, payee=row.payee, cumulative_amount=row.cumulative_wei, expiry=expiry
        )
        row.expiry = expiry
        row.signer = self.signer_address
        row.signature = sign_voucher(
            self._signer.key, voucher, self.deployment.chain_id, self.deployment.payment_broker
        )
        return voucher

    def vouchers(self, payee: str, now: float) -> list[SignedVoucher]:
        """The payee's latest vouchers; one close to expiry is signed again with the same
        amount and a later expiry (harmless: the amount, not the voucher, is what counts), so
        a worker that was away does not lose what it earned."""
        out = []
        with self._store.transaction() as s:
            rows = s.scalars(
                select(VoucherRow)
                .where(VoucherRow.payee == payee, VoucherRow.entries > 0)
                .order_by(VoucherRow.payer)
                .with_for_update()
            )
            for row in rows:
                if row.expiry < now + RESIGN_BEFORE_EXPIRY_S:
                    self._sign(row, int(now) + self._ttl_s)
                    row.updated_at = now
                voucher = Voucher(
                    payer=row.payer,
                    payee=row.payee,
                    cumulative_amount=row.cumulative_wei,
                    expiry=row.expiry,
                )
                out.append(SignedVoucher(voucher, row.signature))
        return out

    def _ensure_voucher_row(self, s: Session, payer: str, payee: str, now: float) -> None:
        """Create the (payer, payee) row if missing without racing a concurrent completion."""
        insert = pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
        s.execute(
            insert(VoucherRow)
            .values(
                payer=payer,
                payee=payee,
                cumulative_wei=0,
                expiry=0,
                signer=self.signer_address,
                signature="",
                entries=0,
                updated_at=now,
            )
            .on_conflict_do_nothing()
        )

    def slash(self, worker: str, amount_wei: int, evidence_hash: str) -> SlashOutcome:
        """Slash ``worker`` through WorkerRegistry (this signer is its arbiter). Safe to call
        again after a crash: the registry refuses evidence it has seen, and that refusal
        means the slash already happened."""
        registry = self.registry.with_chain(self._chain.with_key(self._signer.key))
        if registry.evidence_used(evidence_hash):  # checked first: the registry checks stake
            return SlashOutcome("sent", detail="already slashed for this evidence")
        try:
            result = registry.slash(worker, amount_wei, evidence_hash)
        except ContractRevert as exc:
            if exc.name == "EvidenceUsed":
                return SlashOutcome("sent", detail="already slashed for this evidence")
            if exc.name == "NothingToSlash":
                return SlashOutcome("skipped", detail="the worker has no stake left")
            raise
        return SlashOutcome("sent", tx_hash=result.tx_hash, slashed_wei=result.slashed_wei)

    def is_eligible(self, address: str) -> bool | None:
        """WorkerRegistry.isEligible, or None when the chain cannot be asked right now."""
        try:
            return self.registry.is_eligible(address)
        except ChainError as exc:
            log.warning("cannot read stake of %s: %s", address, exc)
            return None

    def eligibility(self, addresses: Sequence[str]) -> dict[str, bool] | None:
        """WorkerRegistry.isEligible of each address (checksummed keys), asked in JSON-RPC
        batches of ``ELIGIBILITY_BATCH``; None when the chain cannot be asked right now."""
        found: dict[str, bool] = {}
        try:
            for start in range(0, len(addresses), ELIGIBILITY_BATCH):
                chunk = list(addresses[start : start + ELIGIBILITY_BATCH])
                found.update(zip(chunk, self.registry.eligible_many(chunk), strict=True))
        except ChainError as exc:
            log.warning("cannot read the stakes of %d workers: %s", len(addresses), exc)
            return None
        return found

    def stake_changes(self, from_block: int | None) -> tuple[set[str], int] | None:
        """Addresses whose WorkerRegistry standing changed (staked, unbonding, withdrawn,
        slashed) in blocks [from_block, head], and the block to scan from next time: one
        event scan for all workers. ``from_block`` None: from the deployment's block. None
        when the chain cannot be asked right now."""
        start = self.deployment.deployed_at_block if from_block is None else from_block
        try:
            latest = self._chain.block_number()
            if start > latest:
                return set(), start
            changed = {
                str(getattr(event, "worker", ""))
                for event in self.registry.events.read_all(start, latest)
            }
        except ChainError as exc:
            log.warning("cannot read stake events: %s", exc)
            return None
        changed.discard("")
        return changed, latest + 1

    def reconcile(self) -> int:
        """Bring the redemption rows up to the chain's Redeemed events, rolling back with the
        chain if it did (services/redemptions.py); returns how many rows were new."""
        return self.redemptions.reconcile()

    def audit_redemptions(self) -> RedemptionAudit:
        """Every redemption row against the chain's events (reads the chain's history)."""
        return self.redemptions.audit()


def ledger_totals(s: Session) -> dict[tuple[str, str], int]:
    """Sum of ledger entries per (payer, payee), in wei (exact: summed in Python)."""
    totals: dict[tuple[str, str], int] = {}
    for payer, payee, amount in s.execute(
        select(LedgerEntry.payer, LedgerEntry.payee, LedgerEntry.amount_wei)
    ).all():
        totals[(payer, payee)] = totals.get((payer, payee), 0) + amount
    return totals


def ledger_count(s: Session) -> int:
    return s.scalar(select(func.count()).select_from(LedgerEntry)) or 0
