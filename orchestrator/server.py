"""``gpumarket orchestrator serve``'s HTTP server: uvicorn, ending the long-polls at shutdown.

uvicorn stops by closing its sockets and then waiting (up to its graceful-shutdown timeout) for
the requests in flight to finish; an idle long-poll (a worker waiting for work, a client waiting
for a job) would hold every stop for that whole timeout and then be cancelled with a traceback.
Here the shutdown first wakes every long-poll (``WakeHub.close``), which answers at once with
what it has: an empty lease, the job's state so far. Requests doing real work (a result being
recorded) still get the grace period; OpenAI requests waiting on jobs end inside it
(``orchestrator/api/routes/openai.py``, ``STOPPING_WAIT_S``).
"""

from __future__ import annotations

import contextlib
import socket
import sys
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.main import STARTUP_FAILURE

from orchestrator.services.wakeups import WakeHub

GRACEFUL_SHUTDOWN_S = 5


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, hub: WakeHub) -> None:
        super().__init__(config)
        self._hub = hub

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._hub.close()
        await super().shutdown(sockets)


def serve(application: FastAPI, *, host: str, port: int, **options: Any) -> None:
    """Serve ``application`` until SIGTERM or Ctrl-C (``options``: ``uvicorn.Config``'s).
    Exits with uvicorn's startup-failure status if it never started (a port in use)."""
    config = uvicorn.Config(
        application,
        host=host,
        port=port,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        **options,
    )
    server = _Server(config, application.state.services.hub)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C, raised again once uvicorn stopped
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
