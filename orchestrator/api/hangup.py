"""A client that hangs up in the middle of a request: noticed at once, not when the answer is
finally sent to no one.

The body is read first (by FastAPI, or by the route itself), so the next ASGI message of the
request is ``http.disconnect``: uvicorn sends it when the client closes its connection (and
once the response is complete, by which time the watch is over). A long-poll or a wait that
watches for it stops working for a client who is gone: a worker's lease poll stops
advertising its free slots (no job is handed to a closed connection), and an OpenAI request
waiting for its result cancels its job, which no one would read: the official ``openai``
client sends such a request again after a timeout or a dropped connection, and would
otherwise pay for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from starlette.requests import Request

from orchestrator.services.wakeups import WakeHub

log = logging.getLogger("gpumarket.orchestrator.api")


class HangUp:
    """Watches one request's connection; ``gone`` once the client has closed it.
    ``on_gone`` runs on the event loop then (to wake the request's own wait)."""

    def __init__(self, request: Request, on_gone: Callable[[], None]) -> None:
        self._request = request
        self._on_gone = on_gone
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def waking(cls, request: Request, hub: WakeHub, key: str) -> HangUp:
        """Watches a client's long-poll waiting on ``key``: a hang-up wakes that wait (not
        started yet: enter it, or ``start``)."""
        return cls(request, on_gone=lambda: hub.notify_waiting(key))

    def start(self) -> HangUp:
        self._task = asyncio.create_task(self._until_disconnected())
        self._task.add_done_callback(self._done)
        return self

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:  # not a hang-up: the request goes on, unwatched
            log.warning("cannot watch a request's connection: %r", error)
            return
        self._on_gone()

    def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    @property
    def gone(self) -> bool:
        task = self._task
        return (
            task is not None and task.done() and not task.cancelled() and task.exception() is None
        )

    async def __aenter__(self) -> HangUp:
        return self.start()

    async def __aexit__(self, *_: object) -> None:
        self.stop()

    async def _until_disconnected(self) -> None:
        with contextlib.suppress(OSError):
            while (await self._request.receive())["type"] != "http.disconnect":
                pass
