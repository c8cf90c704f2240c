"""PaymentBroker on a real anvil chain, deployed from the committed artifact.

Vouchers are signed here with eth-account's EIP-712 encoder, independently of the contract's
own hashing. Custom errors are decoded from their 4-byte selector and checked with their
arguments. Redemptions are submitted by a third account (a relayer), so the payee's and the
fee recipient's balances change by exactly what the contract pays them, in wei.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import pytest
from eth_abi import decode as abi_decode
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_keys import keys
from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractCustomError
from web3.logs import DISCARD
from web3.types import TxReceipt

from contracts.compile import ARTIFACTS_DIR, compile_sources

ETH = 10**18
FEE_BPS = 250  # 2.5 %
WITHDRAW_DELAY_S = 3600
VOUCHER_TTL_S = 3600
RECEIPT_TIMEOUT_S = 10
REDEEM_GAS_CEILING = 200_000

DOMAIN_NAME = "gpumarket PaymentBroker"
VOUCHER_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "Voucher": [
        {"name": "payer", "type": "address"},
        {"name": "payee", "type": "address"},
        {"name": "cumulativeAmount", "type": "uint256"},
        {"name": "expiry", "type": "uint64"},
    ],
}
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class Voucher(NamedTuple):
    """Field order is the Solidity struct's, so an instance is passed to web3 as the tuple."""

    payer: str
    payee: str
    cumulative_wei: int
    expiry: int


# ---- chain helpers ----------------------------------------------------------------------


def deploy(w3: Web3, name: str, *args: Any, sender: str) -> Contract:
    artifact = json.loads((ARTIFACTS_DIR / f"{name}.json").read_text())
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    tx_hash = factory.constructor(*args).transact({"from": sender})
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S)
    return cast(Contract, w3.eth.contract(address=receipt["contractAddress"], abi=artifact["abi"]))


def send(w3: Web3, call: Any, sender: str, value: int = 0) -> TxReceipt:
    tx_hash = call.transact({"from": sender, "value": value})
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S)
    assert receipt["status"] == 1
    return receipt


def gas_cost_wei(receipt: TxReceipt) -> int:
    return receipt["gasUsed"] * receipt["effectiveGasPrice"]


def decode_error(abi: Sequence[Mapping[str, Any]], data: str) -> tuple[Any, ...]:
    """``(name, *args)`` of an ABI custom error from its revert data."""
    raw = bytes.fromhex(data.removeprefix("0x"))
    for item in abi:
        if item["type"] != "error":
            continue
        types = [arg["type"] for arg in item["inputs"]]
        if keccak(text=f"{item['name']}({','.join(types)})")[:4] == raw[:4]:
            values = abi_decode(types, raw[4:])
            return (
                item["name"],
                *(
                    to_checksum_address(v) if t == "address" else v
                    for t, v in zip(types, values, strict=True)
                ),
            )
    raise AssertionError(f"revert data {data} matches no error in the ABI")


def revert_error(contract: Contract, call: Callable[[], object]) -> tuple[Any, ...]:
    """Run ``call`` (a transact or call that must revert); its decoded custom error."""
    with pytest.raises(ContractCustomError) as caught:
        call()
    assert isinstance(caught.value.data, str)
    return decode_error(contract.abi, caught.value.data)


def events(contract: Contract, name: str, receipt: TxReceipt) -> list[dict[str, Any]]:
    logs = contract.events[name]().process_receipt(receipt, errors=DISCARD)
    return [dict(log["args"]) for log in logs]


def advance_time(w3: Web3, seconds: int) -> None:
    w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
    w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]


def latest_timestamp(w3: Web3) -> int:
    return int(w3.eth.get_block("latest")["timestamp"])


# ---- voucher signing (independent of the contract) ---------------------------------------


