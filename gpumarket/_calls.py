"""The client REST API as data, shared by ``Client`` and ``AsyncClient``: each call is a
``Call`` (method, path, query, JSON body, headers), and each answer is read by ``read``.
No I/O here, so the two clients send the same requests and cannot drift apart."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from gpumarket.exceptions import JobFailed, JobTimeout
from protocol.problems import ProblemError

FINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "expired"})
OCTET_STREAM = {"Content-Type": "application/octet-stream"}
LONG_POLL_S = 20.0
LONG_POLL_MARGIN_S = 2.0  # the long-poll ends this long before the client's read timeout


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] | None = None


def _job_path(job_id: str, suffix: str = "") -> str:
    # Quoted: an id typed at a shell must not be able to reach another route ("../x").
    return f"/v1/jobs/{quote(job_id, safe='')}{suffix}"


def submit(spec: dict[str, Any], idempotency_key: str | None) -> Call:
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    return Call("POST", "/v1/jobs", json=spec, headers=headers)


SUBMIT_BATCH_MAX = 500  # jobs per POST /v1/jobs/batch (the orchestrator's MAX_SUBMIT_BATCH)
WAIT_BATCH_MAX = 1000  # ids per POST /v1/jobs/wait (MAX_WAIT_JOBS)


def submit_batch(specs: list[dict[str, Any]]) -> Call:
    """Many jobs in one request; each spec may carry its own ``idempotency_key``."""
    return Call("POST", "/v1/jobs/batch", json={"jobs": specs})


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def get_job(job_id: str, *, wait_s: float = 0.0, while_state: str | None = None) -> Call:
    """With ``wait_s``, the orchestrator answers once the job leaves ``while_state`` (or is
    final), or after ``wait_s`` seconds: a long-poll instead of polling."""
    params: dict[str, Any] = {}
    if wait_s > 0:
        params["wait_s"] = round(wait_s, 3)
        if while_state:
            params["while_state"] = while_state
    return Call("GET", _job_path(job_id), params=params or None)


def get_result(job_id: str) -> Call:
    return Call("GET", _job_path(job_id, "/result"))


def cancel(job_id: str) -> Call:
    return Call("POST", _job_path(job_id, "/cancel"))


def list_page(state: str | None, limit: int, cursor: str | None) -> Call:
    params: dict[str, Any] = {"limit": limit}
    if state:
        params["state"] = state
    if cursor:
        params["cursor"] = cursor
    return Call("GET", "/v1/jobs", params=params)


def account() -> Call:
    return Call("GET", "/v1/account")


def payer_challenge(address: str) -> Call:
    return Call("POST", "/v1/account/payer/challenge", json={"address": address})


def link_payer(private_key: str | bytes, address: str, challenge: dict[str, Any]) -> Call:
    """Step 2 of linking a payer: the challenge signed here, locally; the key is not sent."""
    from protocol.signing import sign_registration

    body = {
        "address": address,
        "nonce": challenge["nonce"],
        "signature": sign_registration(private_key, challenge["message"]),
    }
    return Call("POST", "/v1/account/payer", json=body)


UPLOAD_BLOB = Call("POST", "/v1/blobs", headers=OCTET_STREAM)


def download_blob(sha256: str) -> Call:
    return Call("GET", f"/v1/blobs/{quote(sha256, safe='')}")


def check(response: httpx.Response) -> None:
    """Raise the orchestrator's problem document, if the answer is one. The body must be read."""
    if not response.is_success:
        raise ProblemError.from_body(response.status_code, response.content)


def read(response: httpx.Response) -> Any:
    """The JSON body of a successful answer (None when empty), else ProblemError."""
    check(response)
    return response.json() if response.content else None


class Waiting:
    """The decisions of ``wait``, for both clients: is the job done, and how long to sleep.
    Times in seconds, on the monotonic clock."""

    def __init__(self, job_id: str, timeout_s: float, poll_s: float) -> None:
        self.job_id = job_id
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.deadline = time.monotonic() + timeout_s

    def succeeded(self, job: dict[str, Any]) -> bool:
        """True once the job has a result; JobFailed if it ended without one, JobTimeout
        past the deadline; False while it may still succeed."""
        if job["state"] == "succeeded":
            return True
        if job["state"] in FINAL_STATES:
            raise JobFailed(job)
        if time.monotonic() >= self.deadline:
            raise JobTimeout(f"job {self.job_id} still {job['state']} after {self.timeout_s:g} s")
        return False

    def pause_s(self) -> float:
        return max(0.0, min(self.poll_s, self.deadline - time.monotonic()))

    def long_poll(self, job: dict[str, Any], read_timeout_s: float | None = None) -> Call:
        """The next look at the job: held by the orchestrator until its state changes, for
        at most ``LONG_POLL_S``, what is left, and a margin inside the client's read timeout
        (``read_timeout_s``; None: no limit), so the wait never looks like a dead server."""
        longest = LONG_POLL_S
        if read_timeout_s is not None:
            longest = min(longest, max(0.0, read_timeout_s - LONG_POLL_MARGIN_S))
        wait_s = max(0.0, min(longest, self.deadline - time.monotonic()))
        return get_job(self.job_id, wait_s=wait_s, while_state=str(job["state"]))


