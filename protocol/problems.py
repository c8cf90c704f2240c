"""The error a client of the REST API sees: an RFC 9457 problem document, as an exception.

Shared by the SDK and the worker's client, so both read the orchestrator's errors one way.
"""

from __future__ import annotations

import json


class ProblemError(Exception):
    """The orchestrator answered with a problem document: HTTP status, code, detail."""

    def __init__(
        self, status: int, code: str, detail: str, *, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        # When the server said how long to wait (a rate limit's ``retry_after_s``), in seconds.
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        """Overloaded or down for now (429, 5xx; often a proxy in front of a restarting
        orchestrator): the same request may succeed after a pause."""
        return self.status == 429 or self.status >= 500

    @classmethod
    def from_body(cls, status: int, body: bytes) -> ProblemError:
        """Build from a response body; a body that is not a problem document is kept as text."""
        text = body.decode(errors="replace")
        try:
            doc = json.loads(text)
        except ValueError:
            return cls(status, "error", text)
        if not isinstance(doc, dict):
            return cls(status, "error", text)
        wait = doc.get("retry_after_s")
        return cls(
            status,
            str(doc.get("code", "error")),
            str(doc.get("detail", text)),
            retry_after_s=float(wait) if isinstance(wait, int | float) else None,
        )