def typed_voucher(broker: Contract, voucher: Voucher) -> SignableMessage:
    return encode_typed_data(
        full_message={
            "types": VOUCHER_TYPES,
            "primaryType": "Voucher",
            "domain": {
                "name": DOMAIN_NAME,
                "version": "1",
                "chainId": broker.w3.eth.chain_id,
                "verifyingContract": broker.address,
            },
            "message": {
                "payer": voucher.payer,
                "payee": voucher.payee,
                "cumulativeAmount": voucher.cumulative_wei,
                "expiry": voucher.expiry,
            },
        }
    )


def sign_voucher(broker: Contract, voucher: Voucher, private_key: str) -> bytes:
    signed = Account.sign_message(typed_voucher(broker, voucher), private_key=private_key)
    return bytes(signed.signature)


@dataclass
class Market:
    """A deployed broker and the parties around it (addresses; keys for the signers)."""

    w3: Web3
    broker: Contract
    fee_recipient: str
    payer: str
    signer: str
    signer_key: str
    stranger_key: str
    payee: str
    payee_b: str
    relayer: str

    def voucher(
        self,
        cumulative_wei: int,
        *,
        payee: str | None = None,
        expiry: int | None = None,
        key: str | None = None,
    ) -> tuple[Voucher, bytes]:
        if expiry is None:
            expiry = latest_timestamp(self.w3) + VOUCHER_TTL_S
        v = Voucher(self.payer, payee or self.payee, cumulative_wei, expiry)
        return v, sign_voucher(self.broker, v, key or self.signer_key)

    def redeem(self, voucher: Voucher, signature: bytes) -> TxReceipt:
        call = self.broker.functions.redeem(voucher, signature)
        return send(self.w3, call, self.relayer)

    def redeem_error(self, voucher: Voucher, signature: bytes) -> tuple[Any, ...]:
        call = self.broker.functions.redeem(voucher, signature)
        return revert_error(self.broker, lambda: call.transact({"from": self.relayer}))

    def balance(self, address: str) -> int:
        return int(self.w3.eth.get_balance(address))  # type: ignore[arg-type]


@pytest.fixture
def market(w3: Web3, dev_keys: tuple[str, ...]) -> Market:
    """Broker with a 2.5 % fee; the payer has 10 ETH deposited and lets the signer spend 5."""
    addresses = [Account.from_key(key).address for key in dev_keys]
    broker = deploy(
        w3, "PaymentBroker", addresses[1], FEE_BPS, WITHDRAW_DELAY_S, sender=addresses[0]
    )
    m = Market(
        w3=w3,
        broker=broker,
        fee_recipient=addresses[1],
        payer=addresses[2],
        signer=addresses[3],
        signer_key=dev_keys[3],
        stranger_key=dev_keys[7],
        payee=addresses[4],
        payee_b=addresses[5],
        relayer=addresses[6],
    )
    send(w3, broker.functions.deposit(), m.payer, value=10 * ETH)
    send(w3, broker.functions.authorize(m.signer, 5 * ETH), m.payer)
    return m


def fee_of(delta_wei: int) -> int:
    return delta_wei * FEE_BPS // 10_000


# ---- construction, deposits, authorisation ----------------------------------------------


def test_constructor_stores_parameters(market: Market) -> None:
    functions = market.broker.functions
    assert functions.feeRecipient().call() == market.fee_recipient
    assert functions.feeBps().call() == FEE_BPS
    assert functions.withdrawDelay().call() == WITHDRAW_DELAY_S


def test_constructor_rejects_fee_over_100_percent(w3: Web3, market: Market) -> None:
    artifact = json.loads((ARTIFACTS_DIR / "PaymentBroker.json").read_text())
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    call = factory.constructor(market.fee_recipient, 10_001, WITHDRAW_DELAY_S)
    error = revert_error(market.broker, lambda: call.transact({"from": market.payer}))
    assert error == ("FeeTooHigh", 10_001)


