"""Rate limits on unauthenticated routes: a token bucket per source address.

Registration and its challenge need no credentials, so they are what anyone can flood (each
registration is a row, a signature check and a chain read). Each source address gets a bucket
of ``burst`` requests that refills at ``rate_per_s``; a request that finds it empty is refused
with 429 and a ``Retry-After`` of the seconds until one token is back.

Buckets live in this process: behind several replicas the limit is per replica, which bounds
the rate all the same. At most ``MAX_TRACKED_SOURCES`` addresses are remembered (the least
recently seen are forgotten first, which only ever lets a request through).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

from orchestrator.exceptions import TooManyRequests

MAX_TRACKED_SOURCES = 100_000


@dataclass
class _Bucket:
    tokens: float
    at: float  # unix seconds of the last refill


class RateLimiter:
    """``burst`` requests at once per key, refilled at ``rate_per_s``; rate 0 is no limit."""

    def __init__(self, rate_per_s: float, burst: int, *, what: str) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.what = what
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str, now: float) -> None:
        """Spend one request of ``key``'s bucket, or raise TooManyRequests (429)."""
        if self.rate_per_s <= 0:
            return
        with self._lock:
            bucket = self._buckets.pop(key, None) or _Bucket(float(self.burst), now)
            elapsed = max(0.0, now - bucket.at)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate_per_s)
            bucket.at = now
            self._buckets[key] = bucket  # most recently seen last
            while len(self._buckets) > MAX_TRACKED_SOURCES:
                self._buckets.popitem(last=False)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait_s = math.ceil((1.0 - bucket.tokens) / self.rate_per_s)
        per_min = self.rate_per_s * 60
        raise TooManyRequests(
            f"too many {self.what} from {key}: at most {self.burst} at once and "
            f"{per_min:g} per minute per address; retry in {wait_s} s",
            retry_after_s=wait_s,
        )
