"""Python SDK for job submitters: a small synchronous client over the REST API.

client = Client("http://127.0.0.1:8000", api_key="gmk_...")
job = client.submit({"type": "inference", "model": "all-MiniLM-L6-v2",
                     "input": {"texts": ["hello"]}, "max_price_wei_per_unit": "1000"})
result = client.wait(job["id"], timeout_s=60)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from protocol.problems import ProblemError

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
WAIT_POLL_S = 0.2
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "expired"})
UPLOAD_CHUNK_BYTES = 1 << 20


GpumarketAPIError = ProblemError  # the orchestrator's problem document: status, code, detail


class JobFailed(Exception):
    """The job ended without a result (failed, cancelled or expired)."""

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(f"job {job['id']} {job['state']}: {job.get('failure_reason')}")
        self.job = job


class JobTimeout(TimeoutError):
    pass


def _raise_for_problem(response: httpx.Response) -> None:
    if not response.is_success:
        raise ProblemError.from_body(response.status_code, response.content)


class Client:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        _raise_for_problem(response)
        return response.json() if response.content else None

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        job: dict[str, Any] = self._call("POST", "/v1/jobs", json=spec, headers=headers)
        return job

    def get(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}")
        return job

    def result(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}/result")
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._call("POST", f"/v1/jobs/{job_id}/cancel")
        return job

    def list(self, state: str | None = None, limit: int = 50) -> Iterator[dict[str, Any]]:
        """Every job of this client, newest first, following pages."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": limit}
            if state:
                params["state"] = state
            if cursor:
                params["cursor"] = cursor
            page = self._call("GET", "/v1/jobs", params=params)
            yield from page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def wait(self, job_id: str, timeout_s: float = 300.0) -> dict[str, Any]:
        """Block until the job is final; returns its result, raises JobFailed or JobTimeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if job["state"] == "succeeded":
                return self.result(job_id)
            if job["state"] in FINAL_STATES:
                raise JobFailed(job)
            if time.monotonic() >= deadline:
                raise JobTimeout(f"job {job_id} still {job['state']} after {timeout_s}s")
            time.sleep(WAIT_POLL_S)

    def account(self) -> dict[str, Any]:
        """Your payer and, on a paid orchestrator, what it can still be charged (wei)."""
        account: dict[str, Any] = self._call("GET", "/v1/account")
        return account

    def link_payer(self, private_key: str | bytes) -> dict[str, Any]:
        """Pay for this client's jobs from the account of ``private_key``: the key signs the
        orchestrator's challenge here, locally; only the signature is sent."""
        from eth_account import Account

        from protocol.signing import sign_registration

        address = Account.from_key(private_key).address
        challenge = self._call("POST", "/v1/account/payer/challenge", json={"address": address})
        body = {
            "address": address,
            "nonce": challenge["nonce"],
            "signature": sign_registration(private_key, challenge["message"]),
        }
        account: dict[str, Any] = self._call("POST", "/v1/account/payer", json=body)
        return account

    def upload_blob(self, path: Path) -> str:
        """Stream a file to the blob store; returns its sha256 address."""

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(UPLOAD_CHUNK_BYTES):
                    yield chunk

        headers = {"Content-Type": "application/octet-stream"}
        info = self._call("POST", "/v1/blobs", content=chunks(), headers=headers)
        return str(info["sha256"])

    def download_blob(self, sha256: str, dest: Path) -> Path:
        with self._http.stream("GET", f"/v1/blobs/{sha256}") as response:
            if not response.is_success:
                response.read()
                _raise_for_problem(response)
            with dest.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        return dest