def test_deposit_and_deposit_for_credit_the_payer(market: Market) -> None:
    functions = market.broker.functions
    receipt = send(market.w3, functions.deposit(), market.payee, value=3 * ETH)
    assert events(market.broker, "Deposited", receipt) == [
        {"payer": market.payee, "amount": 3 * ETH}
    ]
    # A relayer tops up someone else's deposit.
    receipt = send(market.w3, functions.depositFor(market.payee), market.relayer, value=2)
    assert events(market.broker, "Deposited", receipt) == [{"payer": market.payee, "amount": 2}]
    assert functions.balanceOf(market.payee).call() == 3 * ETH + 2
    assert functions.balanceOf(market.relayer).call() == 0
    assert market.balance(market.broker.address) == 10 * ETH + 3 * ETH + 2


def test_zero_deposits_are_rejected(market: Market) -> None:
    functions = market.broker.functions
    deposit = functions.deposit()
    deposit_for = functions.depositFor(market.payee)
    # No "value": the transactions carry 0 wei.
    assert revert_error(market.broker, lambda: deposit.transact({"from": market.payer})) == (
        "ZeroAmount",
    )
    assert revert_error(market.broker, lambda: deposit_for.transact({"from": market.payer})) == (
        "ZeroAmount",
    )


def test_authorize_replaces_the_cap_and_keeps_what_was_spent(market: Market) -> None:
    functions = market.broker.functions
    assert functions.allowance(market.payer, market.signer).call() == [5 * ETH, 0]
    market.redeem(*market.voucher(ETH))
    assert functions.allowance(market.payer, market.signer).call() == [5 * ETH, ETH]

    receipt = send(market.w3, functions.authorize(market.signer, 2 * ETH), market.payer)
    effective_at = latest_timestamp(market.w3) + WITHDRAW_DELAY_S
    assert events(market.broker, "CapLowering", receipt) == [
        {
            "payer": market.payer,
            "signer": market.signer,
            "cap": 2 * ETH,
            "effectiveAt": effective_at,
        }
    ]
    # A lower cap waits out the withdrawal delay, so vouchers already signed stay good.
    assert functions.allowance(market.payer, market.signer).call() == [5 * ETH, ETH]
    assert functions.pendingCap(market.payer, market.signer).call() == [2 * ETH, effective_at]
    advance_time(market.w3, WITHDRAW_DELAY_S)
    assert functions.allowance(market.payer, market.signer).call() == [2 * ETH, ETH]
    assert functions.pendingCap(market.payer, market.signer).call() == [0, 0]
    receipt = send(market.w3, functions.authorize(market.signer, 3 * ETH), market.payer)
    assert events(market.broker, "Authorized", receipt) == [
        {"payer": market.payer, "signer": market.signer, "cap": 3 * ETH}
    ]
    send(market.w3, functions.authorize(market.signer, 2 * ETH), market.payer)
    advance_time(market.w3, WITHDRAW_DELAY_S)
    # The cap bounds the total, so only one more ETH may be spent.
    voucher, signature = market.voucher(ETH + ETH + 1)
    assert market.redeem_error(voucher, signature) == ("OverCap", 2 * ETH, 2 * ETH + 1)


# ---- EIP-712 -----------------------------------------------------------------------------


def test_voucher_digest_matches_an_independent_eip712_encoding(market: Market) -> None:
    voucher = Voucher(market.payer, market.payee, 123 * ETH + 7, 2**64 - 1)
    signable = typed_voucher(market.broker, voucher)
    functions = market.broker.functions
    assert functions.domainSeparator().call() == signable.header
    expected = keccak(b"\x19" + signable.version + signable.header + signable.body)
    assert functions.voucherDigest(voucher).call() == expected


# ---- redeem ------------------------------------------------------------------------------


