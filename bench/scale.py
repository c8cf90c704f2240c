"""(f) Scale: the orchestrator's CPU and memory with many workers heartbeating.

    python -m bench.run --only f [--quick]

One orchestrator process (SQLite, no payments). This process registers simulated workers over
HTTP (challenge, EIP-191 signature, register: each a distinct key, as the orchestrator keys
workers by address), then has every one of them send ``POST /v1/workers/heartbeat`` (an empty
job list, as an idle worker does) once per heartbeat interval, each at its own phase, so N
workers offer N / interval heartbeats per second. The orchestrator's CPU is read from
/proc/<pid>/stat (user + system time of all its threads) over the window and shown in cores
(1.0 = one core busy); its memory is the resident set (RSS) at the end of the window.

The load generator is this process, on the same cores. To leave the orchestrator as much CPU
as it can, it speaks minimal HTTP/1.1 over ``CONNECTIONS`` kept-alive sockets with
pre-encoded requests, not an HTTP library; its own CPU is shown in the note. Real workers
would also hold a lease long-poll open; the issue asks for heartbeats alone.

If the orchestrator cannot keep up with the offered rate (the answered rate falls below
``KEPT_UP_SHARE`` of it), the CPU figure is an extrapolation, CPU per answered heartbeat x
the offered rate, and the row says so.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from eth_account import Account
from eth_utils import keccak

from bench.processes import Orchestrator, ProcessUsage, cores_used, process_usage
from bench.scripted_worker import register
from bench.table import Row

SECTION = "f"
HEARTBEAT_INTERVAL_S = 10.0
"""The orchestrator's default (GPUMARKET_HEARTBEAT_INTERVAL_S)."""
CONNECTIONS = 64
"""Kept-alive sockets, one request in flight on each: up to 64 heartbeats wait at once."""
REGISTER_CONCURRENCY = 32
KEPT_UP_SHARE = 0.95
GOAL_CORES = 1.0
GOAL_WORKERS = 10_000
HEARTBEAT_BODY = b'{"jobs":[]}'
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
MIB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    workers: tuple[int, ...]
    window_s: float
    settle_s: float
    """Heartbeating before the window opens, so every worker has had its first beat."""


FULL = Sizes(workers=(1_000, 10_000), window_s=30.0, settle_s=HEARTBEAT_INTERVAL_S)
QUICK = Sizes(workers=(50,), window_s=3.0, settle_s=1.0)


@dataclass(frozen=True)
class Load:
    """What one window measured; rates per second, CPU in cores, memory in bytes."""

    workers: int
    offered_per_s: float
    answered_per_s: float
    orchestrator_cores: float
    orchestrator_rss_bytes: int
    generator_cores: float
    failures: int

    @property
    def kept_up(self) -> bool:
        return self.answered_per_s >= KEPT_UP_SHARE * self.offered_per_s

    @property
    def cpu_ms_per_heartbeat(self) -> float:
        return self.orchestrator_cores / self.answered_per_s * 1000

    @property
    def cores_at_offered_rate(self) -> float:
        """Measured cores if it kept up; else CPU per heartbeat x the offered rate."""
        if self.kept_up:
            return self.orchestrator_cores
        return self.cpu_ms_per_heartbeat / 1000 * self.offered_per_s


def worker_key(index: int) -> bytes:
    """The private key of simulated worker ``index``: the same on every run."""
    return bytes(keccak(text=f"gpumarket bench scale worker {index}"))


async def register_workers(url: str, start: int, count: int) -> list[str]:
    """Register workers ``start`` .. ``start + count - 1``; their session tokens."""
    tokens: list[str] = [""] * count
    next_index = 0
    limits = httpx.Limits(max_connections=REGISTER_CONCURRENCY)

    async with httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT, limits=limits) as http:

        async def registrar() -> None:
            nonlocal next_index
            while next_index < count:
                i = next_index
                next_index += 1
                account = Account.from_key(worker_key(start + i))
                tokens[i] = await register(http, account)

        await asyncio.gather(*(registrar() for _ in range(REGISTER_CONCURRENCY)))
    return tokens


def _heartbeat_request(port: int, token: str) -> bytes:
    return (
        f"POST /v1/workers/heartbeat HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(HEARTBEAT_BODY)}\r\n"
        "\r\n"
    ).encode() + HEARTBEAT_BODY


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response with a Content-Length body; returns its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


@dataclass
class _Counts:
    answered: int = 0
    failures: int = 0


