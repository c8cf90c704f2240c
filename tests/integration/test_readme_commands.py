"""The README's commands for an orchestrator, a worker and a client, run as written.

Each line is taken from the README's ``sh`` blocks, not copied here: only the placeholders a
reader fills in are replaced (the port, where it is taken; ``ORCHESTRATOR``; the API key the
README's ``create-client`` line printed; ``JOB_ID``; a ``clip.mp4`` of their own). They run
with bash in a fresh folder, a new shell's environment and the venv's ``gpumarket`` on PATH:
the orchestrator as ``serve`` starts it (SQLite, no chain), the worker with its real MiniLM
and PyAV, the client's lines one after another.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account

from contracts.anvil import DEV_PRIVATE_KEYS, free_port
from contracts.broker import PaymentBroker
from contracts.chain import Chain
from contracts.deploy import read_deployment
from contracts.registry import WorkerRegistry
from gpumarket import Client
from tests.integration.conftest import READY_TIMEOUT_S, wait_ready
from tests.support import EMBED_MODEL
from worker.executors.transcode import make_test_clip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
COMMAND_TIMEOUT_S = 150.0


def readme_block(first: str) -> list[str]:
    """The commands of the README's ``sh`` block holding a line that starts with ``first``,
    without their trailing comments."""
    for block in re.findall(r"^```sh\n(.*?)^```", README, re.S | re.M):
        lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()]
        lines = [line for line in lines if line]
        if any(line.startswith(first) for line in lines):
            return lines
    raise AssertionError(f"the README has no sh block with a line starting {first!r}")


def _new_shell() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUMARKET_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "80"
    return env


class Shell:
    """bash in one folder, with the lines the README exported before."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.exports: list[str] = []
        self.background: list[subprocess.Popen[bytes]] = []

    def run(self, line: str) -> subprocess.CompletedProcess[str]:
        if line.startswith("export "):
            self.exports.append(line)
            return subprocess.CompletedProcess(line, 0, "", "")
        ran = subprocess.run(
            ["bash", "-e", "-c", "\n".join([*self.exports, line])],
            cwd=self.cwd,
            env=_new_shell(),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        assert ran.returncode == 0, (line, ran.stdout, ran.stderr)
        return ran

    def start(self, line: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            self.background.append(
                subprocess.Popen(
                    ["bash", "-c", line],
                    cwd=self.cwd,
                    env=_new_shell(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # bash and what it runs: one group to stop
                )
            )
        return self.background[-1]

    def stop(self) -> None:
        for proc in reversed(self.background):  # the worker drains before its orchestrator
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    here = tmp_path / "project"
    here.mkdir()
    sh = Shell(here)
    try:
        yield sh
    finally:
        sh.stop()


def _job_id(submitted: str) -> str:
    found = re.search(r"\bjob ([0-9a-f]{32})\b", submitted)
    assert found, submitted
    return found.group(1)


def test_the_readme_operator_worker_and_client_commands_run_as_written(
    shell: Shell, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    # Operate an orchestrator: serve (on a free port), then make a client key.
    operate = readme_block("gpumarket orchestrator serve --port 8000")
    serving = shell.start(operate[0].replace("--port 8000", f"--port {port}"), tmp_path / "log")
    wait_ready(url, serving, tmp_path / "log")
    [create] = [line for line in operate if line.startswith("gpumarket orchestrator create-client")]
    keys = re.findall(r"\bgmk_[A-Za-z0-9_-]+", shell.run(create).stdout)
    assert len(keys) == 1, keys
    key = keys[0]

    # Run a worker, as the README says, pointed at that orchestrator.
    [work] = readme_block("gpumarket worker run --orchestrator http://ORCHESTRATOR:8000")
    shell.start(work.replace("http://ORCHESTRATOR:8000", url), tmp_path / "worker.log")

    # The client's lines, in order.
    make_test_clip(shell.cwd / "clip.mp4", width=1280, height=720, frames=6)
    client = Client(url, key)
    video_id = ""
    for line in readme_block("export GPUMARKET_URL=http://127.0.0.1:8000"):
        line = line.replace("http://127.0.0.1:8000", url).replace("gmk_...", key)
        if "JOB_ID" in line and " cancel " in line:
            # Cancelling needs a job that is not finished: one no worker takes at 1 wei.
            queued = client.submit(
                {
                    "type": "inference",
                    "model": EMBED_MODEL,
                    "input": {"texts": ["never run"]},
                    "max_price_wei_per_unit": "1",
                }
            )
            shell.run(line.replace("JOB_ID", queued["id"]))
            assert client.get(queued["id"])["state"] == "cancelled"
            continue
        if "JOB_ID" in line and " result " in line:
            assert client.wait(video_id, COMMAND_TIMEOUT_S)["state"] == "succeeded"
        ran = shell.run(line.replace("JOB_ID", video_id))
        if line.startswith("gpumarket job submit --model"):
            assert re.search(r"^job [0-9a-f]{32} succeeded$", ran.stderr, re.M), ran.stderr
            assert re.search(r"^embeddings\s+1 x 384$", ran.stdout, re.M), ran.stdout
        if line.startswith("gpumarket job submit --video"):
            video_id = _job_id(ran.stdout)
        if " result " in line:
            saved = sorted(p.name for p in (shell.cwd / "out").iterdir())
            assert saved == [f"{video_id}-360p.mp4", f"{video_id}-720p.mp4"], saved
    client.close()
    assert video_id, "the README's client block submits no video"


def _wait_for_file(path: Path, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S * 2
    while not path.is_file():
        assert time.monotonic() < deadline, f"no {path}: {log.read_text()[-2000:]}"
        time.sleep(0.2)


def test_the_readme_paying_on_chain_commands_run_as_written(shell: Shell, tmp_path: Path) -> None:
    chain_port, port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    block = readme_block("gpumarket chain up")
    chain_up, serve, *wallet = block
    assert chain_up == "gpumarket chain up" and serve.endswith("gpumarket orchestrator serve")

    shell.start(f"{chain_up} --port {chain_port}", tmp_path / "chain.log")
    deployment_file = shell.cwd / ".gpumarket" / "deployment.json"
    _wait_for_file(deployment_file, tmp_path / "chain.log")
    wait_ready(url, shell.start(f"{serve} --port {port}", tmp_path / "log"), tmp_path / "log")
    [create] = [
        line
        for line in readme_block("gpumarket orchestrator serve --port 8000")
        if line.startswith("gpumarket orchestrator create-client")
    ]
    [key] = re.findall(r"\bgmk_[A-Za-z0-9_-]+", shell.run(create).stdout)
    with Client(url, key) as client:  # where a reader finds SIGNER (the README says so)
        account = client.account()
    assert account["payments"] is True, account
    signer = account["signer_address"]
    worker = Account.create()
    (shell.cwd / ".gpumarket" / "worker.key").write_text(worker.key.hex() + "\n")

    for line in wallet:
        shell.run(line.replace("SIGNER", signer).replace("0xWORKER_ADDRESS", worker.address))

    deployment = read_deployment(deployment_file)
    chain = Chain.connect(deployment.rpc_url)
    broker = PaymentBroker(chain, deployment.payment_broker)
    payer = Account.from_key(DEV_PRIVATE_KEYS[2]).address
    assert broker.balance_of(payer) == 10**18  # deposit 1eth
    assert broker.allowance(payer, signer).cap_wei == 5 * 10**17  # authorise 0.5eth
    registry = WorkerRegistry(chain, deployment.worker_registry)
    assert registry.stake_of(worker.address) == 10**17  # stake 0.1eth, after chain fund
    assert "SIGNER" in README and "signer_address" in README  # the README says where it is