def test_redeem_pays_the_delta_minus_the_fee(market: Market) -> None:
    delta = ETH + 3  # fee rounds down: 25000000000000000 wei
    voucher, signature = market.voucher(delta)
    payee_before = market.balance(market.payee)
    fee_before = market.balance(market.fee_recipient)
    broker_before = market.balance(market.broker.address)

    call = market.broker.functions.redeem(voucher, signature)
    assert call.call({"from": market.relayer}) == delta - fee_of(delta)
    receipt = market.redeem(voucher, signature)

    assert market.balance(market.payee) - payee_before == delta - fee_of(delta)
    assert market.balance(market.fee_recipient) - fee_before == fee_of(delta)
    assert broker_before - market.balance(market.broker.address) == delta
    functions = market.broker.functions
    assert functions.balanceOf(market.payer).call() == 10 * ETH - delta
    assert functions.redeemed(market.payer, market.payee).call() == delta
    assert functions.allowance(market.payer, market.signer).call() == [5 * ETH, delta]
    assert events(market.broker, "Redeemed", receipt) == [
        {
            "payer": market.payer,
            "payee": market.payee,
            "signer": market.signer,
            "cumulativeAmount": delta,
            "paid": delta - fee_of(delta),
            "fee": fee_of(delta),
        }
    ]
    assert receipt["gasUsed"] < REDEEM_GAS_CEILING


