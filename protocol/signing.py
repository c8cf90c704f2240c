"""What gets signed, and how: registration challenges (EIP-191) and results (EIP-712).

Pure functions over eth-account; no I/O.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from eth_account import Account
from eth_account.messages import SignableMessage, encode_defunct, encode_typed_data
from eth_keys.exceptions import BadSignature as _EthKeysBadSignature
from eth_utils import keccak
from eth_utils.exceptions import ValidationError as _EthValidationError

RESULT_DOMAIN = {"name": "gpumarket", "version": "1"}
RESULT_TYPES = {
    "Result": [
        {"name": "jobId", "type": "string"},
        {"name": "attempt", "type": "uint32"},
        {"name": "outputSha256", "type": "bytes32"},
        {"name": "units", "type": "uint64"},
        {"name": "priceWeiPerUnit", "type": "uint256"},
        {"name": "promptUnits", "type": "uint64"},
        {"name": "promptPriceWeiPerUnit", "type": "uint256"},
    ]
}
"""A signed result binds what was billed, beside the output: ``units`` (the pricing unit: input
items for inference, output pixels for transcode, prompt + completion tokens for generate), of
which ``promptUnits`` (generate: the prompt tokens; 0 otherwise) are billed at
``promptPriceWeiPerUnit`` and the rest at ``priceWeiPerUnit`` (wei). A verifier recomputes the
cost from the signed fields alone: ``protocol.units.cost_wei``."""


def registration_message(address: str, nonce: str, expires_at_iso: str) -> str:
    """The text a worker signs (EIP-191 personal_sign) to prove it holds ``address``."""
    return (
        "gpumarket worker registration\n"
        f"address: {address.lower()}\n"
        f"nonce: {nonce}\n"
        f"expires: {expires_at_iso}"
    )


def payer_link_message(client_id: str, address: str, nonce: str, expires_at_iso: str) -> str:
    """The text a client's payer account signs (EIP-191) to pay for that client's jobs."""
    return (
        "gpumarket payer link\n"
        f"client: {client_id}\n"
        f"address: {address.lower()}\n"
        f"nonce: {nonce}\n"
        f"expires: {expires_at_iso}"
    )


def sign_registration(private_key: str | bytes, message: str) -> str:
    signed = Account.sign_message(encode_defunct(text=message), private_key=private_key)
    return "0x" + bytes(signed.signature).hex().removeprefix("0x")


def _recover(message: SignableMessage, signature: str) -> str:
    """Checksummed signer of ``message``; ValueError for a signature that recovers no key.

    eth-keys reports out-of-range or unrecoverable (r, s, v) with its own exception types,
    which are not ValueErrors; callers should only have to catch one.
    """
    try:
        return str(Account.recover_message(message, signature=signature))
    except (_EthKeysBadSignature, _EthValidationError) as exc:
        raise ValueError(f"not a valid secp256k1 signature ({exc})") from exc


def recover_registration_signer(message: str, signature: str) -> str:
    """Address (checksummed) that signed ``message``; raises ValueError on a malformed one."""
    return _recover(encode_defunct(text=message), signature)


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, floats as Python repr."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def output_sha256(output: Any) -> str:
    """sha256 (hex) of a result: canonical JSON of the inline output or of the blob list."""
    return hashlib.sha256(canonical_json(output)).hexdigest()


def _result_message(
    job_id: str,
    attempt: int,
    output_sha256_hex: str,
    units: int,
    price_wei_per_unit: int,
    prompt_units: int,
    prompt_price_wei_per_unit: int,
) -> dict[str, Any]:
    return {
        "domain": RESULT_DOMAIN,
        "types": RESULT_TYPES,
        "primaryType": "Result",
        "message": {
            "jobId": job_id,
            "attempt": attempt,
            "outputSha256": bytes.fromhex(output_sha256_hex),
            "units": units,
            "priceWeiPerUnit": price_wei_per_unit,
            "promptUnits": prompt_units,
            "promptPriceWeiPerUnit": prompt_price_wei_per_unit,
        },
    }


def sign_result(
    private_key: str | bytes,
    job_id: str,
    attempt: int,
    output_sha256_hex: str,
    units: int,
    price_wei_per_unit: int,
    *,
    prompt_units: int = 0,
    prompt_price_wei_per_unit: int = 0,
) -> str:
    """EIP-712 signature over (job id, attempt, output sha256, units, price in wei per unit,
    prompt units, prompt price in wei per unit), as 0x-hex: the worker's word on what it
    produced and what it bills for it. Only generate results have prompt units."""
    message = _result_message(
        job_id,
        attempt,
        output_sha256_hex,
        units,
        price_wei_per_unit,
        prompt_units,
        prompt_price_wei_per_unit,
    )
    signed = Account.sign_message(encode_typed_data(full_message=message), private_key=private_key)
    return "0x" + bytes(signed.signature).hex().removeprefix("0x")


def recover_result_signer(
    job_id: str,
    attempt: int,
    output_sha256_hex: str,
    units: int,
    price_wei_per_unit: int,
    signature: str,
    *,
    prompt_units: int = 0,
    prompt_price_wei_per_unit: int = 0,
) -> str:
    """Address (checksummed) that signed the result; raises ValueError on a malformed one.

    A signature over other units or other prices recovers another address, so a result
    can only be billed as its worker signed it."""
    message = _result_message(
        job_id,
        attempt,
        output_sha256_hex,
        units,
        price_wei_per_unit,
        prompt_units,
        prompt_price_wei_per_unit,
    )
    try:
        encoded = encode_typed_data(full_message=message)
    except (ValueError, OverflowError, TypeError) as exc:  # units or price out of range
        raise ValueError(f"result cannot be encoded: {exc}") from exc
    return _recover(encoded, signature)


# -- result batches ---------------------------------------------------------------------------
# A worker reporting many results signs them once: EIP-712 over the Merkle root of the per-job
# ``Result`` struct hashes (hashStruct, the same struct ``sign_result`` signs), in the batch's
# order, and their count. One job's result is still proven alone, in O(log n): its fields give
# its hash, and the hashes on its path (``ResultTree.path``) lead from it to the signed root.
# The tree: each level pairs its nodes in order, keccak256(left || right); an odd node out at
# the end of a level goes up unchanged. One result: the root is its hash.

RESULT_BATCH_TYPES = {
    "ResultBatch": [
        {"name": "resultsRoot", "type": "bytes32"},
        {"name": "count", "type": "uint32"},
    ]
}
LIST_SCHEME = "list"
MERKLE_SCHEME = "merkle"
# Until 2026-12 a batch was signed over the list of hashes itself (``ResultBatch(bytes32[]
# results)``), which each result then carried whole as its proof. The orchestrator still takes
# such batches from workers that sign them so, and proves the results stored so.
LIST_RESULT_BATCH_TYPES = {"ResultBatch": [{"name": "results", "type": "bytes32[]"}]}
_RESULT_TYPE_HASH = keccak(
    text="Result(string jobId,uint32 attempt,bytes32 outputSha256,uint64 units,"
    "uint256 priceWeiPerUnit,uint64 promptUnits,uint256 promptPriceWeiPerUnit)"
)


def _uint(value: int, bits: int, name: str) -> bytes:
    if not 0 <= value < 2**bits:
        raise ValueError(f"{name} {value} does not fit uint{bits}")
    return value.to_bytes(32, "big")


def result_hash(
    job_id: str,
    attempt: int,
    output_sha256_hex: str,
    units: int,
    price_wei_per_unit: int,
    *,
    prompt_units: int = 0,
    prompt_price_wei_per_unit: int = 0,
) -> str:
    """The EIP-712 struct hash (0x-hex) of one job's ``Result``: what a batch signature lists.
    ValueError for a field out of its type's range."""
    try:
        digest = bytes.fromhex(output_sha256_hex)
    except ValueError as exc:
        raise ValueError(f"output sha256 {output_sha256_hex!r} is not hex") from exc
    if len(digest) != 32:
        raise ValueError(f"output sha256 {output_sha256_hex!r} is not 32 bytes")
    encoded = (
        _RESULT_TYPE_HASH
        + keccak(text=job_id)
        + _uint(attempt, 32, "attempt")
        + digest
        + _uint(units, 64, "units")
        + _uint(price_wei_per_unit, 256, "priceWeiPerUnit")
        + _uint(prompt_units, 64, "promptUnits")
        + _uint(prompt_price_wei_per_unit, 256, "promptPriceWeiPerUnit")
    )
    return "0x" + keccak(encoded).hex()


