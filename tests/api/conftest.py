"""API fixtures: the real FastAPI app in-process behind httpx.ASGITransport, and HTTP helpers.

pytest-asyncio is not installed, so each test is a sync function that hands an async body to
``run_api`` (fake clock) or ``run_live_api`` (wall clock, for the lease long-poll). The app's
lifespan runs around the body, as under uvicorn. ASGITransport re-raises any exception the app
lets escape, so an accidental 500 fails the test loudly instead of passing as "some 5xx".
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from orchestrator.app import create_app
from orchestrator.config import Settings
from orchestrator.services.auth import Principal
from orchestrator.store import Store
from orchestrator.wiring import Services, build_services
from protocol import Offer
from tests.support import (
    EMBED_MODEL,
    TestWorker,
    agreed_price,
    agreed_prompt_price,
    completion,
    register_request,
)

PROBLEM_JSON = "application/problem+json"
BASE_URL = "http://orchestrator.test"
TEXTS = ["a cat sat on the mat", "GPUs are scarce"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def inference_spec(**overrides: Any) -> dict[str, Any]:
    """A valid inference job body: two texts at up to 1000 wei per text."""
    return {
        "type": "inference",
        "model": EMBED_MODEL,
        "input": {"texts": list(TEXTS)},
        "max_price_wei_per_unit": "1000",
        **overrides,
    }


def assert_problem(resp: httpx.Response, status: int, code: str, *says: str) -> dict[str, Any]:
    """An RFC 9457 problem with this status and code whose detail mentions each of ``says``."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM_JSON), resp.headers
    body: dict[str, Any] = resp.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"/problems/{code}"
    assert isinstance(body["title"], str) and body["title"]
    detail = body["detail"]
    assert isinstance(detail, str) and len(detail) > 10, detail
    for fragment in says:
        assert fragment in detail, f"{fragment!r} not in {detail!r}"
    if status == 401:
        assert resp.headers["www-authenticate"] == "Bearer"
    return body


@dataclass
class HttpWorker:
    """A worker registered over HTTP: its key, id and session token."""

    account: LocalAccount
    worker_id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)

    @property
    def address(self) -> str:
        return str(self.account.address)

    def signer(self) -> TestWorker:
        return TestWorker(Principal("worker", self.worker_id), self.account, self.token)


@dataclass
class Api:
    """An httpx client on the app, plus the steps most tests take over HTTP."""

    http: httpx.AsyncClient
    services: Services

    @property
    def operator(self) -> dict[str, str]:
        return bearer(self.services.settings.resolve_admin_token())

    async def new_client(self, name: str = "client") -> dict[str, str]:
        """Make a client account through POST /v1/clients; returns its auth headers."""
        resp = await self.http.post("/v1/clients", json={"name": name}, headers=self.operator)
        assert resp.status_code == 201, resp.text
        return bearer(resp.json()["api_key"])

    async def challenge(self, account: LocalAccount) -> dict[str, Any]:
        resp = await self.http.post("/v1/workers/challenge", json={"address": account.address})
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    async def register_worker(
        self,
        offers: list[Offer] | None = None,
        max_concurrency: int = 1,
        gpu_vram_mb: int | None = None,
    ) -> HttpWorker:
        """challenge -> sign -> register, all over HTTP, with a fresh key."""
        account = Account.create()
        challenge = await self.challenge(account)
        req = register_request(
            account,
            challenge["nonce"],
            challenge["message"],
            offers=offers,
            max_concurrency=max_concurrency,
            gpu_vram_mb=gpu_vram_mb,
        )
        resp = await self.http.post("/v1/workers/register", json=req.model_dump(mode="json"))
        assert resp.status_code == 201, resp.text
        body = resp.json()
        return HttpWorker(account, body["worker_id"], body["session_token"])

    async def submit(self, client: dict[str, str], **overrides: Any) -> dict[str, Any]:
        resp = await self.http.post("/v1/jobs", json=inference_spec(**overrides), headers=client)
        assert resp.status_code == 201, resp.text
        job: dict[str, Any] = resp.json()
        return job

    async def job(self, client: dict[str, str], job_id: str) -> dict[str, Any]:
        resp = await self.http.get(f"/v1/jobs/{job_id}", headers=client)
        assert resp.status_code == 200, resp.text
        job: dict[str, Any] = resp.json()
        return job

    async def lease(
        self, worker: HttpWorker, wait_s: float = 0.0, max_jobs: int = 1
    ) -> list[dict[str, Any]]:
        resp = await self.http.post(
            "/v1/workers/lease",
            json={"wait_s": wait_s, "max_jobs": max_jobs},
            headers=worker.headers,
        )
        assert resp.status_code == 200, resp.text
        jobs: list[dict[str, Any]] = resp.json()["jobs"]
        return jobs

    async def complete(
        self,
        worker: HttpWorker,
        job_id: str,
        attempt: int,
        output: dict[str, Any] | None = None,
        units: int = len(TEXTS),
    ) -> httpx.Response:
        """Report a correctly signed inline result for ``attempt``."""
        output = output if output is not None else {"embeddings": [[0.5, -0.25]] * units}
        req = completion(
            worker.signer(),
            job_id,
            attempt,
            output,
            units,
            price_wei_per_unit=agreed_price(self.services, job_id),
            prompt_price_wei_per_unit=agreed_prompt_price(self.services, job_id),
        )
        return await self.http.post(
            f"/v1/workers/jobs/{job_id}/complete",
            json=req.model_dump(mode="json"),
            headers=worker.headers,
        )

    async def upload(self, principal: dict[str, str], data: bytes) -> dict[str, Any]:
        resp = await self.http.post("/v1/blobs", content=data, headers=principal)
        assert resp.status_code == 201, resp.text
        info: dict[str, Any] = resp.json()
        return info


