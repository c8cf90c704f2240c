"""Reputation: decayed evidence, a Laplace prior, recovery over time."""

from __future__ import annotations

import pytest

from orchestrator.services import reputation
from orchestrator.services.reputation import Event
from orchestrator.store.models import Worker

DAY = 24 * 3600.0
HALF_LIFE = 7 * DAY


def _worker() -> Worker:
    return Worker(rep_good=0.0, rep_bad=0.0, rep_at=0.0)


def test_a_new_worker_starts_in_the_middle() -> None:
    assert reputation.current(_worker(), 1000.0, HALF_LIFE) == 0.5


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([Event.SUCCEEDED] * 8, 0.9),
        ([Event.FAILED], 1 / 3),
        ([Event.LEASE_EXPIRED], 1 / 3),  # a lost lease costs as much as a failure
        ([Event.SUCCEEDED] * 3 + [Event.FAILED, Event.LEASE_EXPIRED], 4 / 7),
        ([Event.VERIFIED], 4 / 5),  # a confirmed result tells more than an unchecked one
    ],
)
def test_events_at_one_instant_make_a_laplace_share(events: list[Event], expected: float) -> None:
    worker = _worker()
    for event in events:
        reputation.record(worker, event, 100.0, HALF_LIFE)
    assert reputation.current(worker, 100.0, HALF_LIFE) == pytest.approx(expected)


def test_evidence_halves_every_half_life() -> None:
    worker = _worker()
    for _ in range(8):
        reputation.record(worker, Event.SUCCEEDED, 0.0, HALF_LIFE)
    # 8 good events weigh 4 after one half-life: (4 + 1) / (4 + 2)
    assert reputation.current(worker, HALF_LIFE, HALF_LIFE) == pytest.approx(5 / 6)
    assert worker.rep_good == 8.0  # reading does not write


def test_a_proved_wrong_result_sinks_even_a_long_record_and_time_heals_it() -> None:
    worker = _worker()
    for _ in range(200):
        reputation.record(worker, Event.SUCCEEDED, 0.0, HALF_LIFE)
    worker.rep_good = 0.0  # what a conviction does (services/verification.py)
    reputation.record(worker, Event.PROVED_WRONG, 0.0, HALF_LIFE)
    assert reputation.current(worker, 0.0, HALF_LIFE) < 0.05
    assert reputation.current(worker, 30 * DAY, HALF_LIFE) > 0.25  # back above the floor


def test_recent_failures_weigh_more_than_old_successes() -> None:
    worker = _worker()
    for _ in range(10):
        reputation.record(worker, Event.SUCCEEDED, 0.0, HALF_LIFE)
    before = reputation.current(worker, 0.0, HALF_LIFE)
    for _ in range(3):
        reputation.record(worker, Event.FAILED, 4 * HALF_LIFE, HALF_LIFE)
    assert reputation.current(worker, 4 * HALF_LIFE, HALF_LIFE) < 0.5 < before
