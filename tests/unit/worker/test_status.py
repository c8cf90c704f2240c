"""The worker's status line: redrawn on a terminal, logged when it changed otherwise."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest

from worker.metrics import WorkerMetrics
from worker.status import StatusBoard, show_status

ADDRESS = "0x" + "Ab" * 20


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _board() -> tuple[StatusBoard, WorkerMetrics, list[int]]:
    metrics = WorkerMetrics()
    running = [0]
    board = StatusBoard(
        ADDRESS, metrics, {"all-MiniLM-L6-v2": 800, "h264": 10}, lambda: running[0], 4
    )
    return board, metrics, running


def test_the_line_has_jobs_money_load_and_prices_whole() -> None:
    board, metrics, running = _board()
    metrics.job_completed("inference")
    metrics.job_completed("inference")
    metrics.job_failed("transcode", retryable=True)
    metrics.vouchers_seen(1_600_000_000_000_000_000_000)
    metrics.redeemed(1_584_000_000_000_000_000_000)
    running[0] = 3
    assert board.line() == (
        f"worker {ADDRESS}: 2 done, 1 failed, running 3/4 | vouchers "
        "1600000000000000000000 wei, redeemed 1584000000000000000000 wei | prices "
        "all-MiniLM-L6-v2 800, h264 10 wei/unit"
    )
    board.phase = "loading models"
    assert board.line().endswith("wei/unit | loading models")
    board.cannot_get_work("not staked")
    assert board.line().endswith(" | loading models | NO WORK: not staked")


def test_into_a_file_it_logs_each_change_once_then_a_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    board, metrics, _ = _board()
    out = io.StringIO()

    async def body() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(show_status(board, stop, out))
        await asyncio.sleep(0)
        stop.set()
        await task

    with caplog.at_level(logging.INFO, logger="gpumarket.worker.status"):
        asyncio.run(body())
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == board.line()
    assert (
        messages[-1] == f"worker {ADDRESS} stopped: 0 job(s) done, 0 failed; vouchers 0 wei, "
        "redeemed this run 0 wei"
    )
    assert out.getvalue() == ""  # nothing drawn: not a terminal


def test_on_a_terminal_it_redraws_one_line_in_place() -> None:
    board, metrics, _ = _board()
    out = Terminal()

    async def body() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(show_status(board, stop, out))
        await asyncio.sleep(0)
        metrics.job_completed("inference")
        await asyncio.sleep(1.5)  # one redraw (TTY_REFRESH_S)
        stop.set()
        await task

    asyncio.run(body())
    drawn = out.getvalue()
    assert "\n" not in drawn
    frames = [f for f in drawn.split("\r\x1b[2K") if f]
    assert frames[0].endswith(
        "running 0/4 | vouchers 0 wei, redeemed 0 wei | prices "
        "all-MiniLM-L6-v2 800, h264 10 wei/unit"
    )
    assert ": 1 done, 0 failed" in frames[-1]


def test_a_job_type_left_at_its_default_price_is_announced() -> None:
    from gpumarket.cli import default_price_notes
    from protocol import JobType
    from worker.config import DEFAULT_PRICES_WEI, WorkerSettings

    settings = WorkerSettings(prices_wei={**DEFAULT_PRICES_WEI, "inference": 5})
    [note] = default_price_notes(settings, {"inference"})
    assert note == (
        f"transcode: offered at the default price, {DEFAULT_PRICES_WEI['transcode']} wei per "
        "output pixel; set it with --price transcode=WEI, or leave it out with --job-type "
        "inference"
    )
    assert default_price_notes(settings, {"inference", "transcode"}) == []
    only = WorkerSettings(job_types=[JobType.INFERENCE])
    [alone] = default_price_notes(only, set())
    assert alone.endswith("wei per input item; set it with --price inference=WEI")
