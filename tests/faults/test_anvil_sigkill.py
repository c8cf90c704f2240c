"""Trial: SIGKILL the chain (anvil) mid-redemption and start it again from its state file.

anvil writes its state file every ``STATE_INTERVAL_S`` seconds (``--state-interval``), so a
SIGKILL loses the blocks mined since the last write: the chain comes back shorter, and the
transactions sent next are mined at the same heights in other blocks. Each round submits
jobs to two paced workers that redeem every new voucher within half a second, and waits for a
moment when the orchestrator has read a redemption from a block anvil has not written yet;
then anvil is killed and restarted at once. The redemption is gone from the chain; the worker
finds its transaction dropped and redeems again; the orchestrator must drop the row it had
read and record what the chain holds now. At the end, on top of every exactly-once check, the
orchestrator's redemption rows must be exactly the chain's Redeemed events.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from contracts.events import Redeemed
from tests.faults.checks import check_exactly_once
from tests.faults.conftest import TrialReport, repeat_count
from tests.faults.market import PAYER_KEY, RETRY_PAUSE_S, Market, inference_spec

pytestmark = [pytest.mark.faults, pytest.mark.slow]

WORKERS = 2
JOB_S = 0.3
JOBS_PER_ROUND = 8
STATE_INTERVAL_S = 2  # long enough that a redemption read back is often not written yet
ROLLBACK_LOG_LINE = "the chain rolled back or reorganised"
WAIT_S = 90.0


def _written_block(market: Market) -> int | None:
    """The newest block in anvil's state file; None while it is absent or half-written."""
    assert market.anvil.state_file is not None
    try:
        return int(json.loads(market.anvil.state_file.read_text())["best_block_number"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _events(market: Market) -> list[Redeemed]:
    assert market.deployment is not None
    payer = Account.from_key(PAYER_KEY).address
    return [
        e
        for e in market.broker().events.read(Redeemed, market.deployment.deployed_at_block)
        if e.payer == payer
    ]


def _settlement(market: Market) -> dict[str, Any]:
    assert market.orchestrator is not None
    with market.orchestrator.operator() as op:
        report: dict[str, Any] = op.get("/v1/settlement").json()
    return report


def _read_but_not_written(market: Market, seen: int) -> list[Redeemed] | None:
    """The chain's events, once there are more than ``seen``, the orchestrator has read them
    all, and the newest is in a block anvil has not written to its state file yet."""
    written = _written_block(market)
    events = _events(market)
    if written is None or len(events) <= seen:
        return None
    report = _settlement(market)
    rows = sum(p["redemptions"] for p in report["pairs"])
    newest = max(e.block_number for e in events)
    if rows == len(events) and (report["through_block"] or 0) >= newest > written:
        return events
    return None


def _wait_for_a_read_unwritten_redemption(market: Market, seen: int, key: str) -> list[Redeemed]:
    """Poll until ``_read_but_not_written``; when the round's jobs are all final and their
    redemptions were written before being caught, one more job makes another redemption."""
    deadline = time.monotonic() + WAIT_S
    extra = 0
    while (events := _read_but_not_written(market, seen)) is None:
        assert time.monotonic() < deadline, (
            f"no redemption read back by the orchestrator but not yet in anvil's state file "
            f"within {WAIT_S:.0f}s"
        )
        if not market.unfinished():
            market.submit(f"{key}-extra{extra}", inference_spec(f"{key}-extra{extra}"))
            extra += 1
        time.sleep(RETRY_PAUSE_S)
    return events


@pytest.mark.timeout(900)
def test_anvil_sigkill_mid_redemption(tmp_path: Path, trial_report: TrialReport) -> None:
    kills = repeat_count("ANVIL_KILLS", 3)
    with Market(tmp_path, anvil_state_interval_s=STATE_INTERVAL_S) as market:
        assert market.orchestrator is not None
        for i in range(WORKERS):
            market.add_worker(f"worker{i}", job_s=JOB_S)
        market.wait_for_workers()
        blocks_lost = redemptions_lost = 0
        for kill in range(kills):
            seen = len(_events(market))
            for j in range(JOBS_PER_ROUND):
                market.submit(f"k{kill}-{j}", inference_spec(f"{kill}-{j}"))
            before = _wait_for_a_read_unwritten_redemption(market, seen, f"k{kill}")
            head = market.chain().block_number()
            market.kill_anvil()
            market.start_anvil()
            blocks_lost += head - market.chain().block_number()
            after = {e.key for e in _events(market)}
            redemptions_lost += len({e.key for e in before} - after)
        counts = check_exactly_once(market)
        assert counts["jobs_succeeded"] == counts["jobs"]
        rollbacks_seen = market.orchestrator.log_path.read_text().count(ROLLBACK_LOG_LINE)
        assert redemptions_lost > 0, "no kill lost a redemption the orchestrator had read"
        assert rollbacks_seen > 0
        trial_report.record(
            anvil_kills=kills,
            blocks_lost=blocks_lost,
            redemptions_read_then_lost=redemptions_lost,
            rollbacks_seen_by_orchestrator=rollbacks_seen,
            workers=WORKERS,
            **counts,
        )
