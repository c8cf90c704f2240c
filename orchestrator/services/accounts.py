"""Client accounts: linking an on-chain payer, and what that payer can still be charged."""

from __future__ import annotations

from sqlalchemy import select

from orchestrator.config import Settings
from orchestrator.services.auth import Principal
from orchestrator.services.challenges import issue_challenge, redeem_challenge
from orchestrator.services.settlement import (
    ChainPayments,
    Payments,
    ledger_count,
    ledger_totals,
)
from orchestrator.store import Store
from orchestrator.store.models import Client, Redemption, VoucherRow
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
        """Ledger vs vouchers vs redemptions seen on chain, per (payer, payee)."""
        with self._store.read() as s:
            ledger = ledger_totals(s)
            vouchers = {(r.payer, r.payee): r.cumulative_wei for r in s.scalars(select(VoucherRow))}
            redeemed: dict[tuple[str, str], int] = {}
            for r in s.scalars(select(Redemption)):
                key = (r.payer, r.payee)
                redeemed[key] = max(redeemed.get(key, 0), r.cumulative_wei)
            entries = ledger_count(s)
        pairs = [
            SettlementPair(
                payer=payer,
                payee=payee,
                ledger_wei=ledger.get((payer, payee), 0),
                voucher_wei=vouchers.get((payer, payee), 0),
                redeemed_wei=redeemed.get((payer, payee), 0),
            )
            for payer, payee in sorted(set(ledger) | set(vouchers) | set(redeemed))
        ]
        consistent = all(
            p.ledger_wei == p.voucher_wei and p.redeemed_wei <= p.voucher_wei for p in pairs
        )
        return SettlementReport(pairs=pairs, ledger_entries=entries, consistent=consistent)
