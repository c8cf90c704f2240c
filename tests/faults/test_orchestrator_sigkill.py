"""Trial: SIGKILL the orchestrator mid-settlement, again and again, and restart it on the same
database.

Two paced workers complete paid jobs every few tenths of a second and redeem each new voucher
within half a second, so at any moment the orchestrator is writing ledger entries and vouchers,
serving vouchers, or reading redemptions back from the chain. Each round submits jobs, waits
until a payment has landed since the last restart, lets a random 0-0.5 s pass and SIGKILLs
the orchestrator. The client retries its submissions with the same idempotency keys; the
workers retry their reports and, when a report is lost for good, the lease runs out and the job
runs again. Right after each restart the ledger and the vouchers must agree.

tests/integration/test_payment_crashes.py kills with one completion exactly in flight, from an
in-process worker; this trial kills real worker daemons' orchestrator at random points.
"""

from __future__ import annotations

import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.faults.checks import check_exactly_once
from tests.faults.conftest import TrialReport, repeat_count
from tests.faults.market import Market, inference_spec, until

pytestmark = [pytest.mark.faults, pytest.mark.slow]

WORKERS = 2
JOB_S = 0.3
JOBS_PER_ROUND = 10
KILL_DELAY_MAX_S = 0.5


def _settlement(market: Market) -> dict[str, Any]:
    assert market.orchestrator is not None
    with market.orchestrator.operator() as op:
        report: dict[str, Any] = op.get("/v1/settlement").json()
    return report


def _paid_since(market: Market, ledger_entries: int) -> bool:
    return int(_settlement(market)["ledger_entries"]) > ledger_entries


@pytest.mark.timeout(900)
def test_orchestrator_sigkill_mid_settlement(tmp_path: Path, trial_report: TrialReport) -> None:
    kills_wanted = repeat_count("ORCHESTRATOR_KILLS", 10)
    rng = random.Random(7)
    with Market(tmp_path) as market:
        assert market.orchestrator is not None
        for i in range(WORKERS):
            market.add_worker(f"worker{i}", job_s=JOB_S)
        market.wait_for_workers()
        kills_mid_flow = 0  # kills with jobs still queued or running
        for kill in range(kills_wanted):
            paid_before = _settlement(market)["ledger_entries"]
            for j in range(JOBS_PER_ROUND):
                market.submit(f"round-{kill}-{j}", inference_spec(f"{kill}-{j}"))
            until(partial(_paid_since, market, paid_before), "a payment since the last restart")
            time.sleep(rng.uniform(0, KILL_DELAY_MAX_S))
            kills_mid_flow += bool(market.unfinished())
            market.orchestrator.kill()
            market.orchestrator.start()
            report = _settlement(market)
            assert report["consistent"], report  # ledger == voucher right after the crash
        counts = check_exactly_once(market)
        assert counts["jobs_succeeded"] == counts["jobs"]
        trial_report.record(
            orchestrator_kills=kills_wanted,
            kills_with_jobs_in_flight=kills_mid_flow,
            workers=WORKERS,
            **counts,
        )