RETRY_FIRST_S = 0.25
RETRY_MAX_S = 5.0


class Outage:
    """A wait riding out an orchestrator that is away for a while (restarting, a replica
    stopping behind a load balancer, a proxy answering 502/503): its reads are safe to repeat,
    so a network failure or a retryable answer (429, 5xx) is tried again after a pause that
    doubles from ``RETRY_FIRST_S`` to ``RETRY_MAX_S`` (or the answer's ``Retry-After``),
    until the wait's own deadline; then that failure is raised, not a timeout that would
    blame the job. Any other error (401, 404, ...) is raised at once."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._next_s = RETRY_FIRST_S

    def pause_after(self, error: Exception) -> float:
        """Seconds to sleep before the next try after ``error``; re-raises it when it is
        not transient or the wait has no time left for another try."""
        transient = isinstance(error, httpx.TransportError) or (
            isinstance(error, ProblemError) and error.retryable
        )
        left = self.deadline - time.monotonic()
        if not transient or left <= 0:
            raise error
        pause = self._next_s
        if isinstance(error, ProblemError) and error.retry_after_s is not None:
            pause = max(pause, error.retry_after_s)
        self._next_s = min(self._next_s * 2, RETRY_MAX_S)
        return min(pause, left)

    def over(self) -> None:
        """An answer came: the next outage starts from the shortest pause again."""
        self._next_s = RETRY_FIRST_S


def generate_spec(
    model: str,
    *,
    prompt: str | None,
    messages: list[dict[str, str]] | None,
    max_tokens: int,
    temperature: float,
    seed: int,
    stop: list[str] | None,
    max_price_wei_per_unit: int | str,
    preference: str | None,
) -> dict[str, Any]:
    """The job spec of a generation (see ``protocol.generation.GenerationInput``)."""
    generation: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    if messages is not None:
        generation["messages"] = messages
    if prompt is not None:
        generation["prompt"] = prompt
    if stop:
        generation["stop"] = stop
    spec: dict[str, Any] = {
        "type": "generate",
        "model": model,
        "generation": generation,
        "max_price_wei_per_unit": str(max_price_wei_per_unit),
    }
    if preference is not None:
        spec["preference"] = preference
    return spec


def stream_job(job_id: str) -> Call:
    return Call("GET", _job_path(job_id, "/stream"))


def stream_event(line: str) -> dict[str, Any] | None:
    """One server-sent event's data (``data: {...}``), or None for any other line."""
    if not line.startswith("data:"):
        return None
    parsed: dict[str, Any] = json.loads(line[5:].strip())
    return parsed


def wait_jobs(job_ids: list[str], wait_s: float, return_when: str = "any") -> Call:
    """One long-poll over many jobs (``POST /v1/jobs/wait``)."""
    body = {"job_ids": job_ids, "wait_s": round(wait_s, 3), "return_when": return_when}
    return Call("POST", "/v1/jobs/wait", json=body)


class WaitingMany:
    """The decisions of ``wait_many``, for both clients: which jobs are still open, the next
    long-poll over them, and each job's outcome once final. Times in seconds (monotonic)."""

    def __init__(self, job_ids: list[str], timeout_s: float) -> None:
        self.job_ids = list(job_ids)
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.open = list(dict.fromkeys(job_ids))
        self.outcomes: dict[str, dict[str, Any]] = {}

    @property
    def done(self) -> bool:
        return not self.open

    def next_call(self, read_timeout_s: float | None = None) -> Call:
        """A long-poll over the open jobs (the first ``WAIT_BATCH_MAX``): answered once all of
        them are final, or after the long-poll's time, with every job final by then. The
        caller wants them all: an answer per finished batch of jobs would cost a request (and a
        read of every open job's state) each time some finish."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise JobTimeout(
                f"{len(self.open)} of {len(self.outcomes) + len(self.open)} jobs still not "
                f"final after {self.timeout_s:g} s (first: {self.open[0]})"
            )
        longest = LONG_POLL_S
        if read_timeout_s is not None:
            longest = min(longest, max(0.0, read_timeout_s - LONG_POLL_MARGIN_S))
        return wait_jobs(self.open[:WAIT_BATCH_MAX], max(0.0, min(longest, left)), "all")

    def take(self, answer: dict[str, Any]) -> None:
        """Note the final jobs of a ``/v1/jobs/wait`` answer: a result, or the job's view."""
        for result in answer["results"]:
            self.outcomes[result["job_id"]] = result
        for job in answer["jobs"]:
            self.outcomes[job["id"]] = job
        self.open = [i for i in self.open if i not in self.outcomes]

    def in_order(self) -> list[dict[str, Any]]:
        return [self.outcomes[i] for i in self.job_ids]
