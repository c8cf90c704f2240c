"""A worker that knows several orchestrator replicas fails over when the one it uses dies,
keeping its session: two real orchestrator apps on one SQLite file, in-process; the dead
replica is a host whose connections are refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from orchestrator.app import create_app
from orchestrator.config import Settings
from orchestrator.store import Store
from orchestrator.wiring import Services, build_services
from protocol import Offer
from tests.support import EMBED_MODEL, hardware
from worker.client import OrchestratorClient, split_urls
from worker.config import WorkerSettings

URLS = ["http://replica-a.test", "http://replica-b.test"]


class Replicas(httpx.AsyncBaseTransport):
    """Routes each replica's host to its app; a host in ``dead`` refuses connections."""

    def __init__(self, apps: dict[str, httpx.ASGITransport]) -> None:
        self.apps = apps
        self.dead: set[str] = set()
        self.served: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host in self.dead:
            raise httpx.ConnectError("connection refused", request=request)
        self.served.append(host)
        return await self.apps[host].handle_async_request(request)


@contextlib.asynccontextmanager
async def two_replicas(settings: Settings, db: Path) -> AsyncIterator[tuple[Replicas, Services]]:
    stores = [Store(f"sqlite:///{db}") for _ in URLS]
    replicas = [
        build_services(settings, store=s, clock=time.time, rng=random.Random(3)) for s in stores
    ]
    apps = [create_app(settings, services=svc, run_sweeper=False) for svc in replicas]
    try:
        async with contextlib.AsyncExitStack() as stack:
            for app in apps:
                await stack.enter_async_context(app.router.lifespan_context(app))
            hosts = {
                httpx.URL(url).host: httpx.ASGITransport(app=app)
                for url, app in zip(URLS, apps, strict=True)
            }
            yield Replicas(hosts), replicas[0]
    finally:
        for s in stores:
            s.dispose()


def test_orchestrator_urls_are_split_and_kept_once() -> None:
    assert split_urls("http://a:1, http://b:2/,http://a:1") == ["http://a:1", "http://b:2"]
    assert split_urls(["http://a:1", "http://b:2,http://c:3"]) == [
        "http://a:1",
        "http://b:2",
        "http://c:3",
    ]
    settings = WorkerSettings(orchestrator_url="http://a:1/, http://b:2")
    assert settings.orchestrator_urls == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError, match="comma-separated"):
        WorkerSettings(orchestrator_url="http://a:1,b:2")


def test_a_worker_fails_over_to_another_replica_with_its_session(
    settings: Settings, tmp_path: Path
) -> None:
    patient = settings.model_copy(update={"long_poll_max_s": 2.0})

    async def body() -> None:
        async with two_replicas(patient, tmp_path / "market.db") as (net, services):
            _, key = services.auth.create_client("tests", time.time())
            account = Account.create()
            client = OrchestratorClient(URLS, account, transport=net)
            try:
                reg = await client.register(
                    hardware(),
                    [Offer(job_type="inference", model=EMBED_MODEL, price_wei_per_unit=1)],
                    1,
                )
                first = client.url
                net.dead.add(httpx.URL(first).host)  # the replica it registered with dies
                async with httpx.AsyncClient(
                    transport=net, base_url=URLS[0] if first != URLS[0] else URLS[1]
                ) as http:
                    resp = await http.post(
                        "/v1/jobs",
                        json={
                            "type": "inference",
                            "model": EMBED_MODEL,
                            "input": {"texts": ["hello"]},
                            "max_price_wei_per_unit": "10",
                        },
                        headers={"Authorization": f"Bearer {key}"},
                    )
                    assert resp.status_code == 201, resp.text
                    job_id = resp.json()["id"]
                leased = await client.lease(max_jobs=1, wait_s=1.0)
                assert client.url != first
                assert [j.job_id for j in leased] == [job_id]
                assert client.registration is not None
                assert client.registration.worker_id == reg.worker_id  # no new session
                # Every replica gone: the caller sees the connection error (and backs off).
                net.dead.add(httpx.URL(client.url).host)
                with pytest.raises(httpx.ConnectError):
                    await client.heartbeat([])
            finally:
                await client.aclose()

    asyncio.run(body())


def test_workers_spread_over_the_replicas() -> None:
    firsts = set()
    for _ in range(40):
        client = OrchestratorClient(URLS, Account.create())
        firsts.add(client.url)
        asyncio.run(client.aclose())
    assert firsts == set(URLS)


def test_a_failure_reason_with_a_nul_character_is_sent_without_it() -> None:
    """The orchestrator refuses a NUL in a failure reason (422); the worker's client sends it
    as a visible ``\\0`` instead, so the job is still given up."""
    sent: list[dict[str, object]] = []

    def orchestrator(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"job_id": "j", "state": "queued"})

    client = OrchestratorClient(
        "http://orchestrator.test", Account.create(), transport=httpx.MockTransport(orchestrator)
    )
    client._token = "session"
    asyncio.run(client.fail("j", 1, True, "decoder said \x00 here"))
    assert sent[0]["reason"] == "decoder said \\0 here"
