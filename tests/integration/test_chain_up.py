"""`gpumarket chain up`: anvil from the npm install, contracts deployed, a deployment file that
a restart with kept state reuses; an anvil that dies is started again from its state file, or
the command exits non-zero saying the chain is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from eth_account import Account

from contracts.anvil import DEV_PRIVATE_KEYS, free_port
from contracts.broker import PaymentBroker
from contracts.chain import Chain
from contracts.deploy import check_deployment, read_deployment
from gpumarket.chain_up import MAX_QUICK_DEATHS

UP_TIMEOUT_S = 60.0
STATE_INTERVAL_S = 1
PAYER_KEY = DEV_PRIVATE_KEYS[2]  # anvil's dev key: dev chain only


def _chain_up(
    tmp_path: Path, port: int, log_name: str, *extra: str, state: bool = True
) -> subprocess.Popen[bytes]:
    kept = ["--state", str(tmp_path / "state.json")] if state else []
    with (tmp_path / log_name).open("wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpumarket.cli",
                "chain",
                "up",
                "--port",
                str(port),
                "--deployment",
                str(tmp_path / "deployment.json"),
                *kept,
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _anvil_child(wrapper: subprocess.Popen[bytes]) -> int:
    """The pid of the wrapper's anvil child (Linux /proc)."""
    children = Path(f"/proc/{wrapper.pid}/task/{wrapper.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def _wait_for_log(path: Path, text: str) -> None:
    deadline = time.monotonic() + UP_TIMEOUT_S
    while text not in path.read_text():
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.1)


def test_chain_up_deploys_and_a_restart_reuses_the_contracts(tmp_path: Path) -> None:
    port = free_port()
    first = _chain_up(tmp_path, port, "first.log")
    try:
        _wait_for_log(tmp_path / "first.log", "Ctrl-C stops the chain")
        deployment = read_deployment(tmp_path / "deployment.json")
        assert deployment.rpc_url == f"http://127.0.0.1:{port}"
        check_deployment(Chain.connect(deployment.rpc_url), deployment)  # code and settings
    finally:
        first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0

    second = _chain_up(tmp_path, port, "second.log")
    try:
        _wait_for_log(tmp_path / "second.log", "Ctrl-C stops the chain")
        again = read_deployment(tmp_path / "deployment.json")
        assert again == deployment  # same addresses: the kept state still holds the contracts
        check_deployment(Chain.connect(again.rpc_url), again)
    finally:
        second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0


def test_a_killed_anvil_is_started_again_from_its_state_file(tmp_path: Path) -> None:
    """SIGKILL the anvil under `chain up --state`: the wrapper starts it again from the file on
    the same port; what was written before the kill (the contracts, a deposit) is still there."""
    port = free_port()
    up = _chain_up(tmp_path, port, "up.log", "--state-interval", str(STATE_INTERVAL_S))
    log = tmp_path / "up.log"
    try:
        _wait_for_log(log, "Ctrl-C stops the chain")
        deployment = read_deployment(tmp_path / "deployment.json")
        payer = PaymentBroker(
            Chain.connect(deployment.rpc_url, PAYER_KEY), deployment.payment_broker
        )
        payer.deposit(12345)
        written = (tmp_path / "state.json").stat().st_mtime_ns
        deadline = time.monotonic() + UP_TIMEOUT_S
        while (tmp_path / "state.json").stat().st_mtime_ns == written:  # the deposit is written
            assert time.monotonic() < deadline, "anvil never wrote its state file again"
            time.sleep(0.1)
        first_anvil = _anvil_child(up)
        os.kill(first_anvil, signal.SIGKILL)

        _wait_for_log(log, "anvil is back on")
        assert up.poll() is None, log.read_text()
        assert _anvil_child(up) != first_anvil
        chain = Chain.connect(deployment.rpc_url)
        check_deployment(chain, deployment)  # the same contracts, at the same addresses
        assert (
            PaymentBroker(chain, deployment.payment_broker).balance_of(
                Account.from_key(PAYER_KEY).address
            )
            == 12345
        )
        assert "exited with code -9; starting it again from" in log.read_text()
    finally:
        up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=30) == 0, log.read_text()


def test_without_state_a_dead_anvil_ends_the_command_with_an_error(tmp_path: Path) -> None:
    port = free_port()
    up = _chain_up(tmp_path, port, "up.log", state=False)
    log = tmp_path / "up.log"
    try:
        _wait_for_log(log, "Ctrl-C stops the chain")
        os.kill(_anvil_child(up), signal.SIGKILL)
        assert up.wait(timeout=30) == 1, log.read_text()
    finally:
        if up.poll() is None:
            up.kill()
    text = log.read_text()
    assert "anvil exited with code -9 and the chain went with it" in text, text
    assert "--state FILE" in text


def test_state_interval_needs_a_state_file(tmp_path: Path) -> None:
    up = _chain_up(tmp_path, free_port(), "up.log", "--state-interval", "5", state=False)
    assert up.wait(timeout=60) == 2
    assert "--state-interval needs --state FILE" in (tmp_path / "up.log").read_text()


def test_an_anvil_that_keeps_dying_is_not_started_again_forever(tmp_path: Path) -> None:
    up = _chain_up(tmp_path, free_port(), "up.log")
    log = tmp_path / "up.log"
    try:
        _wait_for_log(log, "Ctrl-C stops the chain")
        for deaths in range(1, MAX_QUICK_DEATHS):
            os.kill(_anvil_child(up), signal.SIGKILL)
            deadline = time.monotonic() + UP_TIMEOUT_S
            while log.read_text().count("anvil is back on") < deaths:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        os.kill(_anvil_child(up), signal.SIGKILL)
        assert up.wait(timeout=30) == 1, log.read_text()
    finally:
        if up.poll() is None:
            up.kill()
    assert f"{MAX_QUICK_DEATHS} times in a row it died within" in log.read_text()
