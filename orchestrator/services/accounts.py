"""Client accounts: linking an on-chain payer, and what that payer can still be charged."""

from __future__ import annotations

from sqlalchemy import select

from orchestrator.config import Settings
from orchestrator.services.auth import Principal
from orchestrator.services.challenges import issue_challenge, redeem_challenge
from orchestrator.services.redemptions import PairTotals, row_totals
from orchestrator.services.settlement import (
    ChainPayments,
    Payments,
    ledger_count,
    ledger_totals,
)
from orchestrator.store import Store
from orchestrator.store.models import Client, VoucherRow
from protocol import ChallengeResponse
from protocol.signing import payer_link_message
from protocol.workers import AccountView, BudgetView, SettlementPair, SettlementReport

PAYER_CHALLENGE_ROUTE = "/v1/account/payer/challenge"


class AccountService:
    def __init__(self, store: Store, settings: Settings, payments: Payments) -> None:
        self._store = store
        self._settings = settings
        self._payments = payments

    def payer_challenge(self, client: Principal, address: str, now: float) -> ChallengeResponse:
        return issue_challenge(
            self._store,
            address,
            self._settings.challenge_ttl_s,
            now,
            lambda nonce, expires: payer_link_message(client.id, address, nonce, expires),
        )

    def link_payer(
        self, client: Principal, address: str, nonce: str, signature: str, now: float
    ) -> AccountView:
        with self._store.transaction() as s:
            signer = redeem_challenge(
                s,
                nonce,
                address,
                signature,
                now,
                purpose=f"gpumarket payer link\nclient: {client.id}\n",
                where=PAYER_CHALLENGE_ROUTE,
            )
            row = s.get(Client, client.id, with_for_update=True)
            assert row is not None
            row.payer_address = signer
        return self.account(client)

    def account(self, client: Principal) -> AccountView:
        with self._store.read() as s:
            row = s.get(Client, client.id)
            assert row is not None
            budget = None
            if row.payer_address is not None and self._payments.enabled:
                b = self._payments.budget(s, row.payer_address)
                if b is not None:
                    budget = BudgetView(
                        deposit_wei=b.deposit_wei,
                        cap_remaining_wei=b.cap_remaining_wei,
                        unredeemed_wei=b.unredeemed_wei,
                        reserved_wei=b.reserved_wei,
                        available_wei=b.available_wei,
                        unlocking=b.unlocking,
                    )
            signer = (
                self._payments.signer_address if isinstance(self._payments, ChainPayments) else None
            )
            return AccountView(
                client_id=row.id,
                name=row.name,
                payer_address=row.payer_address,
                payments=self._payments.enabled,
                signer_address=signer,
                budget=budget,
            )

    def settlement(self) -> SettlementReport:
        """Ledger vs vouchers vs redemption rows vs the chain's Redeemed events, per
        (payer, payee). With payments on, reads the chain's event history (ChainError: 503)."""
        audit = self._payments.audit_redemptions()
        with self._store.read() as s:
            ledger = ledger_totals(s)
            vouchers = {(r.payer, r.payee): r.cumulative_wei for r in s.scalars(select(VoucherRow))}
            confirmed = row_totals(s, confirmed_only=True)
            rows = row_totals(s, confirmed_only=False) if audit is None else audit.rows
            entries = ledger_count(s)
        chain = audit.chain if audit is not None else {}
        keys = set(ledger) | set(vouchers) | set(rows) | set(chain)
        pairs = [
            _pair(
                key,
                ledger.get(key, 0),
                vouchers.get(key, 0),
                confirmed.get(key, PairTotals()),
                rows.get(key, PairTotals()),
                None if audit is None else chain.get(key, PairTotals()),
                0 if audit is None else audit.unconfirmed.get(key, 0),
            )
            for key in sorted(keys)
        ]
        problems = [problem for p in pairs for problem in _ledger_problems(p)]
        problems += audit.problems if audit is not None else []
        return SettlementReport(
            pairs=pairs,
            ledger_entries=entries,
            consistent=not problems,
            through_block=None if audit is None else audit.through_block,
            problems=problems,
        )


def _pair(
    key: tuple[str, str],
    ledger_wei: int,
    voucher_wei: int,
    confirmed: PairTotals,
    rows: PairTotals,
    chain: PairTotals | None,
    unconfirmed: int,
) -> SettlementPair:
    return SettlementPair(
        payer=key[0],
        payee=key[1],
        ledger_wei=ledger_wei,
        voucher_wei=voucher_wei,
        redeemed_wei=confirmed.cumulative_wei,
        redemptions=rows.count,
        unconfirmed_redemptions=unconfirmed,
        paid_wei=rows.paid_wei,
        fee_wei=rows.fee_wei,
        chain_redemptions=None if chain is None else chain.count,
        chain_paid_wei=None if chain is None else chain.paid_wei,
        chain_fee_wei=None if chain is None else chain.fee_wei,
    )


def _ledger_problems(p: SettlementPair) -> list[str]:
    """The ledger must equal the voucher, and the chain cannot have redeemed more than it."""
    problems = []
    if p.ledger_wei != p.voucher_wei:
        problems.append(
            f"{p.payer} -> {p.payee}: the ledger says {p.ledger_wei} wei, the voucher "
            f"{p.voucher_wei} wei"
        )
    if p.redeemed_wei > p.voucher_wei:
        problems.append(
            f"{p.payer} -> {p.payee}: {p.redeemed_wei} wei redeemed, more than the voucher's "
            f"{p.voucher_wei} wei"
        )
    return problems