class ResultTree:
    """The Merkle tree of a batch's result hashes (see above): its root, and each result's
    path to it. Built once per batch (n - 1 hashes), then each path costs O(log n)."""

    def __init__(self, result_hashes: list[str]) -> None:
        if not result_hashes:
            raise ValueError("a result batch holds at least one result")
        level = [_hash32(h) for h in result_hashes]
        self.levels = [level]
        while len(level) > 1:
            level = [
                keccak(level[i] + level[i + 1]) if i + 1 < len(level) else level[i]
                for i in range(0, len(level), 2)
            ]
            self.levels.append(level)
        self.count = len(result_hashes)
        self.root = "0x" + level[0].hex()

    def path(self, index: int) -> list[str]:
        """The sibling hashes from result ``index`` up to the root (none where a node went up
        unchanged)."""
        if not 0 <= index < self.count:
            raise ValueError(f"index {index} is outside a batch of {self.count}")
        path = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                path.append("0x" + level[sibling].hex())
            index //= 2
        return path


def root_from_path(result_hash_hex: str, index: int, count: int, path: list[str]) -> str:
    """The root that result ``index`` of a batch of ``count``, with hash ``result_hash_hex``,
    leads to along ``path`` (``ResultTree.path``). ValueError when the path does not fit the
    place: too short, too long, or an index outside the batch."""
    if not 0 <= index < count or count > 2**32 - 1:
        raise ValueError(f"index {index} is outside a batch of {count}")
    node = _hash32(result_hash_hex)
    steps = iter(path)
    size = count
    while size > 1:
        if index % 2 == 1 or index + 1 < size:
            sibling = next(steps, None)
            if sibling is None:
                raise ValueError(f"the path is too short for result {index} of {count}")
            pair = (_hash32(sibling), node) if index % 2 == 1 else (node, _hash32(sibling))
            node = keccak(pair[0] + pair[1])
        index //= 2
        size = (size + 1) // 2
    if next(steps, None) is not None:
        raise ValueError(f"the path is too long for a batch of {count}")
    return "0x" + node.hex()


