"""The worker's side of the REST API: register, heartbeat, lease, report, vouchers. Outbound only.

All calls have named timeouts; the lease long-poll's read timeout is its wait plus a margin.

A worker may know several replicas of one orchestrator (one database behind them). It talks to
one at a time, picked from its address so that workers spread over the replicas, and when that
one does not answer (connection refused or reset, a timeout) it tries the next at once, with the
same session: the session, its leases and its vouchers live in the shared database.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount
from pydantic import BaseModel, ConfigDict, Field

from contracts.deploy import Deployment
from protocol import (
    ChallengeResponse,
    CompleteRequest,
    FailRequest,
    Fault,
    HardwareDescriptor,
    HeartbeatResponse,
    JobRef,
    LeasedJob,
    LeaseResponse,
    Offer,
    RegisterRequest,
    RegisterResponse,
    ResultView,
)
from protocol.batches import (
    BatchCompleteItem,
    BatchCompleteRequest,
    BatchCompleteResponse,
    StreamBatchRequest,
    StreamBatchResponse,
    StreamPart,
    StreamPartItem,
)
from protocol.generation import StreamChunk
from protocol.problems import ProblemError
from protocol.signing import sign_registration
from protocol.vouchers import ChecksumAddressStr, Voucher

log = logging.getLogger("gpumarket.worker.client")

DEFAULT_TIMEOUT = httpx.Timeout(15.0, connect=5.0)
# Errors after which another replica is worth a try: this one did not answer at all.
UNREACHABLE = (httpx.TransportError, httpx.TimeoutException)
LONG_POLL_MARGIN_S = 10.0
DOWNLOAD_CHUNK_BYTES = 1 << 20


OrchestratorError = ProblemError  # the orchestrator's problem document: status, code, detail


class SignedVoucher(BaseModel):
    """The latest cumulative voucher of one payer to this worker, as the orchestrator signed it
    (EIP-712, 65 bytes as 0x-hex) for the broker ``payment_broker`` on chain ``chain_id``."""

    model_config = ConfigDict(frozen=True)

    voucher: Voucher
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")
    chain_id: int = Field(ge=1)
    payment_broker: ChecksumAddressStr


class _VoucherList(BaseModel):
    vouchers: list[SignedVoucher]


def _check(response: httpx.Response) -> None:
    if not response.is_success:
        raise ProblemError.from_body(response.status_code, response.content)


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """Orchestrator URLs from a comma-separated string or a list (each may hold commas)."""
    parts = [urls] if isinstance(urls, str) else list(urls)
    found = [u.strip().rstrip("/") for part in parts for u in part.split(",") if u.strip()]
    return list(dict.fromkeys(found))  # once each, first mention first


class OrchestratorClient:
    def __init__(
        self,
        base_url: str | Sequence[str],
        account: LocalAccount,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        self.account = account
        self.urls = split_urls(base_url)
        if not self.urls:
            raise ValueError("give at least one orchestrator URL")
        self._clients = [
            httpx.AsyncClient(base_url=url, timeout=timeout, transport=transport)
            for url in self.urls
        ]
        # Spread workers over the replicas; the same worker starts on the same one each time.
        self._current = int(account.address, 16) % len(self.urls)
        self._token: str | None = None
        self.registration: RegisterResponse | None = None

    @property
    def url(self) -> str:
        """The replica this worker talks to now."""
        return self.urls[self._current]

    @property
    def _http(self) -> httpx.AsyncClient:
        return self._clients[self._current]

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()

    def _fail_over(self, exc: Exception) -> None:
        if len(self.urls) == 1:
            return
        dead = self.url
        self._current = (self._current + 1) % len(self.urls)
        log.warning(
            "orchestrator %s did not answer (%s); using %s", dead, type(exc).__name__, self.url
        )

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send to the current replica; if it does not answer, to each other one in turn.
        Raises the last error when none answers."""
        for tried in range(len(self.urls)):
            try:
                return await self._http.request(method, path, **kwargs)
            except UNREACHABLE as exc:
                if tried == len(self.urls) - 1:
                    raise
                self._fail_over(exc)
        raise AssertionError("unreachable")

    @property
    def registered(self) -> bool:
        """A session is open: the calls that need the worker's bearer token may be made."""
        return self._token is not None

    @property
    def _auth(self) -> dict[str, str]:
        if self._token is None:
            raise RuntimeError("register first")
        return {"Authorization": f"Bearer {self._token}"}

    async def _post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        response = await self._request("POST", path, json=body, headers=self._auth, **kwargs)
        _check(response)
        return response.json() if response.content else None

    async def register(
        self,
        hardware: HardwareDescriptor,
        offers: list[Offer],
        max_concurrency: int,
        carbon_intensity_g_per_kwh: float | None = None,
        version: str | None = None,
    ) -> RegisterResponse:
        """Prove the key with a signed challenge and start a session."""
        response = await self._request(
            "POST", "/v1/workers/challenge", json={"address": self.account.address}
        )
        _check(response)
        challenge = ChallengeResponse.model_validate(response.json())
        request = RegisterRequest(
            address=self.account.address,
            nonce=challenge.nonce,
            signature=sign_registration(self.account.key, challenge.message),
            hardware=hardware,
            offers=offers,
            max_concurrency=max_concurrency,
            carbon_intensity_g_per_kwh=carbon_intensity_g_per_kwh,
            version=version,
        )
        response = await self._request(
            "POST", "/v1/workers/register", json=request.model_dump(mode="json")
        )
        _check(response)
        self.registration = RegisterResponse.model_validate(response.json())
        self._token = self.registration.session_token
        return self.registration

    async def lease(self, max_jobs: int, wait_s: float) -> list[LeasedJob]:
        timeout = httpx.Timeout(wait_s + LONG_POLL_MARGIN_S, connect=5.0)
        body = await self._post(
            "/v1/workers/lease", {"max_jobs": max_jobs, "wait_s": wait_s}, timeout=timeout
        )
        return LeaseResponse.model_validate(body).jobs

    async def heartbeat(self, jobs: list[JobRef]) -> HeartbeatResponse:
        body = await self._post("/v1/workers/heartbeat", {"jobs": [j.model_dump() for j in jobs]})
        return HeartbeatResponse.model_validate(body)

    async def start(self, job_id: str, attempt: int) -> None:
        await self._post(f"/v1/workers/jobs/{job_id}/start", {"attempt": attempt})

    async def stream(self, job_id: str, chunk: StreamChunk) -> None:
        """Send text a generate job produced so far (the orchestrator relays it to the client)."""
        await self._post(f"/v1/workers/jobs/{job_id}/stream", chunk.model_dump(mode="json"))

    async def stream_many(self, parts: list[StreamPart]) -> list[StreamPartItem]:
        """Send several jobs' new text in one request; each part's outcome, in order."""
        request = StreamBatchRequest(parts=parts)
        body = await self._post("/v1/workers/streams", request.model_dump(mode="json"))
        return StreamBatchResponse.model_validate(body).parts

    async def complete(self, job_id: str, request: CompleteRequest) -> ResultView:
        body = await self._post(
            f"/v1/workers/jobs/{job_id}/complete", request.model_dump(mode="json")
        )
        return ResultView.model_validate(body)

    async def complete_batch(self, request: BatchCompleteRequest) -> list[BatchCompleteItem]:
        """Report many results under one signature; each job's outcome, in order."""
        body = await self._post("/v1/workers/results", request.model_dump(mode="json"))
        return BatchCompleteResponse.model_validate(body).results

    async def fail(
        self,
        job_id: str,
        attempt: int,
        retryable: bool,
        reason: str,
        fault: Fault = Fault.WORKER,
    ) -> None:
        """Give a job up, saying whose fault it is (the orchestrator checks the claim). A NUL
        in the reason (an error message can carry one) is sent as ``\\0``: it takes no NUL."""
        said = reason.replace("\x00", "\\0")[:2000] or "no reason given"
        request = FailRequest(attempt=attempt, retryable=retryable, reason=said, fault=fault)
        await self._post(f"/v1/workers/jobs/{job_id}/fail", request.model_dump())

    async def drain(self) -> None:
        await self._post("/v1/workers/drain")

    async def deregister(self) -> None:
        await self._post("/v1/workers/deregister")
        self._token = None

    async def chain_info(self) -> Deployment | None:
        """The chain and contracts the orchestrator pays through; None when it runs without
        payments (404). Needs no session."""
        response = await self._request("GET", "/v1/chain")
        if response.status_code == 404:
            return None
        _check(response)
        return Deployment.model_validate(response.json())

    async def vouchers(self) -> list[SignedVoucher]:
        """The latest cumulative voucher per payer owed to this worker (amounts in wei)."""
        response = await self._request("GET", "/v1/workers/vouchers", headers=self._auth)
        _check(response)
        return _VoucherList.model_validate(response.json()).vouchers

    async def upload(self, path: Path) -> str:
        """Stream a file to the blob store; returns its sha256."""

        async def chunks() -> AsyncIterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(DOWNLOAD_CHUNK_BYTES):
                    yield chunk

        headers = {**self._auth, "Content-Type": "application/octet-stream"}
        try:  # a stream is sent once: on failure the caller retries, on the next replica
            response = await self._http.post("/v1/blobs", content=chunks(), headers=headers)
        except UNREACHABLE as exc:
            self._fail_over(exc)
            raise
        _check(response)
        return str(response.json()["sha256"])

    async def download(self, sha256: str, dest: Path) -> Path:
        try:
            return await self._download(sha256, dest)
        except UNREACHABLE as exc:
            self._fail_over(exc)
            raise

    async def _download(self, sha256: str, dest: Path) -> Path:
        async with self._http.stream("GET", f"/v1/blobs/{sha256}", headers=self._auth) as resp:
            if not resp.is_success:
                await resp.aread()
                _check(resp)
            with dest.open("wb") as out:
                async for chunk in resp.aiter_bytes(DOWNLOAD_CHUNK_BYTES):
                    out.write(chunk)
        return dest
