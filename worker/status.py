"""What a running worker shows its operator: a live status line on a terminal, log lines
otherwise, and a summary when it stops.

    worker 0xAbC…: 12 done, 0 failed, running 1/4 | vouchers 9600000000000000 wei, redeemed
    8400000000000000 wei | prices inference 800000000000000, transcode 10000000 wei/unit

On a terminal the line is redrawn in place every ``TTY_REFRESH_S`` seconds on stderr; into a
file or a pipe it is logged every ``LOG_INTERVAL_S`` seconds, and only when it changed, so a
log stays quiet while nothing happens. A worker that cannot get work says so (``problem``) in
the line, and as an error line when it is first found.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from worker.metrics import WorkerMetrics

log = logging.getLogger("gpumarket.worker.status")

TTY_REFRESH_S = 1.0
LOG_INTERVAL_S = 60.0


@dataclass
class StatusBoard:
    """The numbers the status line shows; ``running`` and ``capacity`` are read when drawn."""

    address: str
    metrics: WorkerMetrics
    prices: dict[str, int]  # job type -> wei per unit
    running: Callable[[], int]
    capacity: int
    problem: str | None = None
    phase: str | None = None  # e.g. "loading models" before the first job can run

    def cannot_get_work(self, why: str) -> None:
        """Say loudly, once per distinct reason, why the orchestrator will give no work."""
        if why != self.problem:
            log.error("NO WORK FOR THIS WORKER: %s", why)
        self.problem = why

    def line(self) -> str:
        """One line, whole addresses and exact wei."""
        m = self.metrics
        prices = ", ".join(f"{kind} {wei}" for kind, wei in sorted(self.prices.items()))
        text = (
            f"worker {self.address}: {m.completed_total} done, {m.failed_total} failed, "
            f"running {self.running()}/{self.capacity} | vouchers {m.earned_wei} wei, "
            f"redeemed {m.redeemed_wei} wei | prices {prices} wei/unit"
        )
        if self.phase:
            text += f" | {self.phase}"
        if self.problem:
            text += f" | NO WORK: {self.problem}"
        return text

    def summary(self) -> str:
        m = self.metrics
        return (
            f"worker {self.address} stopped: {m.completed_total} job(s) done, "
            f"{m.failed_total} failed; vouchers {m.earned_wei} wei, redeemed this run "
            f"{m.redeemed_wei} wei"
        )


async def show_status(
    board: StatusBoard, stop: asyncio.Event, stream: TextIO | None = None
) -> None:
    """Until ``stop``: redraw the line on a terminal, or log it when it changed."""
    out = stream or sys.stderr
    tty = out.isatty()
    last = ""
    while not stop.is_set():
        line = board.line()
        if tty:
            out.write("\r\x1b[2K" + line)
            out.flush()
        elif line != last:
            log.info("%s", line)
        last = line
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), TTY_REFRESH_S if tty else LOG_INTERVAL_S)
    if tty:
        out.write("\r\x1b[2K")
        out.flush()
    log.warning("%s", board.summary())
