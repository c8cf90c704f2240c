"""Deploy PaymentBroker and WorkerRegistry to any JSON-RPC endpoint; read and write the
deployment file that the orchestrator and workers load.

    GPUMARKET_DEPLOYER_KEY=0x... python -m contracts.deploy --rpc-url URL --out deployment.json
    python -m contracts.deploy --rpc-url http://127.0.0.1:8545 --dev --out deployment.json

``--dev`` signs with anvil's first well-known key and is refused on any chain but the local
dev chain (id 31337). The file is JSON; ``min_stake_wei`` is a decimal string, like every
amount of wei on the wire.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from contracts.abi import ARTIFACTS_DIR, PAYMENT_BROKER, WORKER_REGISTRY, load_artifact
from contracts.anvil import DEV_CHAIN_ID, DEV_PRIVATE_KEYS
from contracts.broker import PaymentBroker
from contracts.chain import Chain, ChainError
from contracts.registry import WorkerRegistry
from protocol.units import Wei
from protocol.vouchers import MAX_UINT64, MAX_UINT256, ChecksumAddressStr

DEFAULT_FEE_BPS = 100
"""1 % of each redeemed delta to the fee recipient."""
DEFAULT_WITHDRAW_DELAY_S = 86_400
"""A payer's deposit can leave one day after unlock: time for payees to redeem."""
DEFAULT_MIN_STAKE_WEI = 10**17
"""0.1 ETH of active stake to be eligible for jobs."""
DEFAULT_UNBONDING_DELAY_S = 7 * 86_400
"""Stake leaves a week after unbond: longer than the verification window."""
MAX_FEE_BPS = 10_000
DEPLOYER_KEY_ENV = "GPUMARKET_DEPLOYER_KEY"


class Deployment(BaseModel):
    """Where the contracts live and how they were configured. Delays in seconds, stake in wei;
    ``deployed_at_block`` is where event scans start."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chain_id: int = Field(ge=1)
    rpc_url: str
    payment_broker: ChecksumAddressStr
    worker_registry: ChecksumAddressStr
    deployed_at_block: int = Field(ge=0)
    fee_recipient: ChecksumAddressStr
    fee_bps: int = Field(ge=0, le=MAX_FEE_BPS)
    withdraw_delay_s: int = Field(ge=0, le=MAX_UINT64)
    min_stake_wei: Wei = Field(ge=0, le=MAX_UINT256)
    unbonding_delay_s: int = Field(ge=0, le=MAX_UINT64)
    arbiter: ChecksumAddressStr


def deploy(
    chain: Chain,
    *,
    fee_recipient: str | None = None,
    fee_bps: int = DEFAULT_FEE_BPS,
    withdraw_delay_s: int = DEFAULT_WITHDRAW_DELAY_S,
    min_stake_wei: int = DEFAULT_MIN_STAKE_WEI,
    unbonding_delay_s: int = DEFAULT_UNBONDING_DELAY_S,
    arbiter: str | None = None,
    rpc_url: str | None = None,
    artifacts_dir: Path = ARTIFACTS_DIR,
) -> Deployment:
    """Deploy both contracts from ``chain``'s key (the fee recipient and the arbiter default
    to it) and return the deployment. ``rpc_url`` defaults to the chain's own endpoint."""
    fee_recipient = fee_recipient or chain.address
    arbiter = arbiter or chain.address
    url = rpc_url or chain.rpc_url
    if url is None:
        raise ValueError("the chain's provider has no endpoint URL; pass rpc_url")
    _check_range("fee_bps", fee_bps, MAX_FEE_BPS)
    _check_range("withdraw_delay_s", withdraw_delay_s, MAX_UINT64)
    _check_range("min_stake_wei", min_stake_wei, MAX_UINT256)
    _check_range("unbonding_delay_s", unbonding_delay_s, MAX_UINT64)
    broker_artifact = load_artifact(PAYMENT_BROKER, artifacts_dir)
    registry_artifact = load_artifact(WORKER_REGISTRY, artifacts_dir)
    # Both creations go out before either is waited for: one round of mining, not two.
    broker_tx = chain.deploy(broker_artifact, fee_recipient, fee_bps, withdraw_delay_s)
    registry_tx = chain.deploy(registry_artifact, min_stake_wei, unbonding_delay_s, arbiter)
    broker_receipt = chain.wait(broker_tx)
    registry_receipt = chain.wait(registry_tx)
    return Deployment(
        chain_id=chain.chain_id,
        rpc_url=url,
        payment_broker=str(broker_receipt["contractAddress"]),
        worker_registry=str(registry_receipt["contractAddress"]),
        deployed_at_block=min(
            int(broker_receipt["blockNumber"]), int(registry_receipt["blockNumber"])
        ),
        fee_recipient=fee_recipient,
        fee_bps=fee_bps,
        withdraw_delay_s=withdraw_delay_s,
        min_stake_wei=min_stake_wei,
        unbonding_delay_s=unbonding_delay_s,
        arbiter=arbiter,
    )