ApiBody = Callable[[Api], Awaitable[None]]
RunApi = Callable[[ApiBody], None]


async def serve(services: Services, body: ApiBody) -> None:
    """Run ``body`` against an app over ``services`` (the fixtures below, or a test's own)."""
    app = create_app(services.settings, services=services, run_sweeper=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
            await body(Api(http, services))


@pytest.fixture
def run_api(services: Services) -> RunApi:
    """Run an async test body against the app over the fake clock (``clock`` fixture)."""

    def run(body: ApiBody) -> None:
        asyncio.run(serve(services, body))

    return run


@pytest.fixture
def run_any_api(any_services: Services) -> RunApi:
    """Like ``run_api``, once over SQLite and once over PostgreSQL."""

    def run(body: ApiBody) -> None:
        asyncio.run(serve(any_services, body))

    return run


@pytest.fixture
def live_services(settings: Settings, sqlite_store: Store) -> Services:
    """Services on the wall clock: the lease long-poll waits in real seconds."""
    return build_services(settings, store=sqlite_store, clock=time.time, rng=random.Random(7))


@pytest.fixture
def run_live_api(live_services: Services) -> RunApi:
    def run(body: ApiBody) -> None:
        asyncio.run(serve(live_services, body))

    return run


async def call_until_hang_up(
    app: Any,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
    hang_up: asyncio.Event,
    query: str = "",
) -> list[dict[str, Any]]:
    """POST ``body`` (or, with None, GET) to ``path`` (with ``query``) straight through ASGI,
    as a client that closes its connection once ``hang_up`` is set (httpx's transport cannot
    hang up mid-request). Returns what the app sent back."""
    sent_body = False
    answer: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            data = b"" if body is None else json.dumps(body).encode()
            return {"type": "http.request", "body": data, "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        answer.append(message)

    raw = [(b"host", b"orchestrator.test"), (b"content-type", b"application/json")]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET" if body is None else "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 40000),
        "server": ("orchestrator.test", 80),
    }
    await app(scope, receive, send)
    return answer


AppBody = Callable[[Any, Api], Awaitable[None]]


def serve_with_app(services: Services, body: AppBody) -> None:
    """Like ``run_api``, with the app itself handed to ``body`` too (for raw ASGI calls)."""

    async def main() -> None:
        app = create_app(services.settings, services=services, run_sweeper=False)
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http,
        ):
            await body(app, Api(http, services))

    asyncio.run(main())
