"""Trial: stop the chain (anvil) mid-run and start it again, several times.

anvil runs with ``--state``: on SIGTERM it writes the chain to a file, and it starts again from
that file on the same port, so deposits, stakes and redemptions survive the restart. While it is
down the orchestrator cannot tell what a payer can still pay, so a new job is refused with 503
``chain_unavailable`` (with Retry-After) and nothing is recorded under its idempotency key; jobs
admitted before keep running and are paid (ledger and voucher need no chain), the workers'
redemptions and the orchestrator's read-back of them fail and are retried. Once the chain is
back, the refused job is submitted again with the same key and everything is paid once.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from gpumarket.sdk import FINAL_STATES
from protocol.problems import ProblemError
from tests.faults.checks import check_exactly_once
from tests.faults.conftest import TrialReport, repeat_count
from tests.faults.market import PAYER_KEY, Market, inference_spec, until

pytestmark = [pytest.mark.faults, pytest.mark.slow]

WORKERS = 2
JOB_S = 0.5
JOBS_PER_ROUND = 6
DOWN_S = 3.0  # the chain stays down at least this long: redemption retries happen meanwhile


def _refused_while_down(market: Market, key: str, spec: dict[str, object]) -> ProblemError:
    try:
        market.api.submit(spec, idempotency_key=key)
    except ProblemError as exc:
        return exc
    raise AssertionError("a job was admitted while the chain was down")


@pytest.mark.timeout(900)
def test_anvil_stop_and_restart_mid_run(tmp_path: Path, trial_report: TrialReport) -> None:
    restarts = repeat_count("ANVIL_RESTARTS", 3)
    payer = Account.from_key(PAYER_KEY).address
    with Market(tmp_path) as market:
        for i in range(WORKERS):
            market.add_worker(f"worker{i}", job_s=JOB_S)
        market.wait_for_workers()
        refused = 0
        finished_while_down = 0
        for r in range(restarts):
            ids = [
                market.submit(f"r{r}-{j}", inference_spec(f"{r}-{j}"))
                for j in range(JOBS_PER_ROUND)
            ]
            until(partial(market.job_in, ids[0], "succeeded"), "a job to succeed")
            chain = market.chain()
            block, deposit = chain.block_number(), market.broker().balance_of(payer)
            market.stop_anvil()  # mid-run: most of this round's jobs are queued or running

            key, spec = f"r{r}-refused", inference_spec(f"{r}-refused")
            exc = _refused_while_down(market, key, spec)
            assert (exc.status, exc.code) == (503, "chain_unavailable"), exc
            refused += 1
            assert market.orchestrator is not None
            account = httpx.get(
                f"{market.orchestrator.url}/v1/account",
                headers={"Authorization": f"Bearer {market.client_key}"},
            )
            assert account.status_code == 503 and account.headers["retry-after"], account.text
            down_until = time.monotonic() + DOWN_S
            until(
                partial(market.all_in, ids, FINAL_STATES),
                "the admitted jobs to finish while the chain is down",
            )
            finished_while_down += JOBS_PER_ROUND
            time.sleep(max(0.0, down_until - time.monotonic()))

            market.start_anvil()
            assert market.chain().block_number() >= block  # the chain kept its state
            assert market.broker().balance_of(payer) <= deposit  # only redemptions lower it
            assert market.submit(key, spec) not in ids  # admitted now, once, under that key
        counts = check_exactly_once(market)
        assert counts["jobs_succeeded"] == counts["jobs"]
        trial_report.record(
            anvil_restarts=restarts,
            submits_refused_503=refused,
            jobs_finished_while_chain_down=finished_while_down,
            workers=WORKERS,
            **counts,
        )
