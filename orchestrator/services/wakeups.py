"""Wake long-polls as soon as something they wait for happens: a worker's lease poll when
dispatch assigns it work, a client's job poll when the job changes state.

Dispatch and commits run in threads; the long-polls wait on the event loop. ``notify`` and
``notify_waiting`` are thread-safe. Waiters also wake every ``WAKE_FALLBACK_S`` to look at the
store, which covers changes made by another orchestrator replica sharing the database.
"""

from __future__ import annotations

import asyncio
import contextlib

WAKE_FALLBACK_S = 1.0


class WakeHub:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}
        # Keys of short-lived waits (one job): counted, so their events go when unwatched.
        self._watchers: dict[str, int] = {}
        # Waits on several keys at once (a client waiting on many jobs): key -> their waits.
        self._groups: dict[str, set[_GroupWait]] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def notify(self, worker_id: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._set, worker_id)

    def notify_waiting(self, key: str) -> None:
        """Wake the waiters on ``key``, if any (nothing is kept for a key nobody watches)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._set_if_watched, key)

    def _set_if_watched(self, key: str) -> None:
        event = self._events.get(key)
        if event is not None and key in self._watchers:
            event.set()
        for group in self._groups.get(key, ()):
            group.fired.add(key)
            group.event.set()

    async def watch_any(self, keys: list[str], timeout_s: float) -> set[str]:
        """Wait up to ``timeout_s`` (at most ``WAKE_FALLBACK_S``) for ``notify_waiting`` on
        any of ``keys``: one event for the lot, not one wait per key. Returns the keys that
        were notified (empty after a timeout: then look at every key, as another replica's
        changes wake no one here)."""
        wait = _GroupWait()
        for key in keys:
            self._groups.setdefault(key, set()).add(wait)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wait.event.wait(), timeout=min(timeout_s, WAKE_FALLBACK_S))
        finally:
            for key in keys:
                group = self._groups.get(key)
                if group is not None:
                    group.discard(wait)
                    if not group:
                        del self._groups[key]
        return wait.fired

    async def watch(self, key: str, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` (at most ``WAKE_FALLBACK_S``) for ``notify_waiting(key)``;
        the key's event is dropped once its last watcher leaves."""
        self._watchers[key] = self._watchers.get(key, 0) + 1
        event = self._events.setdefault(key, asyncio.Event())
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=min(timeout_s, WAKE_FALLBACK_S))
        finally:
            self._watchers[key] -= 1
            if self._watchers[key] == 0:
                del self._watchers[key]
                self._events.pop(key, None)
            else:
                event.clear()

    def _set(self, worker_id: str) -> None:
        self._events.setdefault(worker_id, asyncio.Event()).set()

    async def wait(self, worker_id: str, timeout_s: float) -> None:
        event = self._events.setdefault(worker_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=min(timeout_s, WAKE_FALLBACK_S))
        event.clear()


class _GroupWait:
    """One ``watch_any``: its event and the keys that set it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.fired: set[str] = set()