async def _heartbeat_connection(
    port: int,
    schedule: list[tuple[float, bytes]],
    started: float,
    stop_at: float,
    counts: _Counts,
) -> None:
    """Send the heartbeats in ``schedule`` ((phase in s, request)) every interval, in turn,
    on one kept-alive connection, until ``stop_at`` (monotonic seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        beat = 0
        while True:
            for phase, request in schedule:
                due = started + beat * HEARTBEAT_INTERVAL_S + phase
                if due >= stop_at:
                    return
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(request)
                if await _read_response(reader) == 200:
                    counts.answered += 1
                else:
                    counts.failures += 1
            beat += 1
    finally:
        writer.close()


async def heartbeat_window(
    port: int, pid: int, tokens: list[str], settle_s: float, window_s: float
) -> Load:
    """Every token heartbeats once per interval; measure the last ``window_s`` seconds."""
    requests = [_heartbeat_request(port, token) for token in tokens]
    spacing = HEARTBEAT_INTERVAL_S / len(requests)
    # Worker i beats at phase i * spacing; connection c sends workers c, c + C, c + 2C, ...
    schedules = [
        [(i * spacing, requests[i]) for i in range(c, len(requests), CONNECTIONS)]
        for c in range(min(CONNECTIONS, len(requests)))
    ]
    counts = _Counts()
    started = time.monotonic()
    stop_at = started + settle_s + window_s
    senders = [
        asyncio.create_task(_heartbeat_connection(port, s, started, stop_at, counts))
        for s in schedules
    ]
    await asyncio.sleep(settle_s)
    answered_before = counts.answered
    before, me_before = process_usage(pid), process_usage(os.getpid())
    await asyncio.sleep(window_s)
    after, me_after = process_usage(pid), process_usage(os.getpid())
    answered = counts.answered - answered_before
    await asyncio.gather(*senders)
    if answered == 0:
        raise RuntimeError(f"no heartbeat of {len(tokens)} workers answered in {window_s:g} s")
    return Load(
        workers=len(tokens),
        offered_per_s=len(tokens) / HEARTBEAT_INTERVAL_S,
        answered_per_s=answered / (after.at - before.at),
        orchestrator_cores=cores_used(before, after),
        orchestrator_rss_bytes=after.rss_bytes,
        generator_cores=cores_used(me_before, me_after),
        failures=counts.failures,
    )


async def _measure(orchestrator: Orchestrator, sizes: Sizes) -> tuple[list[Load], ProcessUsage]:
    idle = process_usage(orchestrator.pid)
    tokens: list[str] = []
    loads = []
    for workers in sizes.workers:
        tokens += await register_workers(orchestrator.url, len(tokens), workers - len(tokens))
        loads.append(
            await heartbeat_window(
                orchestrator.port, orchestrator.pid, tokens, sizes.settle_s, sizes.window_s
            )
        )
    return loads, idle


def heartbeat_loads(sizes: Sizes, workdir: Path | None = None) -> tuple[list[Load], int]:
    """One ``Load`` per worker count in ``sizes``, and the orchestrator's RSS before any
    worker registered (bytes)."""
    with tempfile.TemporaryDirectory(prefix="gpumarket-bench-f-", dir=workdir) as tmp:
        env = {"GPUMARKET_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_INTERVAL_S)}
        with Orchestrator(Path(tmp) / "orchestrator", **env) as orchestrator:
            loads, idle = asyncio.run(_measure(orchestrator, sizes))
    return loads, idle.rss_bytes


def _rows_for(load: Load, idle_rss_bytes: int, goal: bool) -> list[Row]:
    label = f"{load.workers:,} workers"
    how = (
        f"{load.answered_per_s:,.0f} of {load.offered_per_s:,.0f} heartbeats/s answered "
        f"({load.failures} failed); load generator used {load.generator_cores:.2f} cores "
        "of the same machine"
    )
    if load.kept_up:
        cpu_note = f"measured; {how}"
    else:
        cpu_note = (
            f"EXTRAPOLATED: the orchestrator fell behind ({how}); "
            f"{load.orchestrator_cores:.2f} cores measured at the answered rate, "
            f"x {load.offered_per_s / load.answered_per_s:.2f} to the offered rate"
        )
    cores = load.cores_at_offered_rate
    return [
        Row(
            section=SECTION,
            name=(
                f"orchestrator CPU, {label} heartbeating every {HEARTBEAT_INTERVAL_S:g} s"
                + ("" if load.kept_up else " (extrapolated)")
            ),
            value=cores,
            unit="cores",
            goal=f"<= {GOAL_CORES:g} core" if goal else "",
            met=(cores <= GOAL_CORES) if goal else None,
            note=cpu_note,
        ),
        Row(
            section=SECTION,
            name=f"orchestrator CPU per heartbeat, {label}",
            value=load.cpu_ms_per_heartbeat,
            unit="ms",
            note=(
                "orchestrator CPU time / heartbeats answered in the window (its sweeper's "
                "background work included)"
            ),
        ),
        Row(
            section=SECTION,
            name=f"orchestrator memory (RSS), {label}",
            value=load.orchestrator_rss_bytes / MIB,
            unit="MiB",
            baseline_name="RSS before any worker registered, MiB",
            baseline_value=idle_rss_bytes / MIB,
            ratio=load.orchestrator_rss_bytes / idle_rss_bytes,
        ),
    ]


def measure(quick: bool) -> list[Row]:
    sizes = QUICK if quick else FULL
    loads, idle_rss = heartbeat_loads(sizes)
    rows = []
    for load in loads:
        rows += _rows_for(load, idle_rss, goal=load.workers >= GOAL_WORKERS)
    return rows