def _hash32(value: str) -> bytes:
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a hex hash") from exc
    if len(raw) != 32:
        raise ValueError(f"{value!r} is not 32 bytes")
    return raw


def _result_batch_message(root: str, count: int) -> SignableMessage:
    message = {
        "domain": RESULT_DOMAIN,
        "types": RESULT_BATCH_TYPES,
        "primaryType": "ResultBatch",
        "message": {"resultsRoot": _hash32(root), "count": count},
    }
    return encode_typed_data(full_message=message)


def sign_result_batch(private_key: str | bytes, result_hashes: list[str]) -> str:
    """One EIP-712 signature (0x-hex) over the Merkle root and count of the ordered list of
    ``result_hash`` values."""
    tree = ResultTree(result_hashes)
    message = _result_batch_message(tree.root, tree.count)
    signed = Account.sign_message(message, private_key=private_key)
    return "0x" + bytes(signed.signature).hex().removeprefix("0x")


def recover_result_batch_signer(result_hashes: list[str], signature: str) -> str:
    """Address (checksummed) that signed the batch; ValueError on a malformed one."""
    tree = ResultTree(result_hashes)
    return recover_result_root_signer(tree.root, tree.count, signature)


def _result_list_message(result_hashes: list[str]) -> SignableMessage:
    message = {
        "domain": RESULT_DOMAIN,
        "types": LIST_RESULT_BATCH_TYPES,
        "primaryType": "ResultBatch",
        "message": {"results": [_hash32(h) for h in result_hashes]},
    }
    return encode_typed_data(full_message=message)


def sign_result_list(private_key: str | bytes, result_hashes: list[str]) -> str:
    """A batch signed as before the Merkle root (``LIST_SCHEME``): over the list itself."""
    signed = Account.sign_message(_result_list_message(result_hashes), private_key=private_key)
    return "0x" + bytes(signed.signature).hex().removeprefix("0x")


def recover_result_list_signer(result_hashes: list[str], signature: str) -> str:
    """Address that signed the list of hashes itself (``LIST_SCHEME``); ValueError on a
    malformed signature or hash."""
    try:
        message = _result_list_message(result_hashes)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"result batch cannot be encoded: {exc}") from exc
    return _recover(message, signature)


def recover_result_root_signer(root: str, count: int, signature: str) -> str:
    """Address (checksummed) that signed a batch's root and count; ValueError on a malformed
    signature or root."""
    try:
        message = _result_batch_message(root, count)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"result batch cannot be encoded: {exc}") from exc
    return _recover(message, signature)


def recover_job_result_signer(
    job_id: str,
    attempt: int,
    output_sha256_hex: str,
    units: int,
    price_wei_per_unit: int,
    signature: str,
    result_hashes: list[str] | None = None,
    index: int | None = None,
    *,
    prompt_units: int = 0,
    prompt_price_wei_per_unit: int = 0,
    batch_count: int | None = None,
    batch_path: list[str] | None = None,
) -> str:
    """Address (checksummed) that signed one job's result, as a result view carries it:
    signed alone; in a batch, by its ``index`` and the ``batch_count`` and ``batch_path`` of
    its ``batch`` proof (the job's own hash must lead along the path to the signed root); or
    in a batch signed over its list (``LIST_SCHEME``: ``result_hashes``, where the job's own
    hash must sit at ``index``). ValueError when the proof does not hold."""
    prompt = {"prompt_units": prompt_units, "prompt_price_wei_per_unit": prompt_price_wei_per_unit}
    if result_hashes is None and batch_path is None:
        return recover_result_signer(
            job_id, attempt, output_sha256_hex, units, price_wei_per_unit, signature, **prompt
        )
    mine = result_hash(job_id, attempt, output_sha256_hex, units, price_wei_per_unit, **prompt)
    if result_hashes is not None:
        if index is None or not 0 <= index < len(result_hashes) or result_hashes[index] != mine:
            raise ValueError(f"job {job_id}'s result hash is not at index {index} of its batch")
        return recover_result_list_signer(result_hashes, signature)
    assert batch_path is not None
    if index is None or batch_count is None:
        raise ValueError(f"job {job_id}'s batch proof needs its index and the batch's count")
    root = root_from_path(mine, index, batch_count, batch_path)
    return recover_result_root_signer(root, batch_count, signature)