def test_a_later_cumulative_voucher_pays_only_the_delta(market: Market) -> None:
    market.redeem(*market.voucher(ETH))
    payee_before = market.balance(market.payee)
    fee_before = market.balance(market.fee_recipient)

    receipt = market.redeem(*market.voucher(ETH + ETH // 2))

    delta = ETH // 2
    assert market.balance(market.payee) - payee_before == delta - fee_of(delta)
    assert market.balance(market.fee_recipient) - fee_before == fee_of(delta)
    assert events(market.broker, "Redeemed", receipt)[0]["paid"] == delta - fee_of(delta)
    functions = market.broker.functions
    assert functions.redeemed(market.payer, market.payee).call() == ETH + ETH // 2
    assert functions.balanceOf(market.payer).call() == 10 * ETH - ETH - ETH // 2


def test_replayed_and_lower_cumulative_vouchers_are_rejected(market: Market) -> None:
    low_voucher, low_signature = market.voucher(ETH)
    high_voucher, high_signature = market.voucher(2 * ETH)
    market.redeem(high_voucher, high_signature)

    assert market.redeem_error(high_voucher, high_signature) == (
        "NotIncreasing",
        2 * ETH,
        2 * ETH,
    )
    assert market.redeem_error(low_voucher, low_signature) == ("NotIncreasing", 2 * ETH, ETH)


def test_zero_cumulative_voucher_is_not_increasing(market: Market) -> None:
    assert market.redeem_error(*market.voucher(0)) == ("NotIncreasing", 0, 0)


def test_voucher_from_an_unauthorised_signer_is_rejected(market: Market) -> None:
    stranger = Account.from_key(market.stranger_key).address
    voucher, signature = market.voucher(ETH, key=market.stranger_key)
    assert market.redeem_error(voucher, signature) == ("UnauthorizedSigner", stranger)


def test_revoked_signer_is_rejected_once_the_delay_is_over(market: Market) -> None:
    send(market.w3, market.broker.functions.authorize(market.signer, 0), market.payer)
    # Work already signed for stays payable through the withdrawal delay...
    market.redeem(*market.voucher(ETH))
    advance_time(market.w3, WITHDRAW_DELAY_S)
    # ...and after it the revocation holds.
    assert market.redeem_error(*market.voucher(2 * ETH)) == ("UnauthorizedSigner", market.signer)


def test_signer_cannot_spend_a_payer_that_did_not_authorise_it(market: Market) -> None:
    # The payee has a deposit of its own but never authorised the payer's signer.
    send(market.w3, market.broker.functions.deposit(), market.payee_b, value=ETH)
    voucher = Voucher(market.payee_b, market.payee, ETH // 2, latest_timestamp(market.w3) + 60)
    signature = sign_voucher(market.broker, voucher, market.signer_key)
    assert market.redeem_error(voucher, signature) == ("UnauthorizedSigner", market.signer)


def test_tampered_voucher_recovers_another_address(market: Market) -> None:
    voucher, signature = market.voucher(ETH)
    tampered = voucher._replace(cumulative_wei=4 * ETH)
    recovered = Account.recover_message(typed_voucher(market.broker, tampered), signature=signature)
    assert recovered != market.signer
    assert market.redeem_error(tampered, signature) == ("UnauthorizedSigner", recovered)


def test_over_cap_voucher_is_rejected(market: Market) -> None:
    voucher, signature = market.voucher(5 * ETH + 1)
    assert market.redeem_error(voucher, signature) == ("OverCap", 5 * ETH, 5 * ETH + 1)


def test_cap_is_shared_across_payees(market: Market) -> None:
    market.redeem(*market.voucher(3 * ETH, payee=market.payee))
    voucher, signature = market.voucher(3 * ETH, payee=market.payee_b)
    assert market.redeem_error(voucher, signature) == ("OverCap", 5 * ETH, 6 * ETH)


def test_expired_voucher_is_rejected(market: Market) -> None:
    expiry = latest_timestamp(market.w3) + 60
    voucher, signature = market.voucher(ETH, expiry=expiry)
    advance_time(market.w3, 61)
    assert market.redeem_error(voucher, signature) == ("VoucherExpired", expiry)


def test_voucher_is_redeemable_at_its_expiry_second(market: Market) -> None:
    expiry = latest_timestamp(market.w3) + 60
    voucher, signature = market.voucher(ETH, expiry=expiry)
    market.w3.provider.make_request("evm_setNextBlockTimestamp", [expiry])  # type: ignore[arg-type]
    # An explicit gas limit skips estimation, which would run at a different pending timestamp.
    call = market.broker.functions.redeem(voucher, signature)
    tx_hash = call.transact({"from": market.relayer, "gas": REDEEM_GAS_CEILING})
    receipt = market.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S)
    assert receipt["status"] == 1
    assert market.w3.eth.get_block(receipt["blockNumber"])["timestamp"] == expiry


def test_voucher_beyond_the_deposit_is_rejected(market: Market) -> None:
    send(market.w3, market.broker.functions.authorize(market.signer, 100 * ETH), market.payer)
    voucher, signature = market.voucher(10 * ETH + 1)
    assert market.redeem_error(voucher, signature) == (
        "InsufficientDeposit",
        10 * ETH,
        10 * ETH + 1,
    )


def _malformed(signature: bytes, how: str) -> bytes:
    r, s, v = signature[:32], int.from_bytes(signature[32:64], "big"), signature[64]
    if how == "short":
        return signature[:64]
    if how == "long":
        return signature + b"\x00"
    if how == "high_s":
        # The same signer's malleable twin: (r, n - s, flipped v) recovers the same key.
        return r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])
    if how == "v_out_of_range":
        return r + s.to_bytes(32, "big") + bytes([v - 27])
    if how == "zero_r":
        return bytes(32) + s.to_bytes(32, "big") + bytes([v])
    raise ValueError(how)


@pytest.mark.parametrize("how", ["short", "long", "high_s", "v_out_of_range", "zero_r"])
def test_malformed_signature_is_rejected(market: Market, how: str) -> None:
    voucher, signature = market.voucher(ETH)
    assert market.redeem_error(voucher, _malformed(signature, how)) == ("InvalidSignature",)


def test_high_s_twin_really_recovers_the_signer(market: Market) -> None:
    """Guards the test above: the contract rejects a signature ecrecover would accept."""
    voucher, signature = market.voucher(ETH)
    twin = _malformed(signature, "high_s")
    assert Account.recover_message(typed_voucher(market.broker, voucher), signature=signature) == (
        market.signer
    )
    digest = market.broker.functions.voucherDigest(voucher).call()
    r, s, v = int.from_bytes(twin[:32]), int.from_bytes(twin[32:64]), twin[64] - 27
    public_key = keys.Signature(vrs=(v, r, s)).recover_public_key_from_msg_hash(digest)
    assert public_key.to_checksum_address() == market.signer


