"""Trial: SIGKILL a worker while a job is running on it, again and again.

Three paced workers (the real daemon, stand-in executors) run paid jobs of 1.5 s each. Each
round waits for a job that has been running for less than a second, SIGKILLs the worker
holding it and starts that worker again at once with the same key. The orchestrator hears
nothing: the job's lease runs out (2 s TTL), the job goes back to the queue as the next
attempt and another worker, or the restarted one once a lease's time has passed, runs it.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.faults.checks import check_exactly_once
from tests.faults.conftest import TrialReport, repeat_count
from tests.faults.market import Market, inference_spec, until

pytestmark = [pytest.mark.faults, pytest.mark.slow]

WORKERS = 3
JOB_S = 1.5
FRESH_RUN_S = 1.0  # kill only jobs that started running less than this long ago
JOBS_IN_FLIGHT = 6
KILLS_PER_JOB = 3  # at most; the job's other attempts are left to finish (max_attempts is 10)


def _running_since(job: dict[str, Any]) -> float | None:
    """Unix time the current attempt started running, from the job's history."""
    for event in reversed(job["history"]):
        if event["attempt"] == job["attempt"] and event["state"] == "running":
            return datetime.fromisoformat(event["at"]).timestamp()
    return None


def _fresh_running_job(market: Market) -> dict[str, Any] | None:
    """A job the live worker process holding it started less than FRESH_RUN_S ago. (A job
    whose worker was just killed still reads "running" until its lease runs out.)"""
    for job in market.api.list(state="running"):
        since = _running_since(market.api.get(job["id"]))
        worker = market.worker_at(job["worker_address"])
        if (
            since is not None
            and job["attempt"] <= KILLS_PER_JOB
            and since > worker.started_at
            and time.time() - since < FRESH_RUN_S
            and worker.alive()
        ):
            return job
    return None


@pytest.mark.timeout(900)
def test_worker_sigkill_mid_job(tmp_path: Path, trial_report: TrialReport) -> None:
    kills_wanted = repeat_count("WORKER_KILLS", 20)
    with Market(tmp_path) as market:
        for i in range(WORKERS):
            market.add_worker(f"worker{i}", job_s=JOB_S)
        market.wait_for_workers()
        killed: list[tuple[str, int, str]] = []  # (job id, attempt, worker address)
        submitted = 0
        while len(killed) < kills_wanted:
            while submitted <= len(killed) or len(market.unfinished()) < JOBS_IN_FLIGHT:
                market.submit(f"kill-{submitted}", inference_spec(submitted))
                submitted += 1
            job = until(lambda: _fresh_running_job(market), "a job to start running", 60)
            worker = market.worker_at(job["worker_address"])
            worker.kill()
            killed.append((job["id"], job["attempt"], worker.address))
            worker.start()  # same key, same worker id: its old lease is not renewed
        counts = check_exactly_once(market)
        jobs = {j["id"]: j for j in market.api.list(limit=200)}
        for job_id, attempt, address in killed:
            job = market.api.get(job_id)
            expired = f"lease expired on {address} (attempt {attempt})"
            assert any(e["detail"] == expired for e in job["history"]), (expired, job["history"])
            assert jobs[job_id]["attempt"] > attempt
        assert counts["jobs_succeeded"] == counts["jobs"]
        assert len({(job_id, attempt) for job_id, attempt, _ in killed}) == len(killed)
        trial_report.record(
            worker_kills=len(killed),
            attempts_lost_and_re_leased=len(killed),
            jobs_hit=len({job_id for job_id, _, _ in killed}),
            workers=WORKERS,
            **counts,
        )
