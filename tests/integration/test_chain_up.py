"""`gpumarket chain up`: anvil from the npm install, contracts deployed, a deployment file that
a restart with kept state reuses."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from contracts.anvil import free_port
from contracts.chain import Chain
from contracts.deploy import check_deployment, read_deployment

UP_TIMEOUT_S = 60.0


def _chain_up(tmp_path: Path, port: int, log_name: str) -> subprocess.Popen[bytes]:
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
                "--state",
                str(tmp_path / "state.json"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


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
