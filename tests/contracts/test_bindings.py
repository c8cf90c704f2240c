"""The web3 bindings against a real anvil: deployment, broker, registry, events, errors.

Roles (anvil dev keys): 0 deployer, 1 payer (client), 2 orchestrator (voucher signer),
3 worker (payee), 7 deployer of the known-vector broker, 8 arbiter, 9 fee recipient.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_utils import keccak
from web3 import Web3

from contracts.anvil import Anvil, free_port
from contracts.broker import PaymentBroker
from contracts.chain import (
    Chain,
    ChainError,
    ContractRevert,
    InsufficientFundsForGas,
)
from contracts.deploy import (
    Deployment,
    check_deployment,
    deploy,
    read_deployment,
    write_deployment,
)
from contracts.deploy import main as deploy_main
from contracts.events import Authorized, Deposited, EventReader, Redeemed, Slashed, Staked
from contracts.registry import WorkerRegistry
from protocol.vouchers import Voucher, sign_voucher, voucher_digest, voucher_domain_separator
from tests.unit.test_vouchers import (
    VECTOR_BROKER,
    VECTOR_DEPLOYER_KEY,
    VECTOR_DIGEST,
    VECTOR_DOMAIN_SEPARATOR,
    VECTOR_VOUCHER,
)

ETH = 10**18
FEE_BPS = 250
WITHDRAW_DELAY_S = 3_600
MIN_STAKE_WEI = ETH
UNBONDING_DELAY_S = 600
VOUCHER_TTL_S = 86_400


@dataclass
class Market:
    chain: Chain
    deployment: Deployment
    broker: PaymentBroker  # sends from the deployer
    payer: PaymentBroker  # sends from the payer
    worker: PaymentBroker  # sends from the worker (payee)
    registry: WorkerRegistry  # sends from the worker
    arbiter: WorkerRegistry  # sends from the arbiter
    payer_address: str
    signer_key: str
    signer_address: str
    worker_address: str
    fee_recipient: str

    def voucher(self, cumulative_wei: int, payee: str | None = None) -> Voucher:
        expiry = int(self.chain.w3.eth.get_block("latest")["timestamp"]) + VOUCHER_TTL_S
        return Voucher(
            payer=self.payer_address,
            payee=payee or self.worker_address,
            cumulative_amount=cumulative_wei,
            expiry=expiry,
        )

    def sign(self, voucher: Voucher, key: str | None = None) -> str:
        return sign_voucher(
            key or self.signer_key, voucher, self.chain.chain_id, self.broker.address
        )


@pytest.fixture
def chain(w3: Web3, dev_keys: tuple[str, ...]) -> Chain:
    return Chain(w3, Account.from_key(dev_keys[0]))


@pytest.fixture
def market(chain: Chain, dev_keys: tuple[str, ...]) -> Market:
    address = {i: Account.from_key(dev_keys[i]).address for i in (1, 2, 3, 8, 9)}
    deployment = deploy(
        chain,
        fee_recipient=address[9],
        fee_bps=FEE_BPS,
        withdraw_delay_s=WITHDRAW_DELAY_S,
        min_stake_wei=MIN_STAKE_WEI,
        unbonding_delay_s=UNBONDING_DELAY_S,
        arbiter=address[8],
    )
    broker = PaymentBroker(chain, deployment.payment_broker)
    registry = WorkerRegistry(chain, deployment.worker_registry)
    return Market(
        chain=chain,
        deployment=deployment,
        broker=broker,
        payer=broker.with_chain(chain.with_key(dev_keys[1])),
        worker=broker.with_chain(chain.with_key(dev_keys[3])),
        registry=registry.with_chain(chain.with_key(dev_keys[3])),
        arbiter=registry.with_chain(chain.with_key(dev_keys[8])),
        payer_address=address[1],
        signer_key=dev_keys[2],
        signer_address=address[2],
        worker_address=address[3],
        fee_recipient=address[9],
    )


@pytest.fixture
def funded(market: Market) -> Market:
    """The payer has deposited 10 ETH and authorised the orchestrator for 5 ETH."""
    market.payer.deposit(10 * ETH)
    market.payer.authorize(market.signer_address, 5 * ETH)
    return market


def rpc(chain: Chain, method: str, *params: Any) -> Any:
    return chain.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]


@pytest.fixture
def no_automine(chain: Chain) -> Iterator[None]:
    rpc(chain, "evm_setAutomine", False)
    try:
        yield
    finally:
        rpc(chain, "evm_setAutomine", True)


# --- deployment --------------------------------------------------------------------------


def test_deploy_writes_and_reads_the_deployment_file(market: Market, tmp_path: Path) -> None:
    deployment = market.deployment
    assert deployment.chain_id == 31337
    assert deployment.rpc_url == market.chain.rpc_url
    assert (deployment.fee_bps, deployment.fee_recipient) == (FEE_BPS, market.fee_recipient)
    assert deployment.min_stake_wei == MIN_STAKE_WEI
    path = tmp_path / "deploy" / "deployment.json"
    write_deployment(deployment, path)
    raw = json.loads(path.read_text())
    assert set(raw) == {
        "chain_id",
        "rpc_url",
        "payment_broker",
        "worker_registry",
        "deployed_at_block",
        "fee_recipient",
        "fee_bps",
        "withdraw_delay_s",
        "min_stake_wei",
        "unbonding_delay_s",
        "arbiter",
    }
    assert raw["min_stake_wei"] == str(MIN_STAKE_WEI)
    assert read_deployment(path) == deployment
    check_deployment(market.chain, read_deployment(path))


def test_check_deployment_refuses_a_file_that_disagrees_with_the_chain(market: Market) -> None:
    with pytest.raises(ChainError, match="fee_bps: file 1, chain 250"):
        check_deployment(market.chain, market.deployment.model_copy(update={"fee_bps": 1}))
    with pytest.raises(ChainError, match="no contract code"):
        check_deployment(
            market.chain,
            market.deployment.model_copy(update={"payment_broker": market.payer_address}),
        )


def test_cli_deploys_with_the_dev_key(anvil: Anvil, w3: Web3, tmp_path: Path) -> None:
    out = tmp_path / "deployment.json"
    assert deploy_main(["--rpc-url", anvil.url, "--dev", "--out", str(out), "--fee-bps", "7"]) == 0
    deployment = read_deployment(out)
    assert (deployment.rpc_url, deployment.fee_bps) == (anvil.url, 7)
    check_deployment(Chain(w3), deployment)


def test_connect_to_a_dead_endpoint_is_a_chain_error() -> None:
    with pytest.raises(ChainError, match="no JSON-RPC answer"):
        Chain.connect(f"http://127.0.0.1:{free_port()}", rpc_timeout_s=1.0)


# --- digest ------------------------------------------------------------------------------


def test_python_digest_equals_the_contracts(market: Market) -> None:
    voucher = market.voucher(123_456_789)
    chain_id, address = market.chain.chain_id, market.broker.address
    assert market.broker.domain_separator() == voucher_domain_separator(chain_id, address)
    assert market.broker.voucher_digest(voucher) == voucher_digest(voucher, chain_id, address)


def test_known_vector_matches_the_contract(chain: Chain) -> None:
    deployment = deploy(chain.with_key(VECTOR_DEPLOYER_KEY))
    assert deployment.payment_broker == VECTOR_BROKER
    broker = PaymentBroker(chain, VECTOR_BROKER)
    assert broker.domain_separator().hex() == VECTOR_DOMAIN_SEPARATOR
    assert broker.voucher_digest(VECTOR_VOUCHER).hex() == VECTOR_DIGEST


# --- redemption --------------------------------------------------------------------------


def test_deposit_authorize_redeem_round_trip(funded: Market) -> None:
    m = funded
    assert m.broker.balance_of(m.payer_address) == 10 * ETH
    assert m.broker.allowance(m.payer_address, m.signer_address).cap_wei == 5 * ETH
    fees = m.broker.fee_split()
    assert (fees.fee_recipient, fees.fee_bps) == (m.fee_recipient, FEE_BPS)
    worker_before = m.chain.balance_wei(m.worker_address)
    fee_before = m.chain.balance_wei(m.fee_recipient)

    first = m.voucher(ETH // 10 + 7)  # an odd amount: the fee rounds down
    result = m.worker.redeem(first, m.sign(first))
    delta = ETH // 10 + 7
    assert result.fee_wei == delta * FEE_BPS // 10_000 == fees.fee_wei(delta)
    assert result.paid_wei == delta - result.fee_wei == fees.payee_wei(delta)
    assert result.gas_used > 0 and result.block > m.deployment.deployed_at_block

    second = m.voucher(ETH // 4)
    again = m.broker.redeem(second, m.sign(second))  # anyone may submit; the deployer pays gas
    assert again.paid_wei + again.fee_wei == ETH // 4 - delta

    gas_cost = result.gas_used * _gas_price(m.chain, result.tx_hash)
    paid_total = result.paid_wei + again.paid_wei
    assert m.chain.balance_wei(m.worker_address) == worker_before + paid_total - gas_cost
    assert m.chain.balance_wei(m.fee_recipient) == fee_before + result.fee_wei + again.fee_wei
    assert m.broker.balance_of(m.payer_address) == 10 * ETH - ETH // 4
    assert m.broker.redeemed(m.payer_address, m.worker_address) == ETH // 4
    allowance = m.broker.allowance(m.payer_address, m.signer_address)
    assert (allowance.spent_wei, allowance.remaining_wei) == (ETH // 4, 5 * ETH - ETH // 4)


def test_replay_is_not_increasing(funded: Market) -> None:
    voucher = funded.voucher(ETH)
    signature = funded.sign(voucher)
    funded.worker.redeem(voucher, signature)
    with pytest.raises(ContractRevert) as caught:
        funded.worker.redeem(voucher, signature)
    assert caught.value.name == "NotIncreasing"
    assert caught.value.named_args == {"redeemed": ETH, "cumulative": ETH}
    # It crosses process boundaries (a worker pool) whole.
    assert str(pickle.loads(pickle.dumps(caught.value))) == str(caught.value)
    lower = funded.voucher(ETH - 1)
    with pytest.raises(ContractRevert, match=r"NotIncreasing\(redeemed=\d+, cumulative=\d+\)"):
        funded.worker.redeem(lower, funded.sign(lower))


def test_unauthorized_signer_names_the_recovered_address(
    funded: Market, dev_keys: tuple[str, ...]
) -> None:
    voucher = funded.voucher(ETH)
    with pytest.raises(ContractRevert) as caught:
        funded.worker.redeem(voucher, funded.sign(voucher, key=dev_keys[4]))
    assert caught.value.name == "UnauthorizedSigner"
    assert caught.value.error_args == (Account.from_key(dev_keys[4]).address,)


def test_over_cap(funded: Market) -> None:
    funded.payer.authorize(funded.signer_address, 100)
    rpc(funded.chain, "evm_increaseTime", WITHDRAW_DELAY_S + 1)  # a lower cap waits that long
    rpc(funded.chain, "evm_mine")
    voucher = funded.voucher(101)
    with pytest.raises(ContractRevert) as caught:
        funded.worker.redeem(voucher, funded.sign(voucher))
    assert (caught.value.name, caught.value.error_args) == ("OverCap", (100, 101))


def test_withdrawal_waits_for_the_unlock_delay(funded: Market) -> None:
    m = funded
    with pytest.raises(ContractRevert, match="NotUnlocked"):
        m.payer.withdraw(ETH)
    m.payer.unlock()
    unlock_at = m.broker.unlock_at(m.payer_address)
    assert unlock_at >= int(m.chain.w3.eth.get_block("latest")["timestamp"]) + WITHDRAW_DELAY_S
    with pytest.raises(ContractRevert) as caught:
        m.payer.withdraw(ETH)
    assert (caught.value.name, caught.value.error_args) == ("StillLocked", (unlock_at,))
    m.payer.relock()
    assert m.broker.unlock_at(m.payer_address) == 0

    m.payer.unlock()
    rpc(m.chain, "evm_increaseTime", WITHDRAW_DELAY_S + 1)
    rpc(m.chain, "evm_mine")  # gas is estimated on the latest block: move its clock too
    m.payer.withdraw(3 * ETH)
    assert m.broker.balance_of(m.payer_address) == 7 * ETH
    assert m.broker.unlock_at(m.payer_address) == 0  # each withdrawal consumes the unlock


def test_redeem_batch_pays_ten_vouchers_in_one_transaction(funded: Market) -> None:
    payees = [
        Account.from_key(keccak(text=f"gpumarket batch payee {i}")).address for i in range(10)
    ]
    vouchers = [funded.voucher(ETH // 100 * (i + 1), payee=p) for i, p in enumerate(payees)]
    result = funded.broker.redeem_batch(vouchers, [funded.sign(v) for v in vouchers])
    assert len(result.redemptions) == 10
    assert {event.tx_hash for event in result.redemptions} == {result.tx_hash}
    total = sum(v.cumulative_amount for v in vouchers)
    assert result.paid_wei + result.fee_wei == total
    for voucher, event in zip(vouchers, result.redemptions, strict=True):
        assert event.payee == voucher.payee
        assert funded.chain.balance_wei(voucher.payee) == event.paid_wei
    assert funded.broker.balance_of(funded.payer_address) == 10 * ETH - total


def test_redeem_batch_length_mismatch(funded: Market) -> None:
    voucher = funded.voucher(1)
    with pytest.raises(ContractRevert, match="LengthMismatch"):
        funded.broker.redeem_batch([voucher, voucher], [funded.sign(voucher)])


def test_a_transaction_that_fails_on_chain_is_decoded_by_replay(
    funded: Market, no_automine: None
) -> None:
    """Two redemptions of one voucher in one block: both estimate fine, the second fails."""
    voucher = funded.voucher(ETH)
    signature = bytes.fromhex(funded.sign(voucher)[2:])
    data = funded.broker.contract.encode_abi("redeem", args=[voucher.as_struct(), signature])
    errors = funded.broker.artifact.errors
    first = funded.chain.send(funded.broker.address, data, errors)
    second = funded.chain.send(funded.broker.address, data, errors)
    rpc(funded.chain, "evm_mine")
    assert funded.chain.wait(first)["status"] == 1
    with pytest.raises(ContractRevert) as caught:
        funded.chain.wait(second)
    assert caught.value.name == "NotIncreasing"
    assert caught.value.tx_hash == second.tx_hash


def test_concurrent_sends_from_one_key_get_distinct_nonces(funded: Market) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: funded.payer.deposit(1), range(16)))
    assert len({result.tx_hash for result in results}) == 16
    assert funded.broker.balance_of(funded.payer_address) == 10 * ETH + 16


# --- gas money ---------------------------------------------------------------------------


def test_unfunded_key_gets_insufficient_funds_for_gas(market: Market) -> None:
    poor = Account.from_key(keccak(text="gpumarket unfunded test key"))
    broker = market.broker.with_chain(market.chain.with_key(poor.key))
    with pytest.raises(InsufficientFundsForGas) as caught:
        broker.authorize(market.signer_address, ETH)
    error = caught.value
    assert (error.address, error.balance_wei) == (poor.address, 0)
    assert error.needed_wei > 0
    assert poor.address in str(error) and f"needs {error.needed_wei} wei" in str(error)
    # With a value the node refuses even to estimate; the error still names who and how much.
    with pytest.raises(InsufficientFundsForGas, match=poor.address) as caught:
        broker.deposit(ETH)
    assert caught.value.needed_wei > ETH


# --- events ------------------------------------------------------------------------------


def test_event_reader_returns_redeemed_with_exact_amounts(funded: Market) -> None:
    voucher = funded.voucher(ETH + 1)
    result = funded.worker.redeem(voucher, funded.sign(voucher))
    start = funded.deployment.deployed_at_block
    (event,) = funded.broker.events.read(Redeemed, start, payee=funded.worker_address)
    assert event == result.redemptions[0]
    assert (event.payer, event.payee, event.signer) == (
        funded.payer_address,
        funded.worker_address,
        funded.signer_address,
    )
    assert event.cumulative_amount_wei == ETH + 1
    assert event.fee_wei == (ETH + 1) * FEE_BPS // 10_000
    assert event.paid_wei == ETH + 1 - event.fee_wei
    assert (event.block_number, event.tx_hash) == (result.block, result.tx_hash)
    assert list(funded.broker.events.read(Redeemed, start, payee=funded.payer_address)) == []

    everything = list(funded.broker.events.read_all(start))
    assert [type(e) for e in everything] == [Deposited, Authorized, Redeemed]
    assert len({e.key for e in everything}) == 3
    # One block per page gives the same records: pagination loses and repeats nothing.
    paged = EventReader(
        funded.chain,
        funded.broker.address,
        funded.broker.artifact.abi,
        (Deposited, Authorized, Redeemed),
        page_blocks=1,
    )
    assert list(paged.read_all(start)) == everything


# --- registry ----------------------------------------------------------------------------


def test_eligibility_of_many_workers_is_one_batch_in_order(market: Market) -> None:
    worker = market.registry
    others = [Account.create().address for _ in range(3)]
    assert worker.eligible_many([]) == []
    assert worker.eligible_many([*others, market.worker_address]) == [False] * 4
    worker.stake(MIN_STAKE_WEI)
    asked = [others[0], market.worker_address.lower(), others[1]]
    assert worker.eligible_many(asked) == [False, True, False]
    assert worker.eligible_many(asked) == [worker.is_eligible(a) for a in asked]


def test_registry_stake_unbond_slash_round_trip(market: Market) -> None:
    worker, arbiter = market.registry, market.arbiter
    address = market.worker_address
    assert not worker.is_eligible(address)
    worker.stake(MIN_STAKE_WEI)
    assert worker.stake_of(address) == MIN_STAKE_WEI and worker.is_eligible(address)

    worker.stake(MIN_STAKE_WEI)
    worker.unbond(MIN_STAKE_WEI // 2)
    unbonding = worker.unbonding_of(address)
    assert unbonding.amount_wei == MIN_STAKE_WEI // 2
    assert unbonding.ready_at >= int(market.chain.w3.eth.get_block("latest")["timestamp"])
    assert not worker.is_eligible(address)  # on its way out
    with pytest.raises(ContractRevert) as caught:
        worker.withdraw()
    assert (caught.value.name, caught.value.error_args) == ("StillUnbonding", (unbonding.ready_at,))

    evidence = keccak(text="two conflicting signed results")
    with pytest.raises(ContractRevert, match="NotArbiter"):
        worker.slash(address, 1, evidence)
    # Slashing reaches unbonding funds too, and takes at most what the worker has.
    result = arbiter.slash(address, 3 * MIN_STAKE_WEI, evidence)
    assert result.slashed_wei == 2 * MIN_STAKE_WEI
    assert worker.is_slashed(address) and not worker.is_eligible(address)
    assert worker.stake_of(address) == 0 and worker.unbonding_of(address).amount_wei == 0
    with pytest.raises(ContractRevert, match="NothingToSlash"):
        arbiter.slash(address, 1, evidence)

    start = market.deployment.deployed_at_block
    (slashed,) = worker.events.read(Slashed, start, worker=address)
    assert (slashed.amount_wei, slashed.evidence_hash) == (result.slashed_wei, evidence)
    assert [e.total_wei for e in worker.events.read(Staked, start)] == [
        MIN_STAKE_WEI,
        2 * MIN_STAKE_WEI,
    ]


def _gas_price(chain: Chain, tx_hash: str) -> int:
    return int(chain.w3.eth.get_transaction_receipt(tx_hash)["effectiveGasPrice"])  # type: ignore[arg-type]
