"""A real anvil chain on loopback for contract and binding tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from web3 import Web3

from contracts.anvil import DEV_PRIVATE_KEYS, Anvil, AnvilNotInstalled, anvil_binary


@pytest.fixture(scope="session")
def anvil() -> Iterator[Anvil]:
    """One anvil for the session; ``w3`` rolls each test's changes back."""
    try:
        anvil_binary()
    except AnvilNotInstalled as exc:
        pytest.fail(f"{exc} (make install does this)")
    with Anvil() as node:
        yield node


@pytest.fixture
def w3(anvil: Anvil) -> Iterator[Web3]:
    """A web3 connection whose chain state is rolled back after the test (evm_snapshot).

    anvil's ``evm_revert`` restores the blocks and the state but not the base fee of the next
    block: that keeps falling with every block any test mined, down to its floor (7 wei), where
    fees stop changing and a transaction sent again after a rollback is the very same
    transaction (same hash). The next base fee is restored too, so that each test starts from
    the chain the session started with, whatever ran before it."""
    web3 = Web3(Web3.HTTPProvider(anvil.url, request_kwargs={"timeout": 10}))
    next_base_fee = int(web3.eth.get_block("pending")["baseFeePerGas"])
    snapshot = _rpc(web3, "evm_snapshot")
    yield web3
    assert _rpc(web3, "evm_revert", snapshot), f"anvil has no snapshot {snapshot}"
    _rpc(web3, "anvil_setNextBlockBaseFeePerGas", hex(next_base_fee))


def _rpc(web3: Web3, method: str, *params: Any) -> Any:
    response = web3.provider.make_request(method, list(params))  # type: ignore[arg-type]
    if "error" in response:
        raise RuntimeError(f"anvil {method}{params}: {response['error']}")
    return response["result"]


@pytest.fixture
def dev_keys() -> tuple[str, ...]:
    """anvil's funded dev accounts (10,000 ETH each): 0 deployer, then others as needed."""
    return DEV_PRIVATE_KEYS
