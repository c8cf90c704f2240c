"""A real anvil chain on loopback for contract and binding tests."""

from __future__ import annotations

from collections.abc import Iterator

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
    """A web3 connection whose chain state is rolled back after the test (evm_snapshot)."""
    web3 = Web3(Web3.HTTPProvider(anvil.url, request_kwargs={"timeout": 10}))
    snapshot = web3.provider.make_request("evm_snapshot", [])["result"]  # type: ignore[arg-type]
    yield web3
    web3.provider.make_request("evm_revert", [snapshot])  # type: ignore[arg-type]


@pytest.fixture
def dev_keys() -> tuple[str, ...]:
    """anvil's funded dev accounts (10,000 ETH each): 0 deployer, then others as needed."""
    return DEV_PRIVATE_KEYS
