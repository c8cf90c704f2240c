"""Typed client of PaymentBroker: deposits, signer caps, withdrawal, voucher redemption.

Every write is signed with the Chain's local key and waited for (``RECEIPT_TIMEOUT_S``);
reverts raise ``ContractRevert`` named after the contract's custom error, from the gas
estimate when the node can tell in advance. Amounts are int wei, instants unix seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from eth_utils import to_checksum_address
from web3.types import TxReceipt

from contracts.abi import PAYMENT_BROKER, Artifact, load_artifact
from contracts.chain import Chain, TxResult
from contracts.events import EventReader, Redeemed, broker_events
from protocol.vouchers import Voucher, sign_voucher

BPS_DENOMINATOR = 10_000


@dataclass(frozen=True)
class RedeemResult(TxResult):
    """A mined redemption: ``paid_wei`` reached the payee(s), ``fee_wei`` the fee recipient;
    ``redemptions`` holds one Redeemed event per voucher."""

    paid_wei: int
    fee_wei: int
    redemptions: tuple[Redeemed, ...]


@dataclass(frozen=True)
class Allowance:
    """A signer may spend ``cap_wei`` of a payer's deposit in total; ``spent_wei`` is used."""

    cap_wei: int
    spent_wei: int

    @property
    def remaining_wei(self) -> int:
        return max(self.cap_wei - self.spent_wei, 0)


@dataclass(frozen=True)
class FeeSplit:
    """How a redeemed delta divides: ``fee_bps`` / 10000 (rounded down) to ``fee_recipient``,
    the rest to the payee, as the contract computes it."""

    fee_recipient: str
    fee_bps: int

    def fee_wei(self, delta_wei: int) -> int:
        return delta_wei * self.fee_bps // BPS_DENOMINATOR

    def payee_wei(self, delta_wei: int) -> int:
        return delta_wei - self.fee_wei(delta_wei)


