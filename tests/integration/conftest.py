"""Real orchestrator processes on loopback for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

READY_TIMEOUT_S = 30.0
OPERATOR_TOKEN = "integration-operator-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OrchestratorProcess:
    """``gpumarket orchestrator serve`` as a child process, restartable on the same database."""

    def __init__(self, data_dir: Path, db_url: str | None = None, **env: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "orchestrator.log"
        self.env = {
            **os.environ,
            "GPUMARKET_DATA_DIR": str(data_dir),
            "GPUMARKET_ADMIN_TOKEN": OPERATOR_TOKEN,
            "GPUMARKET_LOG_LEVEL": "warning",
            "GPUMARKET_VERIFY_RATE": "0",
            "GPUMARKET_VERIFY_RATE_NEW": "0",
            **({"GPUMARKET_DB_URL": db_url} if db_url else {}),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = self._spawn(log)
        self._wait_ready()

    def _spawn(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpumarket.cli",
                "orchestrator",
                "serve",
                "--port",
                str(self.port),
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def _wait_ready(self) -> None:
        assert self.proc is not None
        wait_ready(self.url, self.proc, self.log_path)

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flushing; what survives is what was committed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def operator(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}, timeout=10
        )

    def new_client_key(self) -> str:
        with self.operator() as http:
            response = http.post("/v1/clients", json={"name": "integration"})
            response.raise_for_status()
            return str(response.json()["api_key"])


def wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Until the orchestrator ``proc`` (logging to ``log_path``) answers ``/readyz`` at ``url``."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"orchestrator exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"orchestrator not ready in {READY_TIMEOUT_S}s")


@pytest.fixture
def orchestrator_process(tmp_path: Path) -> Iterator[OrchestratorProcess]:
    proc = OrchestratorProcess(tmp_path / "orchestrator")
    proc.start()
    yield proc
    proc.stop()


class WorkerProcess:
    """``gpumarket worker run`` as a child process."""

    def __init__(self, root: Path, orchestrator_url: str, *extra_args: str, **env: str) -> None:
        self.root = root
        self.log_path = root / "worker.log"
        self.args = [
            sys.executable,
            "-m",
            "gpumarket.cli",
            "worker",
            "run",
            "--orchestrator",
            orchestrator_url,
            "--key-file",
            str(root / "worker.key"),
            "--work-dir",
            str(root / "work"),
            *extra_args,
        ]
        self.env = {
            **os.environ,
            "GPUMARKET_WORKER_LEASE_WAIT_S": "2",
            "GPUMARKET_WORKER_BACKOFF_MAX_S": "1",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self) -> str:
        return self.log_path.read_text()

    def paced(self, job_s: float) -> WorkerProcess:
        """Run as tests/faults/paced_worker.py instead: the same command and options (the real
        daemon, reports, drain and voucher redeemer) with stand-in executors taking ``job_s``
        per job, for a test of the daemon rather than of the model (no ~13 s model load)."""
        assert self.args[2] == "gpumarket.cli", "already paced"
        self.args = [sys.executable, "-m", "tests.faults.paced_worker", *self.args[5:]]
        self.env["GPUMARKET_FAULTS_JOB_S"] = str(job_s)
        return self

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def wait_for_workers(proc: OrchestratorProcess, count: int, timeout_s: float = 90.0) -> list[dict]:
    """Registered (not deregistered) workers, once ``count`` of them are there."""
    deadline = time.monotonic() + timeout_s
    with proc.operator() as http:
        while time.monotonic() < deadline:
            workers: list[dict] = http.get("/v1/workers").json()
            if len(workers) >= count:
                return workers
            time.sleep(0.3)
    raise AssertionError(f"fewer than {count} workers registered within {timeout_s}s")