def test_failed_payment_to_the_payee_reverts_the_redemption(market: Market) -> None:
    # A payee whose code rejects ETH (PUSH0 PUSH0 REVERT).
    market.w3.provider.make_request("anvil_setCode", [market.payee_b, "0x5f5ffd"])  # type: ignore[arg-type]
    voucher, signature = market.voucher(ETH, payee=market.payee_b)
    assert market.redeem_error(voucher, signature) == ("TransferFailed",)
    assert market.broker.functions.redeemed(market.payer, market.payee_b).call() == 0


# ---- reentrancy --------------------------------------------------------------------------

REENTRANT_PAYEE = """// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.28;

/// A payee that, when paid, tries to redeem a second voucher inside the first redemption.
contract ReentrantPayee {
    address private immutable broker;
    bytes private payload;
    bool public reentered;
    bytes public reentryError;

    constructor(address broker_) { broker = broker_; }

    function arm(bytes calldata payload_) external { payload = payload_; }

    receive() external payable {
        if (payload.length == 0) return;
        bytes memory call = payload;
        delete payload;
        (bool ok, bytes memory err) = broker.call(call);
        reentered = ok;
        reentryError = err;
    }
}
"""


def test_reentrant_redemption_is_rejected(market: Market) -> None:
    compiled = compile_sources({"ReentrantPayee.sol": REENTRANT_PAYEE})
    contract = compiled.contract("ReentrantPayee.sol", "ReentrantPayee")
    factory = market.w3.eth.contract(
        abi=contract["abi"], bytecode=contract["evm"]["bytecode"]["object"]
    )
    tx_hash = factory.constructor(market.broker.address).transact({"from": market.relayer})
    receipt = market.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S)
    attacker = market.w3.eth.contract(address=receipt["contractAddress"], abi=contract["abi"])

    first = market.voucher(ETH, payee=attacker.address)
    # A second voucher, valid on its own: only the reentrancy guard stops it inside the first.
    second = market.voucher(2 * ETH, payee=attacker.address)
    payload = market.broker.encode_abi("redeem", args=list(second))
    send(market.w3, attacker.functions.arm(payload), market.relayer)

    market.redeem(*first)

    assert attacker.functions.reentered().call() is False
    reentry_error = "0x" + attacker.functions.reentryError().call().hex()
    assert decode_error(market.broker.abi, reentry_error) == ("Reentrancy",)
    assert market.broker.functions.redeemed(market.payer, attacker.address).call() == ETH
    assert market.balance(attacker.address) == ETH - fee_of(ETH)


# ---- redeemBatch -------------------------------------------------------------------------


