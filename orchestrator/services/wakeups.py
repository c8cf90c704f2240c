"""Wake a worker's lease long-poll as soon as dispatch assigns it work.

Dispatch runs in a thread; the long-polls wait on the event loop. ``notify`` is thread-safe.
Waiters also wake every ``WAKE_FALLBACK_S`` to look at the store, which covers assignments
made by another orchestrator replica sharing the database.
"""

from __future__ import annotations

import asyncio
import contextlib

WAKE_FALLBACK_S = 1.0


class WakeHub:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def notify(self, worker_id: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._set, worker_id)

    def _set(self, worker_id: str) -> None:
        self._events.setdefault(worker_id, asyncio.Event()).set()

    async def wait(self, worker_id: str, timeout_s: float) -> None:
        event = self._events.setdefault(worker_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=min(timeout_s, WAKE_FALLBACK_S))
        event.clear()
