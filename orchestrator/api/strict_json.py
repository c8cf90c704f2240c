"""JSON request bodies parsed by pydantic-core instead of the standard library.

The stdlib parser accepts ``NaN`` and ``Infinity``, which are not JSON (RFC 8259) and which no
response can carry back, and it recurses on the C stack: eth-account imports py_ecc, which
raises the interpreter's recursion limit to 100000, so a few hundred kB of nested brackets
overflowed the stack and killed the process. pydantic-core's parser refuses both and caps
nesting itself; anything it refuses becomes a 400 ``malformed_json`` problem.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

from orchestrator.exceptions import PayloadTooLarge

MAX_JSON_BODY_BYTES = 16 * 1024 * 1024


class StrictJSONRequest(Request):
    async def body(self) -> bytes:
        """The body, refused with 413 past ``MAX_JSON_BODY_BYTES`` before it is all in memory
        (files go to /v1/blobs, which streams to disk)."""
        if not hasattr(self, "_body"):
            chunks: list[bytes] = []
            size = 0
            async for chunk in self.stream():
                size += len(chunk)
                if size > MAX_JSON_BODY_BYTES:
                    # FastAPI turns anything but an HTTPException here into a bare 400, so
                    # the domain error rides along as the cause for the problem handler.
                    too_large = PayloadTooLarge(
                        f"request body is over {MAX_JSON_BODY_BYTES} bytes; "
                        "upload large inputs with POST /v1/blobs and pass input_blob",
                        limit_bytes=MAX_JSON_BODY_BYTES,
                    )
                    raise HTTPException(413, too_large.detail) from too_large
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body, allow_inf_nan=False)
            except ValueError as exc:
                # FastAPI reports a JSONDecodeError as a json_invalid validation error.
                raise json.JSONDecodeError(str(exc), body.decode(errors="replace"), 0) from exc
        return self._json


class StrictJSONRoute(APIRoute):
    """Route class for every router: its handlers see a ``StrictJSONRequest``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_json_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_json_handler
