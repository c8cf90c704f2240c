"""``gpumarket chain up``: anvil on loopback, the contracts deployed, kept running.

With ``--state FILE`` anvil writes the whole chain to FILE every ``--state-interval`` seconds
and when it stops cleanly (SIGTERM, Ctrl-C), and loads it when it starts. So a hard kill
(SIGKILL, out of memory, a crash) loses only the blocks mined since the last write: when
anvil dies on its own, this wrapper starts it again from FILE on the same port and says how
far the chain went back. Without ``--state`` a dead anvil takes the chain with it: the wrapper
says so and exits 1. It never exits 0 unless asked to stop.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from contracts.anvil import Anvil
    from contracts.chain import Chain
    from contracts.deploy import Deployment

DEFAULT_STATE_INTERVAL_S = 1
"""Seconds between anvil's writes of ``--state``: what a SIGKILL can lose at most. anvil
rewrites the whole file each time, so a long-lived chain may want a longer interval."""
MIN_UPTIME_S = 10.0
MAX_QUICK_DEATHS = 3
"""After this many deaths in a row, each sooner than ``MIN_UPTIME_S`` after its (re)start,
anvil is not started again: it is in a crash loop, so the wrapper stops and says why."""
STATE_WRITE_WAIT_S = 5.0
"""After a fresh deployment, how long past one interval to wait for anvil to write the state
file, so that the contracts are in it before anyone is told where they are."""
READY_LINE = "Ctrl-C stops the chain"


class ChainUpFailed(RuntimeError):
    """The chain cannot go on; the message says why and what to do."""


def run(
    console: Console,
    *,
    port: int,
    deployment_path: Path,
    state: Path | None,
    state_interval_s: int,
) -> None:
    """Start anvil, deploy (or reuse a kept deployment) and keep anvil running until
    KeyboardInterrupt; ChainUpFailed when it dies and cannot be brought back."""
    from contracts.anvil import DEV_CHAIN_ID, DEV_PRIVATE_KEYS
    from contracts.chain import Chain

    node = _anvil(port, state, state_interval_s).start()
    try:
        chain = Chain.connect(node.url, DEV_PRIVATE_KEYS[0])  # anvil's dev key, dev chain only
        if chain.chain_id != DEV_CHAIN_ID:
            raise ChainUpFailed(f"chain id {chain.chain_id} is not anvil's {DEV_CHAIN_ID}")
        deployed = _deploy_or_reuse(console, chain, deployment_path, state, state_interval_s)
        console.print(f"anvil on {node.url} (chain id {deployed.chain_id})")
        console.print(f"PaymentBroker  {deployed.payment_broker}")
        console.print(f"WorkerRegistry {deployed.worker_registry}")
        console.print(f"deployment file {deployment_path.resolve()}; {READY_LINE}")
        quick_deaths = 0
        while True:
            started = time.monotonic()
            assert node.proc is not None
            code = node.proc.wait()
            quick = time.monotonic() - started < MIN_UPTIME_S
            quick_deaths = quick_deaths + 1 if quick else 0
            node = _after_death(console, node, code, quick_deaths, deployed)
    finally:
        node.stop()


def _anvil(port: int, state: Path | None, state_interval_s: int) -> Anvil:
    from contracts.anvil import Anvil

    # anvil's own errors (an unreadable state file, a port in use) go to our stderr.
    return Anvil(
        port,
        state_file=state,
        state_interval_s=state_interval_s if state is not None else None,
        log=sys.stderr.buffer,
    )


def _deploy_or_reuse(
    console: Console,
    chain: Chain,
    deployment_path: Path,
    state: Path | None,
    state_interval_s: int,
) -> Deployment:
    from contracts.deploy import deploy, write_deployment

    reused = _reusable_deployment(console, chain, deployment_path) if state else None
    if reused is not None:
        return reused
    deployed_at_ns = time.time_ns()
    deployed = deploy(chain)
    deployment_path.parent.mkdir(parents=True, exist_ok=True)
    write_deployment(deployed, deployment_path)
    if state is not None and not _state_written_since(
        state, deployed_at_ns, state_interval_s + STATE_WRITE_WAIT_S
    ):
        console.print(
            f"anvil has not written {state} since the deployment: a hard kill now would lose "
            "the contracts"
        )
    return deployed


def _reusable_deployment(console: Console, chain: Chain, path: Path) -> Deployment | None:
    """With a kept chain state, the contracts from last time are still there: reuse them."""
    from contracts.chain import ChainError
    from contracts.deploy import check_deployment, read_deployment

    if not path.exists():
        return None
    try:
        found = read_deployment(path)
        check_deployment(chain, found)
    except (ChainError, ValueError) as exc:
        console.print(f"not reusing {path}: {exc}")
        return None
    return found


def _state_written_since(state: Path, since_ns: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if state.exists() and state.stat().st_mtime_ns > since_ns:
            return True
        time.sleep(0.1)
    return False


def _after_death(
    console: Console, node: Anvil, code: int, quick_deaths: int, deployed: Deployment
) -> Anvil:
    """anvil exited without being asked to: start it again from its state file, or raise
    ChainUpFailed saying why it cannot be."""
    from contracts.chain import Chain, ChainError
    from contracts.deploy import check_deployment

    state = node.state_file
    if state is None:
        raise ChainUpFailed(
            f"anvil exited with code {code} and the chain went with it (it ran without "
            "--state, so nothing was kept); start the chain again, with --state FILE to keep "
            "it across a crash"
        )
    if quick_deaths >= MAX_QUICK_DEATHS:
        raise ChainUpFailed(
            f"anvil exited with code {code}: {quick_deaths} times in a row it died within "
            f"{MIN_UPTIME_S:.0f} s of starting, so it is not started again; see its messages "
            f"above; {state} holds the chain as last written"
        )
    console.print(f"anvil exited with code {code}; starting it again from {state}")
    again = _anvil(node.port, state, node.state_interval_s or DEFAULT_STATE_INTERVAL_S)
    try:
        again.start()
    except (RuntimeError, TimeoutError) as exc:
        raise ChainUpFailed(
            f"anvil did not start again from {state}: {exc}; a kill while anvil was writing "
            "the file leaves it unreadable: move it aside to start an empty chain"
        ) from exc
    chain = Chain.connect(again.url)
    try:
        check_deployment(chain, deployed)
    except ChainError as exc:
        again.stop()
        raise ChainUpFailed(
            f"the chain restored from {state} does not hold the contracts ({exc}): anvil died "
            "before it first wrote them; start the chain again to deploy afresh"
        ) from exc
    console.print(
        f"anvil is back on {again.url} at block {chain.block_number()}; blocks mined after "
        f"its last write of {state} (at most {again.state_interval_s} s) are lost and their "
        "transactions must be sent again"
    )
    return again
