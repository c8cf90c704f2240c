"""Voucher signing, recovery and digests: pure, no chain.

The known vector below was cross-checked against PaymentBroker.voucherDigest on anvil; the
binding tests (tests/contracts/test_bindings.py) re-check it against the contract each run.
"""

from __future__ import annotations

import pytest
from eth_account import Account
from pydantic import ValidationError

from contracts.anvil import DEV_CHAIN_ID, DEV_PRIVATE_KEYS
from protocol.vouchers import (
    Voucher,
    recover_voucher_signer,
    sign_voucher,
    voucher_digest,
    voucher_domain_separator,
    voucher_typed_data,
)

# The vector's broker is the first contract that dev key 7 creates (its nonce 0) on chain 31337.
VECTOR_DEPLOYER_KEY = DEV_PRIVATE_KEYS[7]
VECTOR_BROKER = "0xef11D1c2aA48826D4c41e54ab82D1Ff5Ad8A64Ca"
VECTOR_SIGNER_KEY = DEV_PRIVATE_KEYS[2]
VECTOR_VOUCHER = Voucher(
    payer="0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
    payee="0x90F79bf6EB2c4f870365E785982E1f101E93b906",
    cumulative_amount=1_234_567_890_123_456_789,
    expiry=2_000_000_000,
)
VECTOR_DOMAIN_SEPARATOR = "1dcdb797409935b293e47b3cf75055652c900f349b6796ec4a2daaf062ea2fdf"
VECTOR_DIGEST = "d226ba12d7a1c8a3b31c78262af1ca820987395acca30485d8909043db74185c"
VECTOR_SIGNATURE = (
    "0x95b86678c071a6352154adf86f791aac7db963e075947ea4f229477e681b449f"
    "6e29b5baaf7bb03e46144ae0e3528b913b1abec2968ade5123f2c79d9a90344b1c"
)


def test_sign_then_recover_gives_the_signer() -> None:
    signature = sign_voucher(VECTOR_SIGNER_KEY, VECTOR_VOUCHER, DEV_CHAIN_ID, VECTOR_BROKER)
    assert signature.startswith("0x") and len(bytes.fromhex(signature[2:])) == 65
    signer = Account.from_key(VECTOR_SIGNER_KEY).address
    assert recover_voucher_signer(signature, VECTOR_VOUCHER, DEV_CHAIN_ID, VECTOR_BROKER) == signer


def test_known_vector_is_stable() -> None:
    assert voucher_domain_separator(DEV_CHAIN_ID, VECTOR_BROKER).hex() == VECTOR_DOMAIN_SEPARATOR
    assert voucher_digest(VECTOR_VOUCHER, DEV_CHAIN_ID, VECTOR_BROKER).hex() == VECTOR_DIGEST
    # RFC 6979 signing is deterministic, so the signature is part of the vector too.
    assert (
        sign_voucher(VECTOR_SIGNER_KEY, VECTOR_VOUCHER, DEV_CHAIN_ID, VECTOR_BROKER)
        == VECTOR_SIGNATURE
    )


def test_wrong_key_recovers_a_different_address() -> None:
    other_key = DEV_PRIVATE_KEYS[5]
    signature = sign_voucher(other_key, VECTOR_VOUCHER, DEV_CHAIN_ID, VECTOR_BROKER)
    recovered = recover_voucher_signer(signature, VECTOR_VOUCHER, DEV_CHAIN_ID, VECTOR_BROKER)
    assert recovered == Account.from_key(other_key).address
    assert recovered != Account.from_key(VECTOR_SIGNER_KEY).address


def test_signature_is_bound_to_amount_chain_and_broker() -> None:
    signer = Account.from_key(VECTOR_SIGNER_KEY).address
    more = VECTOR_VOUCHER.model_copy(update={"cumulative_amount": 1_234_567_890_123_456_790})
    other_broker = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
    for voucher, chain_id, broker in (
        (more, DEV_CHAIN_ID, VECTOR_BROKER),
        (VECTOR_VOUCHER, 1, VECTOR_BROKER),
        (VECTOR_VOUCHER, DEV_CHAIN_ID, other_broker),
    ):
        assert voucher_digest(voucher, chain_id, broker).hex() != VECTOR_DIGEST
        assert recover_voucher_signer(VECTOR_SIGNATURE, voucher, chain_id, broker) != signer


def test_typed_data_is_the_eip712_message_wallets_take() -> None:
    typed = voucher_typed_data(VECTOR_VOUCHER, DEV_CHAIN_ID, VECTOR_BROKER.lower())
    assert typed["primaryType"] == "Voucher"
    assert typed["domain"] == {
        "name": "gpumarket PaymentBroker",
        "version": "1",
        "chainId": DEV_CHAIN_ID,
        "verifyingContract": VECTOR_BROKER,
    }
    assert [field["name"] for field in typed["types"]["Voucher"]] == [
        "payer",
        "payee",
        "cumulativeAmount",
        "expiry",
    ]
    assert typed["message"]["cumulativeAmount"] == 1_234_567_890_123_456_789


@pytest.mark.parametrize(
    "signature",
    ["0x1234", "0x" + "00" * 65, "0x" + "zz" * 65, VECTOR_SIGNATURE[:-2] + "05"],
)
def test_malformed_signature_is_a_value_error(signature: str) -> None:
    with pytest.raises(ValueError):
        recover_voucher_signer(signature, VECTOR_VOUCHER, DEV_CHAIN_ID, VECTOR_BROKER)


def test_voucher_checksums_addresses_and_takes_wei_as_decimal_strings() -> None:
    voucher = Voucher.model_validate(
        {
            "payer": VECTOR_VOUCHER.payer.lower(),
            "payee": VECTOR_VOUCHER.payee.upper().replace("0X", "0x"),
            "cumulative_amount": "1234567890123456789",
            "expiry": 2_000_000_000,
        }
    )
    assert voucher == VECTOR_VOUCHER
    assert '"cumulative_amount":"1234567890123456789"' in voucher.model_dump_json()
    assert Voucher.model_validate_json(voucher.model_dump_json()) == voucher


@pytest.mark.parametrize(
    "change",
    [
        {"payer": "0x70997970c51812dc3A010C7d01b50e0d17dc79C8"},  # mixed case, bad checksum
        {"payee": "0x1234"},
        {"cumulative_amount": -1},
        {"cumulative_amount": 2**256},
        {"cumulative_amount": 1.5},
        {"expiry": 2**64},
        {"expiry": "2000000000"},
    ],
)
def test_voucher_refuses_what_the_contract_cannot_hold(change: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Voucher.model_validate({**VECTOR_VOUCHER.model_dump(), **change})