def test_batch_pays_many_payees_in_one_transaction(market: Market) -> None:
    market.redeem(*market.voucher(ETH, payee=market.payee))  # so the batch pays a delta
    newcomer = Account.create().address
    batch = [
        market.voucher(3 * ETH, payee=market.payee),
        market.voucher(ETH // 3, payee=market.payee_b),
        market.voucher(7, payee=newcomer),
    ]
    deltas = {market.payee: 2 * ETH, market.payee_b: ETH // 3, newcomer: 7}
    before = {address: market.balance(address) for address in deltas}
    fee_before = market.balance(market.fee_recipient)
    vouchers = [voucher for voucher, _ in batch]
    signatures = [signature for _, signature in batch]
    call = market.broker.functions.redeemBatch(vouchers, signatures)
    expected_paid = sum(delta - fee_of(delta) for delta in deltas.values())
    assert call.call({"from": market.relayer}) == expected_paid

    receipt = send(market.w3, call, market.relayer)

    for address, delta in deltas.items():
        assert market.balance(address) - before[address] == delta - fee_of(delta)
    total_fee = sum(fee_of(delta) for delta in deltas.values())
    assert market.balance(market.fee_recipient) - fee_before == total_fee
    redeemed = events(market.broker, "Redeemed", receipt)
    assert [(e["payee"], e["cumulativeAmount"], e["paid"], e["fee"]) for e in redeemed] == [
        (
            v.payee,
            v.cumulative_wei,
            deltas[v.payee] - fee_of(deltas[v.payee]),
            fee_of(deltas[v.payee]),
        )
        for v in vouchers
    ]
    functions = market.broker.functions
    assert functions.balanceOf(market.payer).call() == 10 * ETH - ETH - sum(deltas.values())


def test_batch_is_all_or_nothing(market: Market) -> None:
    market.redeem(*market.voucher(ETH, payee=market.payee_b))
    good = market.voucher(ETH, payee=market.payee)
    stale = market.voucher(ETH // 2, payee=market.payee_b)  # below what payee_b redeemed
    call = market.broker.functions.redeemBatch([good[0], stale[0]], [good[1], stale[1]])
    payee_before = market.balance(market.payee)

    error = revert_error(market.broker, lambda: call.transact({"from": market.relayer}))

    assert error == ("NotIncreasing", ETH, ETH // 2)
    assert market.balance(market.payee) == payee_before
    assert market.broker.functions.redeemed(market.payer, market.payee).call() == 0
    assert market.broker.functions.balanceOf(market.payer).call() == 9 * ETH


def test_batch_with_mismatched_lengths_is_rejected(market: Market) -> None:
    voucher, signature = market.voucher(ETH)
    call = market.broker.functions.redeemBatch([voucher], [signature, signature])
    error = revert_error(market.broker, lambda: call.transact({"from": market.relayer}))
    assert error == ("LengthMismatch",)


# ---- unlock / withdraw -------------------------------------------------------------------


def test_withdrawal_waits_for_the_unlock_delay(market: Market) -> None:
    functions = market.broker.functions
    receipt = send(market.w3, functions.unlock(), market.payer)
    unlock_at = market.w3.eth.get_block(receipt["blockNumber"])["timestamp"] + WITHDRAW_DELAY_S
    assert events(market.broker, "UnlockRequested", receipt) == [
        {"payer": market.payer, "unlockAt": unlock_at}
    ]
    assert functions.unlockAt(market.payer).call() == unlock_at

    withdraw = functions.withdraw(4 * ETH)
    early = revert_error(market.broker, lambda: withdraw.transact({"from": market.payer}))
    assert early == ("StillLocked", unlock_at)

    advance_time(market.w3, WITHDRAW_DELAY_S)
    wallet_before = market.balance(market.payer)
    receipt = send(market.w3, withdraw, market.payer)

    assert market.balance(market.payer) == wallet_before + 4 * ETH - gas_cost_wei(receipt)
    assert events(market.broker, "Withdrawn", receipt) == [
        {"payer": market.payer, "amount": 4 * ETH}
    ]
    assert functions.balanceOf(market.payer).call() == 6 * ETH
    # A withdrawal consumes the unlock: the rest needs a new unlock and delay.
    assert functions.unlockAt(market.payer).call() == 0
    again = revert_error(market.broker, lambda: withdraw.transact({"from": market.payer}))
    assert again == ("NotUnlocked",)


def test_withdraw_without_unlock_is_rejected(market: Market) -> None:
    withdraw = market.broker.functions.withdraw(ETH)
    error = revert_error(market.broker, lambda: withdraw.transact({"from": market.payer}))
    assert error == ("NotUnlocked",)


def test_relock_cancels_the_unlock(market: Market) -> None:
    functions = market.broker.functions
    relock = functions.relock()
    assert revert_error(market.broker, lambda: relock.transact({"from": market.payer})) == (
        "NotUnlocked",
    )
    send(market.w3, functions.unlock(), market.payer)
    receipt = send(market.w3, relock, market.payer)
    assert events(market.broker, "Relocked", receipt) == [{"payer": market.payer}]
    assert functions.unlockAt(market.payer).call() == 0

    advance_time(market.w3, WITHDRAW_DELAY_S)
    withdraw = functions.withdraw(ETH)
    error = revert_error(market.broker, lambda: withdraw.transact({"from": market.payer}))
    assert error == ("NotUnlocked",)


def test_withdraw_more_than_the_deposit_or_nothing_is_rejected(market: Market) -> None:
    functions = market.broker.functions
    send(market.w3, functions.unlock(), market.payer)
    advance_time(market.w3, WITHDRAW_DELAY_S)
    too_much = functions.withdraw(10 * ETH + 1)
    assert revert_error(market.broker, lambda: too_much.transact({"from": market.payer})) == (
        "InsufficientDeposit",
        10 * ETH,
        10 * ETH + 1,
    )
    nothing = functions.withdraw(0)
    assert revert_error(market.broker, lambda: nothing.transact({"from": market.payer})) == (
        "ZeroAmount",
    )


def test_vouchers_stay_redeemable_during_the_unlock_delay(market: Market) -> None:
    functions = market.broker.functions
    voucher, signature = market.voucher(3 * ETH)
    send(market.w3, functions.unlock(), market.payer)
    advance_time(market.w3, WITHDRAW_DELAY_S - 60)

    payee_before = market.balance(market.payee)
    market.redeem(voucher, signature)
    assert market.balance(market.payee) - payee_before == 3 * ETH - fee_of(3 * ETH)

    advance_time(market.w3, 60)
    withdraw_all = functions.withdraw(10 * ETH)
    assert revert_error(market.broker, lambda: withdraw_all.transact({"from": market.payer})) == (
        "InsufficientDeposit",
        7 * ETH,
        10 * ETH,
    )
    send(market.w3, functions.withdraw(7 * ETH), market.payer)
    assert functions.balanceOf(market.payer).call() == 0
    assert market.balance(market.broker.address) == 0


# ---- gas ---------------------------------------------------------------------------------


def _batch_gas(market: Market, payees: list[str], cumulative_wei: int) -> int:
    batch = [market.voucher(cumulative_wei, payee=payee) for payee in payees]
    call = market.broker.functions.redeemBatch(
        [voucher for voucher, _ in batch], [signature for _, signature in batch]
    )
    return int(send(market.w3, call, market.relayer)["gasUsed"])


def test_gas_per_redemption(market: Market, record_property: Callable[[str, object], None]) -> None:
    """Records gas for redeem and redeemBatch (N = 1, 10, 100): first and repeat redemptions.

    A first redemption writes a fresh (payer, payee) slot; a repeat one updates it, which is
    the steady state of a worker redeeming its latest voucher. Payees are existing accounts.
    """
    send(market.w3, market.broker.functions.authorize(market.signer, 10 * ETH), market.payer)
    gas = {
        "redeem_first": int(market.redeem(*market.voucher(ETH // 1000))["gasUsed"]),
        "redeem_repeat": int(market.redeem(*market.voucher(2 * ETH // 1000))["gasUsed"]),
    }
    for n in (1, 10, 100):
        payees = [Account.create().address for _ in range(n)]
        for payee in payees:
            market.w3.provider.make_request("anvil_setBalance", [payee, hex(ETH)])  # type: ignore[arg-type]
        gas[f"batch{n}_first"] = _batch_gas(market, payees, ETH // 1000)
        gas[f"batch{n}_repeat"] = _batch_gas(market, payees, 2 * ETH // 1000)
    for name, used in gas.items():
        record_property(f"gas_{name}", used)
    print("PaymentBroker gas:", json.dumps(gas))
    assert gas["redeem_first"] < REDEEM_GAS_CEILING
    assert gas["redeem_repeat"] < REDEEM_GAS_CEILING
    assert gas["batch100_repeat"] < 100 * gas["redeem_repeat"]
