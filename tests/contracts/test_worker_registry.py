"""WorkerRegistry on a real anvil chain, deployed from the committed artifact.

Custom errors are decoded from their 4-byte selector and checked with their arguments;
balances are checked exactly in wei, net of the gas the sender paid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import pytest
from eth_abi import decode as abi_decode
from eth_account import Account
from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractCustomError
from web3.logs import DISCARD
from web3.types import TxReceipt

from contracts.compile import ARTIFACTS_DIR

ETH = 10**18
MIN_STAKE = ETH
UNBONDING_DELAY_S = 7 * 24 * 3600
RECEIPT_TIMEOUT_S = 10
EVIDENCE = keccak(text="two conflicting signed results")


# ---- chain helpers ----------------------------------------------------------------------


def deploy(w3: Web3, name: str, *args: Any, sender: str) -> Contract:
    artifact = json.loads((ARTIFACTS_DIR / f"{name}.json").read_text())
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    tx_hash = factory.constructor(*args).transact({"from": sender})
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S)
    return cast(Contract, w3.eth.contract(address=receipt["contractAddress"], abi=artifact["abi"]))


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


def gas_cost_wei(receipt: TxReceipt) -> int:
    return receipt["gasUsed"] * receipt["effectiveGasPrice"]


def advance_time(w3: Web3, seconds: int) -> None:
    w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
    w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]


@dataclass
class Registry:
    """A deployed registry, its arbiter, two workers and an outsider (addresses)."""

    w3: Web3
    contract: Contract
    arbiter: str
    worker: str
    worker_b: str
    outsider: str

    def send(self, call: Any, sender: str, value: int = 0) -> TxReceipt:
        tx_hash = call.transact({"from": sender, "value": value})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S)
        assert receipt["status"] == 1
        return receipt

    def error(self, call: Any, sender: str, value: int = 0) -> tuple[Any, ...]:
        """The decoded custom error of a transaction that must revert."""
        with pytest.raises(ContractCustomError) as caught:
            call.transact({"from": sender, "value": value})
        assert isinstance(caught.value.data, str)
        return decode_error(self.contract.abi, caught.value.data)

    def events(self, name: str, receipt: TxReceipt) -> list[dict[str, Any]]:
        logs = self.contract.events[name]().process_receipt(receipt, errors=DISCARD)
        return [dict(log["args"]) for log in logs]

    def balance(self, address: str) -> int:
        return int(self.w3.eth.get_balance(address))  # type: ignore[arg-type]

    def block_time(self, receipt: TxReceipt) -> int:
        return int(self.w3.eth.get_block(receipt["blockNumber"])["timestamp"])

    def eligible(self, worker: str) -> bool:
        return bool(self.contract.functions.isEligible(worker).call())


@pytest.fixture
def registry(w3: Web3, dev_keys: tuple[str, ...]) -> Registry:
    addresses = [Account.from_key(key).address for key in dev_keys]
    contract = deploy(
        w3, "WorkerRegistry", MIN_STAKE, UNBONDING_DELAY_S, addresses[1], sender=addresses[0]
    )
    return Registry(
        w3=w3,
        contract=contract,
        arbiter=addresses[1],
        worker=addresses[2],
        worker_b=addresses[3],
        outsider=addresses[4],
    )


# ---- stake -------------------------------------------------------------------------------


def test_constructor_stores_parameters(registry: Registry) -> None:
    functions = registry.contract.functions
    assert functions.minStake().call() == MIN_STAKE
    assert functions.unbondingDelay().call() == UNBONDING_DELAY_S
    assert functions.arbiter().call() == registry.arbiter


def test_stake_accumulates(registry: Registry) -> None:
    functions = registry.contract.functions
    wallet_before = registry.balance(registry.worker)

    first = registry.send(functions.stake(), registry.worker, value=ETH // 2)
    second = registry.send(functions.stake(), registry.worker, value=ETH // 2 + 1)

    assert registry.events("Staked", first) == [
        {"worker": registry.worker, "amount": ETH // 2, "total": ETH // 2}
    ]
    assert registry.events("Staked", second) == [
        {"worker": registry.worker, "amount": ETH // 2 + 1, "total": ETH + 1}
    ]
    assert functions.stakeOf(registry.worker).call() == ETH + 1
    assert registry.balance(registry.contract.address) == ETH + 1
    gas = gas_cost_wei(first) + gas_cost_wei(second)
    assert registry.balance(registry.worker) == wallet_before - ETH - 1 - gas


def test_zero_stake_is_rejected(registry: Registry) -> None:
    assert registry.error(registry.contract.functions.stake(), registry.worker) == ("ZeroAmount",)


# ---- unbond / withdraw -------------------------------------------------------------------


def test_unbond_moves_stake_aside_and_restarts_the_clock(registry: Registry) -> None:
    functions = registry.contract.functions
    registry.send(functions.stake(), registry.worker, value=3 * ETH)

    first = registry.send(functions.unbond(ETH), registry.worker)
    ready_at = registry.block_time(first) + UNBONDING_DELAY_S
    assert registry.events("UnbondingStarted", first) == [
        {"worker": registry.worker, "amount": ETH, "readyAt": ready_at}
    ]
    assert functions.stakeOf(registry.worker).call() == 2 * ETH
    assert functions.unbondingOf(registry.worker).call() == [ETH, ready_at]

    advance_time(registry.w3, 3600)
    second = registry.send(functions.unbond(ETH // 2), registry.worker)
    later_ready_at = registry.block_time(second) + UNBONDING_DELAY_S
    assert later_ready_at > ready_at
    # The event carries this call's amount; the view shows the pending total and new clock.
    assert registry.events("UnbondingStarted", second) == [
        {"worker": registry.worker, "amount": ETH // 2, "readyAt": later_ready_at}
    ]
    assert functions.unbondingOf(registry.worker).call() == [ETH + ETH // 2, later_ready_at]
    assert functions.stakeOf(registry.worker).call() == ETH + ETH // 2


def test_unbond_more_than_the_stake_or_nothing_is_rejected(registry: Registry) -> None:
    functions = registry.contract.functions
    registry.send(functions.stake(), registry.worker, value=ETH)
    assert registry.error(functions.unbond(ETH + 1), registry.worker) == (
        "InsufficientStake",
        ETH,
        ETH + 1,
    )
    assert registry.error(functions.unbond(0), registry.worker) == ("ZeroAmount",)


def test_withdraw_waits_for_the_unbonding_delay(registry: Registry) -> None:
    functions = registry.contract.functions
    assert registry.error(functions.withdraw(), registry.worker) == ("NothingToWithdraw",)
    registry.send(functions.stake(), registry.worker, value=2 * ETH)
    receipt = registry.send(functions.unbond(ETH + 5), registry.worker)
    ready_at = registry.block_time(receipt) + UNBONDING_DELAY_S

    assert registry.error(functions.withdraw(), registry.worker) == ("StillUnbonding", ready_at)
    advance_time(registry.w3, UNBONDING_DELAY_S - 10)
    assert registry.error(functions.withdraw(), registry.worker) == ("StillUnbonding", ready_at)

    advance_time(registry.w3, 10)
    wallet_before = registry.balance(registry.worker)
    receipt = registry.send(functions.withdraw(), registry.worker)

    assert registry.balance(registry.worker) == wallet_before + ETH + 5 - gas_cost_wei(receipt)
    assert registry.events("Withdrawn", receipt) == [{"worker": registry.worker, "amount": ETH + 5}]
    assert functions.unbondingOf(registry.worker).call() == [0, 0]
    assert functions.stakeOf(registry.worker).call() == ETH - 5
    assert registry.balance(registry.contract.address) == ETH - 5
    assert registry.error(functions.withdraw(), registry.worker) == ("NothingToWithdraw",)


def test_failed_payout_reverts_the_withdrawal(registry: Registry) -> None:
    functions = registry.contract.functions
    registry.send(functions.stake(), registry.worker, value=ETH)
    registry.send(functions.unbond(ETH), registry.worker)
    advance_time(registry.w3, UNBONDING_DELAY_S)
    # The worker's address now runs code that rejects ETH (PUSH0 PUSH0 REVERT);
    # anvil still lets it send transactions.
    registry.w3.provider.make_request("anvil_setCode", [registry.worker, "0x5f5ffd"])  # type: ignore[arg-type]
    assert registry.error(functions.withdraw(), registry.worker) == ("TransferFailed",)
    assert functions.unbondingOf(registry.worker).call()[0] == ETH


# ---- eligibility -------------------------------------------------------------------------


def test_eligibility_follows_stake_unbonding_and_slashing(registry: Registry) -> None:
    functions = registry.contract.functions
    assert not registry.eligible(registry.worker)  # never staked

    registry.send(functions.stake(), registry.worker, value=MIN_STAKE - 1)
    assert not registry.eligible(registry.worker)  # below the minimum
    registry.send(functions.stake(), registry.worker, value=1)
    assert registry.eligible(registry.worker)

    registry.send(functions.stake(), registry.worker, value=ETH)
    registry.send(functions.unbond(1), registry.worker)
    assert not registry.eligible(registry.worker)  # on its way out, though above the minimum
    advance_time(registry.w3, UNBONDING_DELAY_S)
    registry.send(functions.withdraw(), registry.worker)
    assert registry.eligible(registry.worker)

    registry.send(functions.slash(registry.worker, 1, EVIDENCE), registry.arbiter)
    assert functions.isSlashed(registry.worker).call()
    assert functions.stakeOf(registry.worker).call() == 2 * ETH - 2
    assert not registry.eligible(registry.worker)  # slashed for good, stake or not
    registry.send(functions.stake(), registry.worker, value=ETH)
    assert not registry.eligible(registry.worker)


# ---- slash -------------------------------------------------------------------------------


def test_only_the_arbiter_may_slash(registry: Registry) -> None:
    functions = registry.contract.functions
    registry.send(functions.stake(), registry.worker, value=ETH)
    slash = functions.slash(registry.worker, ETH, EVIDENCE)
    assert registry.error(slash, registry.outsider) == ("NotArbiter",)
    assert registry.error(slash, registry.worker) == ("NotArbiter",)
    assert functions.stakeOf(registry.worker).call() == ETH
    assert not functions.isSlashed(registry.worker).call()


def test_slash_takes_active_stake_first_and_pays_the_arbiter(registry: Registry) -> None:
    functions = registry.contract.functions
    registry.send(functions.stake(), registry.worker, value=3 * ETH)
    receipt = registry.send(functions.unbond(ETH), registry.worker)
    ready_at = registry.block_time(receipt) + UNBONDING_DELAY_S
    arbiter_before = registry.balance(registry.arbiter)

    receipt = registry.send(functions.slash(registry.worker, ETH, EVIDENCE), registry.arbiter)

    assert registry.events("Slashed", receipt) == [
        {"worker": registry.worker, "amount": ETH, "evidenceHash": EVIDENCE}
    ]
    assert registry.balance(registry.arbiter) == arbiter_before + ETH - gas_cost_wei(receipt)
    assert functions.stakeOf(registry.worker).call() == ETH
    assert functions.unbondingOf(registry.worker).call() == [ETH, ready_at]
    assert registry.balance(registry.contract.address) == 2 * ETH


def test_slash_reaches_unbonding_funds(registry: Registry) -> None:
    functions = registry.contract.functions
    registry.send(functions.stake(), registry.worker, value=2 * ETH)
    receipt = registry.send(functions.unbond(2 * ETH - 7), registry.worker)
    ready_at = registry.block_time(receipt) + UNBONDING_DELAY_S

    # 7 wei from the active stake, the other ETH - 7 from what is unbonding.
    registry.send(functions.slash(registry.worker, ETH, EVIDENCE), registry.arbiter)
    assert functions.stakeOf(registry.worker).call() == 0
    assert functions.unbondingOf(registry.worker).call() == [ETH, ready_at]

    # The cheater only gets back what the slash left.
    advance_time(registry.w3, UNBONDING_DELAY_S)
    wallet_before = registry.balance(registry.worker)
    receipt = registry.send(functions.withdraw(), registry.worker)
    assert registry.balance(registry.worker) == wallet_before + ETH - gas_cost_wei(receipt)


def test_slash_is_capped_at_what_the_worker_has(registry: Registry) -> None:
    functions = registry.contract.functions
    registry.send(functions.stake(), registry.worker, value=2 * ETH)
    registry.send(functions.unbond(ETH), registry.worker)
    arbiter_before = registry.balance(registry.arbiter)

    receipt = registry.send(functions.slash(registry.worker, 10 * ETH, EVIDENCE), registry.arbiter)

    assert registry.events("Slashed", receipt) == [
        {"worker": registry.worker, "amount": 2 * ETH, "evidenceHash": EVIDENCE}
    ]
    assert registry.balance(registry.arbiter) == arbiter_before + 2 * ETH - gas_cost_wei(receipt)
    assert functions.stakeOf(registry.worker).call() == 0
    assert functions.unbondingOf(registry.worker).call() == [0, 0]
    assert registry.balance(registry.contract.address) == 0
    slash_again = functions.slash(registry.worker, ETH, EVIDENCE)
    assert registry.error(slash_again, registry.arbiter) == ("NothingToSlash",)


def test_slashing_a_worker_with_nothing_or_zero_is_rejected(registry: Registry) -> None:
    functions = registry.contract.functions
    nothing = functions.slash(registry.worker_b, ETH, EVIDENCE)
    assert registry.error(nothing, registry.arbiter) == ("NothingToSlash",)
    assert not functions.isSlashed(registry.worker_b).call()

    registry.send(functions.stake(), registry.worker, value=ETH)
    zero = functions.slash(registry.worker, 0, EVIDENCE)
    assert registry.error(zero, registry.arbiter) == ("ZeroAmount",)
    assert not functions.isSlashed(registry.worker).call()


def test_errors_decode_with_their_arguments() -> None:
    """Guards the helper the tests rely on against a silently wrong selector table."""
    abi = json.loads((ARTIFACTS_DIR / "WorkerRegistry.json").read_text())["abi"]
    data = "0x" + keccak(text="InsufficientStake(uint256,uint256)")[:4].hex() + f"{5:064x}{9:064x}"
    assert decode_error(abi, data) == ("InsufficientStake", 5, 9)
    with pytest.raises(AssertionError, match="matches no error"):
        decode_error(abi, "0xdeadbeef")


def test_the_same_evidence_slashes_once(registry: Registry) -> None:
    """A retried slash (the arbiter resends after a crash) must not take the stake twice."""
    functions = registry.contract.functions
    registry.send(functions.stake(), registry.worker, value=3 * ETH)
    assert functions.evidenceUsed(EVIDENCE).call() is False
    registry.send(functions.slash(registry.worker, ETH, EVIDENCE), registry.arbiter)
    assert functions.evidenceUsed(EVIDENCE).call() is True
    assert registry.error(functions.slash(registry.worker, ETH, EVIDENCE), registry.arbiter) == (
        "EvidenceUsed",
        EVIDENCE,
    )
    assert functions.stakeOf(registry.worker).call() == 2 * ETH
