"""Wake long-polls as soon as something they wait for happens: a worker's lease poll when
dispatch assigns it work, a client's job poll when the job changes state.

Dispatch and commits run in threads; the long-polls wait on the event loop. ``notify`` and
``notify_waiting`` are thread-safe. Waiters also wake every ``WAKE_FALLBACK_S`` to look at the
store, which covers changes made by another orchestrator replica sharing the database.

When the server stops (``close``, on the event loop), every wait wakes at once and ``closing``
stays true: a long-poll then answers what it has instead of holding the shutdown until the
server's grace period cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from protocol import FINAL_STATES

WAKE_FALLBACK_S = 1.0
_FINAL = frozenset(state.value for state in FINAL_STATES)
JOB_KEY_PREFIX = "job:"
"""A client's wait on a job: ``job:<id>``."""
STREAM_KEY_PREFIX = "stream:"
"""A reader of a generation job's token stream: ``stream:<id>``."""


class WakeHub:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}
        # Keys of short-lived waits (one job): counted, so their events go when unwatched.
        self._watchers: dict[str, int] = {}
        # Waits on several keys at once (a client waiting on many jobs): key -> their waits.
        self._groups: dict[str, set[_GroupWait]] = {}
        self._closing = False

    @property
    def closing(self) -> bool:
        """The server is stopping: a long-poll answers now rather than wait on."""
        return self._closing

    def close(self) -> None:
        """Wake every wait now, and mark the hub closing (call on the event loop)."""
        self._closing = True
        for event in self._events.values():
            event.set()
        for groups in self._groups.values():
            for group in groups:
                group.event.set()

    def watched(self, key: str) -> bool:
        """Whether a long-poll waits on ``key`` now (``watch`` or ``watch_any``)."""
        return key in self._watchers or key in self._groups

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

    def notify_jobs(self, changed: Mapping[str, str]) -> None:
        """Wake the waiters on these jobs (id -> the state a commit left it in) and their
        streams' readers: one hop to the event loop for a whole transaction's jobs, and each
        ``watch_any`` learns the states without reading them back."""
        loop = self._loop
        if loop is None or loop.is_closed() or not changed:
            return
        loop.call_soon_threadsafe(self._jobs_changed, dict(changed))

    def _jobs_changed(self, changed: dict[str, str]) -> None:
        for job_id, state in changed.items():
            self._set_if_watched(f"{JOB_KEY_PREFIX}{job_id}", state)
            self._set_if_watched(f"{STREAM_KEY_PREFIX}{job_id}")

    def _set_if_watched(self, key: str, state: str | None = None) -> None:
        event = self._events.get(key)
        if event is not None and key in self._watchers:
            event.set()
        for group in self._groups.get(key, ()):
            # Two commits' wake-ups may arrive out of order; a final state is the last word.
            if group.fired.get(key) not in _FINAL:
                group.fired[key] = state
            group.event.set()

    async def watch_any(self, keys: list[str], timeout_s: float) -> dict[str, str | None]:
        """Wait up to ``timeout_s`` (at most ``WAKE_FALLBACK_S``) for ``notify_waiting`` on
        any of ``keys``: one event for the lot, not one wait per key. Returns the keys that
        were notified, each with the state its job was committed in (``notify_jobs``), or
        None where that is not known (another replica's change: read it). Empty after a
        timeout: then look at every key, as another replica's changes may wake no one here."""
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
        self.fired: dict[str, str | None] = {}
