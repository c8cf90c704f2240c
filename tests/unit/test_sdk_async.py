"""AsyncClient against the real orchestrator app in-process (httpx.ASGITransport).

The app runs with its lifespan on the fake clock (``services`` fixture); a scripted worker
registers, leases and completes over the worker API (tests.api.conftest.Api).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from gpumarket import AsyncClient, Client, GpumarketAPIError, JobFailed, JobTimeout
from orchestrator.app import create_app
from orchestrator.config import Settings
from orchestrator.wiring import Services
from tests.api.conftest import BASE_URL, TEXTS, Api, HttpWorker, inference_spec
from tests.conftest import FakeClock

Body = Callable[[Api, AsyncClient], Awaitable[None]]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """The shared test settings, with spot-check verification off: a result is final at once
    (verification would hold it for a second worker these tests do not run)."""
    return Settings(
        data_dir=tmp_path / "data",
        admin_token="operator-token-for-tests-0123456789abcdef",
        long_poll_max_s=5.0,
        max_blob_bytes=1024 * 1024,
        verify_rate=0.0,
        verify_rate_new=0.0,
    )


def run(services: Services, body: Body, api_key: str | None = None) -> None:
    """Serve the app (lifespan included) and run ``body`` with an AsyncClient on a new client's
    key, or on ``api_key``."""

    async def main() -> None:
        app = create_app(services.settings, services=services, run_sweeper=False)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
                api = Api(http, services)
                made = (await api.new_client())["Authorization"].removeprefix("Bearer ")
                key = made if api_key is None else api_key
                async with AsyncClient(BASE_URL, key, transport=transport) as client:
                    await body(api, client)

    asyncio.run(main())


async def _lease_and_complete(api: Api, worker: HttpWorker) -> dict[str, Any]:
    [leased] = await api.lease(worker, wait_s=1.0)
    resp = await api.complete(worker, leased["job_id"], leased["attempt"])
    assert resp.status_code == 200, resp.text
    return leased


def test_submit_get_list_and_cancel(services: Services, clock: FakeClock) -> None:
    async def body(api: Api, client: AsyncClient) -> None:
        ids = []
        for _ in range(5):
            ids.append((await client.submit(inference_spec()))["id"])
            clock.advance(1.0)  # distinct creation times: a defined newest-first order
        assert (await client.get(ids[0]))["state"] == "queued"  # no worker yet

        listed = [job["id"] async for job in client.list(limit=2)]  # three pages
        assert listed == ids[::-1]  # newest first

        cancelled = await client.cancel(ids[1])
        assert cancelled["state"] == "cancelled"
        assert [job["id"] async for job in client.list(state="cancelled")] == [ids[1]]
        assert len([job async for job in client.list(state="queued")]) == 4

    run(services, body)


def test_idempotency_key_returns_the_first_job(services: Services) -> None:
    async def body(api: Api, client: AsyncClient) -> None:
        first = await client.submit(inference_spec(), idempotency_key="order-42")
        again = await client.submit(inference_spec(), idempotency_key="order-42")
        assert again["id"] == first["id"]
        assert len([job async for job in client.list()]) == 1

    run(services, body)


def test_wait_returns_the_result_and_reports_each_poll(services: Services) -> None:
    async def body(api: Api, client: AsyncClient) -> None:
        worker = await api.register_worker()
        job = await client.submit(inference_spec())
        seen: list[str] = []

        async def progress(view: dict[str, Any]) -> None:  # a coroutine function is awaited
            seen.append(view["state"])

        result, leased = await asyncio.gather(
            client.wait(job["id"], timeout_s=30, on_progress=progress, poll_s=0.01),
            _lease_and_complete(api, worker),
        )
        assert leased["job_id"] == job["id"]
        assert result["job_id"] == job["id"]
        assert result["worker_address"] == worker.address
        assert result["units"] == len(TEXTS)
        assert result["cost_wei"] == str(100 * len(TEXTS))  # the worker's offer: 100 wei/text
        assert len(result["output"]["embeddings"]) == len(TEXTS)
        assert seen[-1] == "succeeded"
        assert set(seen) <= {"queued", "assigned", "running", "succeeded"}

    run(services, body)


def test_wait_raises_job_failed_for_a_cancelled_job(services: Services) -> None:
    async def body(api: Api, client: AsyncClient) -> None:
        job = await client.submit(inference_spec())
        await client.cancel(job["id"])
        seen: list[str] = []
        with pytest.raises(JobFailed) as failed:
            await client.wait(job["id"], timeout_s=5, on_progress=lambda v: seen.append(v["id"]))
        assert failed.value.job["state"] == "cancelled"
        assert seen == [job["id"]]  # a plain function works too

    run(services, body)


def test_job_failed_says_whose_fault_it_was(services: Services) -> None:
    async def body(api: Api, client: AsyncClient) -> None:
        worker = await api.register_worker()
        job = await client.submit(inference_spec())
        await api.lease(worker)
        resp = await api.http.post(
            f"/v1/workers/jobs/{job['id']}/fail",
            json={"attempt": 1, "retryable": False, "reason": "CUDA error: device lost"},
            headers=worker.headers,
        )
        assert resp.status_code == 200, resp.text
        with pytest.raises(JobFailed, match=r"failed \(worker fault\): .*device lost") as failed:
            await client.wait(job["id"], timeout_s=5)
        assert failed.value.fault == "worker"

    run(services, body)


def test_wait_raises_job_timeout_while_no_worker_takes_it(services: Services) -> None:
    async def body(api: Api, client: AsyncClient) -> None:
        job = await client.submit(inference_spec())
        with pytest.raises(JobTimeout, match="still queued"):
            await client.wait(job["id"], timeout_s=0.05, poll_s=0.01)
        assert (await client.get(job["id"]))["state"] == "queued"  # waiting changed nothing

    run(services, body)


def test_blob_upload_and_download_stream_the_bytes(services: Services, tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    data = os.urandom(300_000)
    source = files / "clip.bin"
    source.write_bytes(data)
    dest = files / "copy.bin"

    async def body(api: Api, client: AsyncClient) -> None:
        sha256 = await client.upload_blob(source)
        assert sha256 == hashlib.sha256(data).hexdigest()
        assert await client.download_blob(sha256, dest) == dest

    run(services, body)
    assert dest.read_bytes() == data
    assert sorted(p.name for p in files.iterdir()) == ["clip.bin", "copy.bin"]  # no .part left


def test_errors_are_the_servers_problem_documents(services: Services, tmp_path: Path) -> None:
    async def body(api: Api, client: AsyncClient) -> None:
        with pytest.raises(GpumarketAPIError, match="unknown inference model 'no-such-model'"):
            await client.submit(inference_spec(model="no-such-model"))
        with pytest.raises(GpumarketAPIError) as missing:
            await client.get("job_does_not_exist")
        assert (missing.value.status, missing.value.code) == (404, "not_found")
        with pytest.raises(GpumarketAPIError) as no_blob:
            await client.download_blob("0" * 64, tmp_path / "never.bin")
        assert no_blob.value.status == 404
        assert not list(tmp_path.glob("*never.bin*"))

    run(services, body)


def test_an_unknown_key_is_refused(services: Services) -> None:
    async def body(api: Api, client: AsyncClient) -> None:
        with pytest.raises(GpumarketAPIError) as denied:
            await client.get("any")
        assert (denied.value.status, denied.value.code) == (401, "unauthorized")
        assert "unknown API key" in denied.value.detail

    run(services, body, api_key="gmk_not_a_key")


def test_account_and_link_payer(services: Services) -> None:
    payer = Account.create()

    async def body(api: Api, client: AsyncClient) -> None:
        assert (await client.account())["payer_address"] is None
        linked = await client.link_payer(payer.key)
        assert linked["payer_address"] == payer.address
        assert (await client.account())["payer_address"] == payer.address

    run(services, body)


def test_both_clients_offer_the_same_methods() -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in vars(cls).items()
            if not name.startswith("_") and callable(member)
        }

    sync, concurrent = public(Client), public(AsyncClient)
    assert sync.pop("close") and concurrent.pop("aclose")
    assert sync.keys() == concurrent.keys()
    for name, signature in sync.items():
        assert list(signature.parameters) == list(concurrent[name].parameters), name
        method = getattr(AsyncClient, name)
        assert inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method), name


@pytest.mark.parametrize(
    ("read_timeout_s", "expected_wait_s"),
    [(None, 20.0), (30.0, 20.0), (5.0, 3.0), (1.0, 0.0)],
)
def test_a_long_poll_ends_inside_the_clients_read_timeout(
    read_timeout_s: float | None, expected_wait_s: float
) -> None:
    from gpumarket import _calls

    waiting = _calls.Waiting("job-1", timeout_s=600, poll_s=0.2)
    call = waiting.long_poll({"state": "running"}, read_timeout_s)
    params = call.params or {}
    assert params.get("wait_s", 0.0) == pytest.approx(expected_wait_s)
    if expected_wait_s:
        assert params["while_state"] == "running"


def test_submit_many_and_wait_many_take_one_request_each_way(services: Services) -> None:
    async def body(api: Api, client: AsyncClient) -> None:
        worker = await api.register_worker(max_concurrency=8)
        specs = [inference_spec(idempotency_key=f"key-{i}") for i in range(3)]
        specs.append(inference_spec(model="nope"))
        items = await client.submit_many(specs)
        assert [i["created"] for i in items] == [True, True, True, False]
        assert items[3]["error"]["status"] == 422 and "nope" in items[3]["error"]["detail"]
        ids = [i["job"]["id"] for i in items[:3]]
        assert [i["job"]["id"] for i in await client.submit_many(specs[:3])] == ids

        async def work() -> None:
            leased = await api.lease(worker, wait_s=1.0, max_jobs=8)
            assert len(leased) == 3
            await client.cancel(leased[2]["job_id"])
            for job in leased[:2]:
                resp = await api.complete(worker, job["job_id"], job["attempt"])
                assert resp.status_code == 200, resp.text

        waits: list[str] = []

        async def note(request: httpx.Request) -> None:
            if request.url.path == "/v1/jobs/wait":
                waits.append(json.loads(request.content)["return_when"])

        client._http.event_hooks["request"].append(note)
        outcomes, _ = await asyncio.gather(client.wait_many(ids, timeout_s=30), work())
        # One long-poll for all three, though they ended at three moments.
        assert waits == ["all"]
        client._http.event_hooks["request"].remove(note)
        by_id = {o.get("job_id") or o["id"]: o for o in outcomes}
        assert [o.get("job_id") or o["id"] for o in outcomes] == ids
        cancelled = [o for o in by_id.values() if o["state"] == "cancelled"]
        succeeded = [o for o in by_id.values() if o["state"] == "succeeded"]
        assert len(cancelled) == 1 and len(succeeded) == 2
        assert all(o["units"] == len(TEXTS) and o["signature"] for o in succeeded)

        with pytest.raises(JobTimeout, match="1 of 1 jobs still not final"):
            queued = (await client.submit(inference_spec()))["id"]
            await client.wait_many([queued], timeout_s=0.3)

    run(services, body)
