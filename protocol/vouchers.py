"""Cumulative payment vouchers: EIP-712 typed data that PaymentBroker redeems.

A voucher says "``payer`` owes ``payee`` a cumulative total of ``cumulative_amount`` wei,
redeemable until ``expiry``" (unix seconds). The orchestrator signs a new one after each paid
job; the contract pays the increase over what was already redeemed, so only the latest voucher
matters and a replay pays nothing.

The domain binds a signature to one chain and one broker contract:
``{name: "gpumarket PaymentBroker", version: "1", chainId, verifyingContract}``.

Pure functions over eth-account; no I/O.
"""

from __future__ import annotations

from typing import Annotated, Any

from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_keys.exceptions import BadSignature as _EthKeysBadSignature
from eth_utils import is_checksum_address, keccak, to_checksum_address
from eth_utils.exceptions import ValidationError as _EthValidationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from protocol.units import ADDRESS_PATTERN, Wei

VOUCHER_DOMAIN_NAME = "gpumarket PaymentBroker"
VOUCHER_DOMAIN_VERSION = "1"
MAX_UINT256 = 2**256 - 1
MAX_UINT64 = 2**64 - 1
SIGNATURE_BYTES = 65

EIP712_DOMAIN_FIELDS = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
VOUCHER_FIELDS = [
    {"name": "payer", "type": "address"},
    {"name": "payee", "type": "address"},
    {"name": "cumulativeAmount", "type": "uint256"},
    {"name": "expiry", "type": "uint64"},
]


def checksum_address(value: str) -> str:
    """EIP-55 form of ``value``; a mixed-case address with a wrong checksum is refused.

    All-lowercase and all-uppercase hex carry no checksum and are accepted as they are.
    """
    body = value[2:]
    if body != body.lower() and body != body.upper() and not is_checksum_address(value):
        raise ValueError(f"{value} has an invalid EIP-55 checksum (a typo?)")
    return str(to_checksum_address(value))


ChecksumAddressStr = Annotated[
    str, Field(pattern=ADDRESS_PATTERN), AfterValidator(checksum_address)
]


class Voucher(BaseModel):
    """``payer`` owes ``payee`` ``cumulative_amount`` wei in total, until ``expiry`` (unix s)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    payer: ChecksumAddressStr
    payee: ChecksumAddressStr
    cumulative_amount: Wei = Field(ge=0, le=MAX_UINT256)
    expiry: int = Field(ge=0, le=MAX_UINT64, strict=True)

    def as_struct(self) -> tuple[str, str, int, int]:
        """The Solidity ``Voucher`` tuple (payer, payee, cumulativeAmount, expiry)."""
        return (self.payer, self.payee, self.cumulative_amount, self.expiry)


def voucher_domain(chain_id: int, broker_address: str) -> dict[str, Any]:
    return {
        "name": VOUCHER_DOMAIN_NAME,
        "version": VOUCHER_DOMAIN_VERSION,
        "chainId": chain_id,
        "verifyingContract": checksum_address(broker_address),
    }


def voucher_typed_data(voucher: Voucher, chain_id: int, broker_address: str) -> dict[str, Any]:
    """The full EIP-712 message (types, primaryType, domain, message), as wallets take it."""
    return {
        "types": {"EIP712Domain": EIP712_DOMAIN_FIELDS, "Voucher": VOUCHER_FIELDS},
        "primaryType": "Voucher",
        "domain": voucher_domain(chain_id, broker_address),
        "message": {
            "payer": voucher.payer,
            "payee": voucher.payee,
            "cumulativeAmount": voucher.cumulative_amount,
            "expiry": voucher.expiry,
        },
    }


def _signable(voucher: Voucher, chain_id: int, broker_address: str) -> SignableMessage:
    return encode_typed_data(full_message=voucher_typed_data(voucher, chain_id, broker_address))


def voucher_domain_separator(chain_id: int, broker_address: str) -> bytes:
    """The 32-byte EIP-712 domain separator; equals the contract's ``domainSeparator()``."""
    return bytes(_signable(_DOMAIN_PROBE, chain_id, broker_address).header)


def voucher_digest(voucher: Voucher, chain_id: int, broker_address: str) -> bytes:
    """keccak256("\\x19\\x01" ‖ domainSeparator ‖ structHash): what the payer's signer signs.

    Equals the contract's ``voucherDigest(voucher)``.
    """
    signable = _signable(voucher, chain_id, broker_address)
    return bytes(keccak(b"\x19" + signable.version + signable.header + signable.body))


def sign_voucher(
    private_key: str | bytes, voucher: Voucher, chain_id: int, broker_address: str
) -> str:
    """EIP-712 signature over ``voucher``, as 0x-hex of 65 bytes (r ‖ s ‖ v, v in {27, 28})."""
    signed = Account.sign_message(
        _signable(voucher, chain_id, broker_address), private_key=private_key
    )
    return "0x" + bytes(signed.signature).hex()


def recover_voucher_signer(
    signature: str | bytes, voucher: Voucher, chain_id: int, broker_address: str
) -> str:
    """Checksummed address that signed ``voucher``; ValueError for a malformed signature.

    A well-formed signature by the wrong key recovers some other address: compare the result
    with the signer you expect.
    """
    raw = bytes.fromhex(signature.removeprefix("0x")) if isinstance(signature, str) else signature
    if len(raw) != SIGNATURE_BYTES:
        raise ValueError(f"a voucher signature is {SIGNATURE_BYTES} bytes, got {len(raw)}")
    try:
        return str(
            Account.recover_message(_signable(voucher, chain_id, broker_address), signature=raw)
        )
    except (_EthKeysBadSignature, _EthValidationError) as exc:
        raise ValueError(f"not a valid secp256k1 signature ({exc})") from exc


# Any voucher will do to compute the domain separator, which does not depend on the message.
_DOMAIN_PROBE = Voucher(
    payer="0x0000000000000000000000000000000000000000",
    payee="0x0000000000000000000000000000000000000000",
    cumulative_amount=0,
    expiry=0,
)
