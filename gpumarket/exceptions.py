"""Every error the SDK raises on purpose.

    GpumarketAPIError (= protocol.problems.ProblemError)
        the orchestrator answered with a problem document: .status, .code, .detail,
        .retryable (429 and 5xx)
    JobFailed (Exception)
        ``wait``: the job ended without a result (failed, cancelled or expired); .job
    JobTimeout (TimeoutError)
        ``wait``: the job was not final within ``timeout_s``

Network failures are httpx's own (``httpx.TransportError`` and its subclasses). ``wait`` and
``wait_many`` try again after those and after retryable answers (429, 5xx) until their
``timeout_s``, and then raise the last of them (``_calls.Outage``).
"""

from __future__ import annotations

from typing import Any

from protocol.problems import ProblemError

GpumarketAPIError = ProblemError


class JobFailed(Exception):
    """The job ended without a result (failed, cancelled or expired)."""

    def __init__(self, job: dict[str, Any]) -> None:
        # ``fault`` says whose: "input" (fix the input before submitting again), "worker", "none".
        fault = f" ({job['fault']} fault)" if job.get("fault") else ""
        super().__init__(f"job {job['id']} {job['state']}{fault}: {job.get('failure_reason')}")
        self.job = job
        self.fault: str | None = job.get("fault")


class JobTimeout(TimeoutError):
    """The job was not final within the time ``wait`` was given."""