class PaymentBroker:
    """PaymentBroker at ``address``; writes are sent from ``chain``'s key."""

    def __init__(self, chain: Chain, address: str, artifact: Artifact | None = None) -> None:
        self.chain = chain
        self.artifact = artifact or load_artifact(PAYMENT_BROKER)
        self.address = to_checksum_address(address)
        self.contract = chain.contract(self.address, self.artifact.abi)

    def with_chain(self, chain: Chain) -> PaymentBroker:
        """The same broker, sending from another key (``chain.with_key(...)``)."""
        return PaymentBroker(chain, self.address, self.artifact)

    @cached_property
    def events(self) -> EventReader:
        return broker_events(self.chain, self.address, self.artifact.abi)

    # --- writes ------------------------------------------------------------------------

    def deposit(self, amount_wei: int) -> TxResult:
        """Add ``amount_wei`` to the sender's deposit."""
        return self._transact("deposit", value_wei=amount_wei)

    def deposit_for(self, payer: str, amount_wei: int) -> TxResult:
        """Add ``amount_wei`` to ``payer``'s deposit, paid by the sender."""
        return self._transact("depositFor", to_checksum_address(payer), value_wei=amount_wei)

    def authorize(self, signer: str, cap_wei: int) -> TxResult:
        """Let ``signer`` spend up to ``cap_wei`` of the sender's deposit in total (replaces
        the cap, keeps what was spent; 0 revokes)."""
        return self._transact("authorize", to_checksum_address(signer), cap_wei)

    def unlock(self) -> TxResult:
        """Start the withdrawal clock: ``withdraw`` works ``withdraw_delay_s`` from now."""
        return self._transact("unlock")

    def relock(self) -> TxResult:
        return self._transact("relock")

    def withdraw(self, amount_wei: int) -> TxResult:
        """Take ``amount_wei`` of the sender's deposit back (after ``unlock`` + delay)."""
        return self._transact("withdraw", amount_wei)

    def redeem(self, voucher: Voucher, signature: str | bytes) -> RedeemResult:
        """Pay the payee the increase of ``voucher`` over what was already redeemed, minus
        the fee. Anyone may send it; the sender pays the gas."""
        receipt = self.chain.transact(
            self.contract, "redeem", voucher.as_struct(), _signature_bytes(signature)
        )
        return self._redeem_result(receipt)

    def redeem_batch(
        self, vouchers: Sequence[Voucher], signatures: Sequence[str | bytes]
    ) -> RedeemResult:
        """Redeem many vouchers in one transaction; one bad voucher reverts all of them."""
        receipt = self.chain.transact(
            self.contract,
            "redeemBatch",
            [voucher.as_struct() for voucher in vouchers],
            [_signature_bytes(signature) for signature in signatures],
        )
        return self._redeem_result(receipt)

    def sign_voucher(self, voucher: Voucher) -> str:
        """Sign ``voucher`` for this broker and chain with ``chain``'s key (the signer)."""
        return sign_voucher(self.chain.account.key, voucher, self.chain.chain_id, self.address)

    # --- reads -------------------------------------------------------------------------

    def balance_of(self, payer: str) -> int:
        """``payer``'s deposit, wei."""
        return int(self.chain.call(self.contract, "balanceOf", to_checksum_address(payer)))

    def allowance(self, payer: str, signer: str) -> Allowance:
        cap, spent = self.chain.call(
            self.contract, "allowance", to_checksum_address(payer), to_checksum_address(signer)
        )
        return Allowance(cap_wei=int(cap), spent_wei=int(spent))

    def pending_cap(self, payer: str, signer: str) -> tuple[int, int]:
        """A lowered cap not in force yet: (cap wei, effective at unix s), or (0, 0)."""
        cap, effective_at = self.chain.call(
            self.contract, "pendingCap", to_checksum_address(payer), to_checksum_address(signer)
        )
        return int(cap), int(effective_at)

    def redeemed(self, payer: str, payee: str) -> int:
        """Cumulative wei already redeemed for (payer, payee)."""
        return int(
            self.chain.call(
                self.contract, "redeemed", to_checksum_address(payer), to_checksum_address(payee)
            )
        )

    def unlock_at(self, payer: str) -> int:
        """Unix seconds from which ``payer`` may withdraw; 0 when no unlock is pending."""
        return int(self.chain.call(self.contract, "unlockAt", to_checksum_address(payer)))

    def fee_recipient(self) -> str:
        return str(to_checksum_address(self.chain.call(self.contract, "feeRecipient")))

    def fee_bps(self) -> int:
        return int(self.chain.call(self.contract, "feeBps"))

    def withdraw_delay_s(self) -> int:
        return int(self.chain.call(self.contract, "withdrawDelay"))

    def fee_split(self) -> FeeSplit:
        """The fee recipient and rate (immutable in the contract; read once per call)."""
        return FeeSplit(fee_recipient=self.fee_recipient(), fee_bps=self.fee_bps())

    def domain_separator(self) -> bytes:
        return bytes(self.chain.call(self.contract, "domainSeparator"))

    def voucher_digest(self, voucher: Voucher) -> bytes:
        """The contract's EIP-712 digest of ``voucher`` (what the signer signs)."""
        return bytes(self.chain.call(self.contract, "voucherDigest", voucher.as_struct()))

    # --- internals ---------------------------------------------------------------------

    def _transact(self, function: str, *args: object, value_wei: int = 0) -> TxResult:
        receipt = self.chain.transact(self.contract, function, *args, value_wei=value_wei)
        return TxResult.from_receipt(receipt)

    def _redeem_result(self, receipt: TxReceipt) -> RedeemResult:
        redemptions = tuple(self.events.from_receipt(receipt, Redeemed))
        base = TxResult.from_receipt(receipt)
        return RedeemResult(
            tx_hash=base.tx_hash,
            block=base.block,
            gas_used=base.gas_used,
            paid_wei=sum(event.paid_wei for event in redemptions),
            fee_wei=sum(event.fee_wei for event in redemptions),
            redemptions=redemptions,
        )


def _signature_bytes(signature: str | bytes) -> bytes:
    if isinstance(signature, bytes):
        return signature
    return bytes.fromhex(signature.removeprefix("0x"))
