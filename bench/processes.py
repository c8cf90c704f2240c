"""Real orchestrator and worker processes on loopback for the benchmarks, and what a process
costs the machine (CPU seconds and resident memory, read from /proc).

Each benchmark starts its own processes on free ports with state in a temporary folder, so a
run never touches ``.gpumarket/`` and two runs never share a database. Verification sampling
is off (``GPUMARKET_VERIFY_RATE*=0``: no job is run twice) and no deployment file is given
(no payments), so what is measured is dispatch and execution alone.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

READY_TIMEOUT_S = 60.0
"""Longest wait for an orchestrator to answer /readyz, or for workers to register."""
STOP_TIMEOUT_S = 10.0
"""Longest wait for a process to exit after SIGTERM before it is killed."""
READY_POLL_S = 0.1
OPERATOR_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
LOG_TAIL_CHARS = 2000
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpumarket.cli", *args]


def _clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without GPUMARKET_* settings (a developer's own orchestrator
    or worker settings must not leak into a benchmark), plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUMARKET_")}
    return {**env, **overrides}


class _Child:
    """A child process whose output goes to a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.pid

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)


class Orchestrator(_Child):
    """``gpumarket orchestrator serve`` on a free loopback port, SQLite in ``data_dir``.
    ``env`` adds or overrides GPUMARKET_* settings. A context manager: started on enter
    (once /readyz answers), stopped on exit."""

    def __init__(self, data_dir: Path, *, operator_token: str | None = None, **env: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Replicas of one market share it (their start-up check refuses otherwise).
        self.operator_token = operator_token or "bench-" + secrets.token_urlsafe(24)
        settings = {
            "GPUMARKET_DATA_DIR": str(data_dir),
            "GPUMARKET_ADMIN_TOKEN": self.operator_token,
            "GPUMARKET_LOG_LEVEL": "warning",
            "GPUMARKET_VERIFY_RATE": "0",
            # Thousands of scripted workers register from this one address.
            "GPUMARKET_REGISTRATION_RATE_PER_MIN": "0",
            "GPUMARKET_VERIFY_RATE_NEW": "0",
            **env,
        }
        super().__init__(
            _cli("orchestrator", "serve", "--port", str(self.port)),
            _clean_env(**settings),
            data_dir / "orchestrator.log",
        )

    def __enter__(self) -> Orchestrator:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.spawn()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.exited():
                raise RuntimeError(f"orchestrator exited: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(READY_POLL_S)
        raise RuntimeError(f"orchestrator not ready within {READY_TIMEOUT_S:g} s")

    def operator(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.operator_token}"},
            timeout=OPERATOR_TIMEOUT,
        )

    def new_client_key(self) -> str:
        """A fresh client account's API key (gmk_...)."""
        with self.operator() as http:
            response = http.post("/v1/clients", json={"name": "bench"})
            response.raise_for_status()
            return str(response.json()["api_key"])

    def workers(self) -> list[dict[str, Any]]:
        with self.operator() as http:
            response = http.get("/v1/workers")
            response.raise_for_status()
            workers: list[dict[str, Any]] = response.json()
            return workers

    def wait_for_workers(self, count: int, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Return once ``count`` workers are registered; RuntimeError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.exited():
                raise RuntimeError(f"orchestrator exited: {self.log_tail()}")
            if len(self.workers()) >= count:
                return
            time.sleep(READY_POLL_S * 3)
        raise RuntimeError(f"fewer than {count} workers registered within {timeout_s:g} s")


class Worker(_Child):
    """``gpumarket worker run`` against ``orchestrator_url``, key and scratch in ``root``.
    ``args`` are extra CLI flags, ``env`` GPUMARKET_WORKER_* settings."""

    def __init__(self, root: Path, orchestrator_url: str, *args: str, **env: str) -> None:
        self.root = root
        super().__init__(
            _cli(
                "worker",
                "run",
                "--orchestrator",
                orchestrator_url,
                "--key-file",
                str(root / "worker.key"),
                "--work-dir",
                str(root / "work"),
                *args,
            ),
            _clean_env(GPUMARKET_WORKER_LOG_LEVEL="warning", **env),
            root / "worker.log",
        )

    def __enter__(self) -> Worker:
        self.spawn()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ---- what a process costs ---------------------------------------------------------------


@dataclass(frozen=True)
class ProcessUsage:
    """A process's CPU time so far (user + system, all threads, seconds), its resident
    memory now (bytes), and when it was read (``time.monotonic``, seconds)."""

    cpu_s: float
    rss_bytes: int
    at: float


def process_usage(pid: int) -> ProcessUsage:
    """Read ``pid``'s CPU time and resident memory from /proc (Linux only)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return ProcessUsage(
        cpu_s=(utime + stime) / CLOCK_TICKS_PER_S,
        rss_bytes=rss_pages * PAGE_BYTES,
        at=time.monotonic(),
    )


def cores_used(before: ProcessUsage, after: ProcessUsage) -> float:
    """Mean CPU cores busy between two readings (1.0 = one core fully busy)."""
    wall_s = after.at - before.at
    if wall_s <= 0:
        raise ValueError("the readings must be taken at different times")
    return (after.cpu_s - before.cpu_s) / wall_s
