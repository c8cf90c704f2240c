"""Typed client of WorkerRegistry: stake, unbonding, withdrawal, slashing.

Writes are signed with the Chain's local key and waited for; reverts raise ``ContractRevert``.
Amounts are int wei, instants unix seconds. ``slash`` works only from the arbiter's key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import cast

from eth_utils import function_signature_to_4byte_selector, to_checksum_address
from web3.providers import JSONBaseProvider
from web3.types import RPCEndpoint

from contracts.abi import WORKER_REGISTRY, Artifact, load_artifact
from contracts.chain import Chain, ChainError, TxResult
from contracts.events import EventReader, Slashed, registry_events

EVIDENCE_HASH_BYTES = 32


@dataclass(frozen=True)
class Unbonding:
    """``amount_wei`` on its way out, withdrawable from ``ready_at`` (unix s); (0, 0): none."""

    amount_wei: int
    ready_at: int


@dataclass(frozen=True)
class SlashResult(TxResult):
    """``slashed_wei`` actually taken: the amount asked, capped at what the worker had."""

    slashed_wei: int


def _address_word(address: str) -> str:
    """``address`` as one ABI word: 32 bytes, left-padded, hex without 0x."""
    return to_checksum_address(address)[2:].lower().rjust(64, "0")


class WorkerRegistry:
    """WorkerRegistry at ``address``; writes are sent from ``chain``'s key."""

    def __init__(self, chain: Chain, address: str, artifact: Artifact | None = None) -> None:
        self.chain = chain
        self.artifact = artifact or load_artifact(WORKER_REGISTRY)
        self.address = to_checksum_address(address)
        self.contract = chain.contract(self.address, self.artifact.abi)

    def with_chain(self, chain: Chain) -> WorkerRegistry:
        """The same registry, sending from another key (``chain.with_key(...)``)."""
        return WorkerRegistry(chain, self.address, self.artifact)

    @cached_property
    def events(self) -> EventReader:
        return registry_events(self.chain, self.address, self.artifact.abi)

    # --- writes ------------------------------------------------------------------------

    def stake(self, amount_wei: int) -> TxResult:
        """Add ``amount_wei`` to the sender's active stake."""
        return self._transact("stake", value_wei=amount_wei)

    def unbond(self, amount_wei: int) -> TxResult:
        """Move ``amount_wei`` of active stake to unbonding (restarts the unbonding clock)."""
        return self._transact("unbond", amount_wei)

    def withdraw(self) -> TxResult:
        """Send the sender all its unbonded stake, once ``unbonding_delay_s`` has passed."""
        return self._transact("withdraw")

    def slash(self, worker: str, amount_wei: int, evidence_hash: bytes | str) -> SlashResult:
        """Take up to ``amount_wei`` of ``worker``'s stake to the arbiter (the sender must be
        the arbiter). ``evidence_hash``: 32 bytes (or 0x-hex), e.g. the sha256 of the two
        conflicting signed results."""
        evidence = _bytes32(evidence_hash)
        receipt = self.chain.transact(
            self.contract, "slash", to_checksum_address(worker), amount_wei, evidence
        )
        slashed = self.events.from_receipt(receipt, Slashed)
        base = TxResult.from_receipt(receipt)
        return SlashResult(
            tx_hash=base.tx_hash,
            block=base.block,
            gas_used=base.gas_used,
            slashed_wei=sum(event.amount_wei for event in slashed),
        )

    # --- reads -------------------------------------------------------------------------

    def stake_of(self, worker: str) -> int:
        """Active stake of ``worker``, wei (unbonding funds not included)."""
        return int(self.chain.call(self.contract, "stakeOf", to_checksum_address(worker)))

    def unbonding_of(self, worker: str) -> Unbonding:
        amount, ready_at = self.chain.call(
            self.contract, "unbondingOf", to_checksum_address(worker)
        )
        return Unbonding(amount_wei=int(amount), ready_at=int(ready_at))

    def is_slashed(self, worker: str) -> bool:
        return bool(self.chain.call(self.contract, "isSlashed", to_checksum_address(worker)))

    def evidence_used(self, evidence_hash: bytes | str) -> bool:
        """Has a slash already been made with this evidence?"""
        return bool(self.chain.call(self.contract, "evidenceUsed", _bytes32(evidence_hash)))

    def is_eligible(self, worker: str) -> bool:
        """Enough active stake, nothing unbonding, never slashed."""
        return bool(self.chain.call(self.contract, "isEligible", to_checksum_address(worker)))

    def eligible_many(self, workers: Sequence[str]) -> list[bool]:
        """``is_eligible`` of each worker, in order, asked in one JSON-RPC batch request (one
        HTTP round trip, however many workers; callers keep batches to a few hundred)."""
        if not workers:
            return []
        # Encoded here, not through web3's contract layer, which spends milliseconds per call
        # on ABI lookups: isEligible(address) is its selector and one padded word.
        selector = function_signature_to_4byte_selector("isEligible(address)").hex()
        calls = [
            (
                RPCEndpoint("eth_call"),
                [{"to": self.address, "data": f"0x{selector}{_address_word(worker)}"}, "latest"],
            )
            for worker in workers
        ]
        provider = cast(JSONBaseProvider, self.chain.w3.provider)  # Chain's is HTTP, JSON-RPC
        answers = provider.make_batch_request(calls)
        if not isinstance(answers, list):  # the node refused the whole batch
            raise ChainError(f"isEligible batch refused: {answers.get('error')}")
        eligible = []
        for worker, answer in zip(workers, answers, strict=True):
            if "error" in answer or "result" not in answer:
                raise ChainError(f"isEligible({worker}) failed: {answer.get('error')}")
            eligible.append(int(str(answer["result"]), 16) != 0)
        return eligible

    def min_stake_wei(self) -> int:
        return int(self.chain.call(self.contract, "minStake"))

    def unbonding_delay_s(self) -> int:
        return int(self.chain.call(self.contract, "unbondingDelay"))

    def arbiter(self) -> str:
        return str(to_checksum_address(self.chain.call(self.contract, "arbiter")))

    def _transact(self, function: str, *args: object, value_wei: int = 0) -> TxResult:
        receipt = self.chain.transact(self.contract, function, *args, value_wei=value_wei)
        return TxResult.from_receipt(receipt)


def _bytes32(value: bytes | str) -> bytes:
    raw = bytes.fromhex(value.removeprefix("0x")) if isinstance(value, str) else bytes(value)
    if len(raw) != EVIDENCE_HASH_BYTES:
        raise ValueError(f"evidence_hash must be {EVIDENCE_HASH_BYTES} bytes, got {len(raw)}")
    return raw
