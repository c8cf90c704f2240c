"""Throttling clients whose jobs keep failing for their own input.

Each input failure (a job refused at submit by the input checks, or one confirmed bad on
workers) adds 1 to the client's score; the score halves every ``half_life_s``. While it is at
or above ``limit`` the client's submits get 429 with Retry-After: the time for the score to
fade below the limit. Workers are never the ones who pay for a client's bad input.
"""

from __future__ import annotations

import math

from orchestrator.exceptions import TooManyRequests
from orchestrator.services.reputation import decay_factor
from orchestrator.store.models import Client


def current(client: Client, now: float, half_life_s: float) -> float:
    """The client's input-failure score now (decayed; nothing is written)."""
    at = client.input_failures_at or now
    return (client.input_failures or 0.0) * decay_factor(now - at, half_life_s)


def record_input_failure(client: Client, now: float, half_life_s: float) -> float:
    """Decay the score to ``now`` and add one failure; the caller holds the row's lock."""
    client.input_failures = current(client, now, half_life_s) + 1.0
    client.input_failures_at = now
    return client.input_failures


def seconds_until_below(score: float, limit: float, half_life_s: float) -> float:
    """Seconds until ``score`` has decayed below ``limit`` (0 if it already is)."""
    if score < limit:
        return 0.0
    # score * 0.5 ** (t / h) < limit  <=>  t > h * log2(score / limit); a hair past it.
    return half_life_s * math.log2(score / limit) + 1.0


def check(client: Client, now: float, limit: float, half_life_s: float) -> None:
    """Raise TooManyRequests while the client's input-failure score is at the limit."""
    score = current(client, now, half_life_s)
    if score < limit:
        return
    wait_s = seconds_until_below(score, limit, half_life_s)
    raise TooManyRequests(
        f"too many of your recent jobs failed for their input ({score:.1f}, limit {limit:g}); "
        f"fix the input (see each job's failure_reason) and submit again in {math.ceil(wait_s)} s",
        retry_after_s=wait_s,
    )