def _check_range(name: str, value: int, maximum: int) -> None:
    """Refuse before spending gas what the contract would refuse or truncate."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise ValueError(f"{name} must be an integer in [0, {maximum}], got {value!r}")


def write_deployment(deployment: Deployment, path: Path) -> None:
    """Write ``deployment`` as JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = deployment.model_dump_json(indent=2) + "\n"
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as handle:
        handle.write(text)
        tmp = Path(handle.name)
    os.replace(tmp, path)


def read_deployment(path: Path) -> Deployment:
    """The deployment in ``path``; pydantic's ValidationError names any bad field."""
    return Deployment.model_validate_json(path.read_text(encoding="utf-8"))


def check_deployment(chain: Chain, deployment: Deployment) -> None:
    """ChainError unless ``chain`` is the deployment's chain, both contracts have code there,
    and their immutable settings equal the file's."""
    if chain.chain_id != deployment.chain_id:
        raise ChainError(
            f"the RPC serves chain {chain.chain_id}; the deployment is for chain "
            f"{deployment.chain_id}"
        )
    for name, address in (
        (PAYMENT_BROKER, deployment.payment_broker),
        (WORKER_REGISTRY, deployment.worker_registry),
    ):
        if not chain.code_at(address):
            raise ChainError(f"no contract code at {address} ({name}) on chain {chain.chain_id}")
    broker = PaymentBroker(chain, deployment.payment_broker)
    registry = WorkerRegistry(chain, deployment.worker_registry)
    on_chain = {
        "fee_recipient": broker.fee_recipient(),
        "fee_bps": broker.fee_bps(),
        "withdraw_delay_s": broker.withdraw_delay_s(),
        "min_stake_wei": registry.min_stake_wei(),
        "unbonding_delay_s": registry.unbonding_delay_s(),
        "arbiter": registry.arbiter(),
    }
    differing = {
        key: (getattr(deployment, key), value)
        for key, value in on_chain.items()
        if getattr(deployment, key) != value
    }
    if differing:
        shown = ", ".join(f"{key}: file {a!r}, chain {b!r}" for key, (a, b) in differing.items())
        raise ChainError(f"the deployment file disagrees with the contracts: {shown}")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m contracts.deploy", description=__doc__)
    parser.add_argument("--rpc-url", required=True)
    parser.add_argument("--out", type=Path, required=True, help="deployment JSON to write")
    parser.add_argument("--dev", action="store_true", help="anvil's dev key (chain 31337 only)")
    parser.add_argument("--fee-recipient")
    parser.add_argument("--fee-bps", type=int, default=DEFAULT_FEE_BPS)
    parser.add_argument("--withdraw-delay-s", type=int, default=DEFAULT_WITHDRAW_DELAY_S)
    parser.add_argument("--min-stake-wei", type=int, default=DEFAULT_MIN_STAKE_WEI)
    parser.add_argument("--unbonding-delay-s", type=int, default=DEFAULT_UNBONDING_DELAY_S)
    parser.add_argument("--arbiter")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    key = DEV_PRIVATE_KEYS[0] if args.dev else os.environ.get(DEPLOYER_KEY_ENV)
    if not key:
        print(f"set {DEPLOYER_KEY_ENV} to the deployer's private key, or pass --dev for anvil")
        return 2
    chain = Chain.connect(args.rpc_url, key)
    if args.dev and chain.chain_id != DEV_CHAIN_ID:
        print(f"--dev is for the local dev chain ({DEV_CHAIN_ID}); this is {chain.chain_id}")
        return 2
    deployment = deploy(
        chain,
        fee_recipient=args.fee_recipient,
        fee_bps=args.fee_bps,
        withdraw_delay_s=args.withdraw_delay_s,
        min_stake_wei=args.min_stake_wei,
        unbonding_delay_s=args.unbonding_delay_s,
        arbiter=args.arbiter,
        rpc_url=args.rpc_url,
    )
    write_deployment(deployment, args.out)
    print(
        f"PaymentBroker {deployment.payment_broker}, WorkerRegistry "
        f"{deployment.worker_registry} on chain {deployment.chain_id}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
