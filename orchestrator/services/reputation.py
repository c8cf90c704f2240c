"""Reputation: a worker's record as a score in [0, 1], from evidence that fades with time.

Each event adds weight to "good" or "bad" evidence; both halve every ``half_life_s``, so an
old record counts less than a recent one and a worker that misbehaved recovers by working
well (or just by time) instead of carrying one bad hour for ever. The score is the share of
good evidence with one good and one bad event as prior (Laplace), so a new worker sits at 0.5.

The weights say how much each event tells: a lost lease is as bad as a failed job; a result
that a second worker confirmed is worth more than an unchecked one; a bill for units the
result does not hold counts as several failures; a result proved wrong outweighs many good
ones. Being online and answering heartbeats counts through the leases and results it
produces; an absent worker simply stops adding evidence.
"""

from __future__ import annotations

import math
from enum import Enum

from orchestrator.store.models import Worker


class Event(Enum):
    #       (good, bad)
    SUCCEEDED = (1.0, 0.0)
    FAILED = (0.0, 1.0)
    LEASE_EXPIRED = (0.0, 1.0)
    VERIFIED = (3.0, 0.0)
    # A signed result billing other units than it holds: refused before any payment, but
    # a deliberate claim, so it weighs as several failures.
    MISBILLED = (0.0, 5.0)
    PROVED_WRONG = (0.0, 25.0)

    @property
    def good(self) -> float:
        return self.value[0]

    @property
    def bad(self) -> float:
        return self.value[1]


def decay_factor(elapsed_s: float, half_life_s: float) -> float:
    return math.pow(0.5, max(elapsed_s, 0.0) / half_life_s)


def score(good: float, bad: float) -> float:
    return (good + 1.0) / (good + bad + 2.0)


def _since(worker: Worker, now: float) -> float:
    return now if worker.rep_at is None else worker.rep_at


def current(worker: Worker, now: float, half_life_s: float) -> float:
    """The worker's score now (evidence decayed to ``now``; nothing is written)."""
    factor = decay_factor(now - _since(worker, now), half_life_s)
    return score((worker.rep_good or 0.0) * factor, (worker.rep_bad or 0.0) * factor)


def record(worker: Worker, event: Event, now: float, half_life_s: float) -> float:
    """Decay the worker's evidence to ``now``, add ``event``; returns the new score.

    The caller holds the worker's row lock (it is read, then written)."""
    factor = decay_factor(now - _since(worker, now), half_life_s)
    worker.rep_good = (worker.rep_good or 0.0) * factor + event.good
    worker.rep_bad = (worker.rep_bad or 0.0) * factor + event.bad
    worker.rep_at = now
    return score(worker.rep_good, worker.rep_bad)
