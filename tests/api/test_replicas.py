"""Several orchestrator replicas on one database: wake-ups cross replicas, the background duties
have one owner, transient database errors are re-run, and a submit is answered once committed.

The replicas here are two apps in this process, each with its own ``Store`` (its own connection
pool), services and lifespan, sharing one PostgreSQL schema, as two processes would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from orchestrator.app import create_app
from orchestrator.blobs import LocalBlobStore
from orchestrator.config import Settings
from orchestrator.services import wakeups
from orchestrator.services.replicas import (
    REPLICA_STALE_S,
    DutyLock,
    ReplicaMismatch,
    ReplicaRegistry,
    shared_config,
)
from orchestrator.store import Store
from orchestrator.store.engine import is_transient, retry_transient
from orchestrator.wiring import Services, build_services
from tests.api.conftest import BASE_URL, Api, assert_problem, inference_spec
from tests.conftest import PG_URL

# Far beyond each test's own wait: only a NOTIFY from the other replica can wake a long-poll.
NO_FALLBACK_S = 120.0
LISTEN_READY_S = 10.0
# A generous bound for a wake-up on a loaded machine, far below the long-polls' own 40 s.
WOKEN_WITHIN_S = 15.0


@contextlib.asynccontextmanager
async def _replica(services: Services) -> AsyncIterator[Api]:
    app = create_app(services.settings, services=services, run_sweeper=False)
    async with app.router.lifespan_context(app):
        if services.bus is not None:
            ready = await asyncio.to_thread(services.bus.listening.wait, LISTEN_READY_S)
            assert ready, "the replica never started listening for wake-ups"
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
            yield Api(http, services)


TwoReplicas = Callable[[Callable[[Api, Api], Awaitable[None]]], None]


@pytest.fixture
def two_pg_replicas(
    settings: Settings, postgresql_store: Store, monkeypatch: pytest.MonkeyPatch
) -> TwoReplicas:
    """Run a body against replicas A and B of one market on one PostgreSQL schema."""
    monkeypatch.setattr(wakeups, "WAKE_FALLBACK_S", NO_FALLBACK_S)
    second_store = Store(PG_URL, schema=postgresql_store.schema)

    # Long-polls may wait longer than the test does: an answer within the test's wait comes
    # from a wake-up, not from the poll's own end.
    patient = settings.model_copy(update={"long_poll_max_s": 60.0})

    def run(body: Callable[[Api, Api], Awaitable[None]]) -> None:
        a = build_services(patient, store=postgresql_store, rng=random.Random(1))
        b = build_services(patient, store=second_store, rng=random.Random(2))

        async def both() -> None:
            async with _replica(a) as api_a, _replica(b) as api_b:
                await body(api_a, api_b)

        try:
            asyncio.run(both())
        finally:
            second_store.dispose()

    return run


@pytest.mark.postgres
def test_a_job_submitted_on_one_replica_wakes_a_worker_polling_another(
    two_pg_replicas: TwoReplicas,
) -> None:
    async def body(a: Api, b: Api) -> None:
        client = await a.new_client()
        worker = await b.register_worker()
        poll = asyncio.create_task(b.lease(worker, wait_s=40))
        # The poll is open on B (its row says so) before the job arrives on A.
        for _ in range(200):
            resp = await a.http.get("/v1/workers", headers=a.operator)
            if any(w["free_slots"] > 0 for w in resp.json()):
                break
            await asyncio.sleep(0.02)
        job = await a.submit(client)
        leased = await asyncio.wait_for(poll, timeout=WOKEN_WITHIN_S)
        assert [j["job_id"] for j in leased] == [job["id"]]

    two_pg_replicas(body)


@pytest.mark.postgres
def test_a_client_waiting_on_one_replica_sees_a_change_made_on_another(
    two_pg_replicas: TwoReplicas,
) -> None:
    async def body(a: Api, b: Api) -> None:
        client = await a.new_client()
        job = await a.submit(client)  # no worker: it stays queued
        waiting = asyncio.create_task(
            b.http.get(
                f"/v1/jobs/{job['id']}",
                params={"wait_s": 40, "while_state": "queued"},
                headers=client,
            )
        )
        await asyncio.sleep(0.3)  # the long-poll is watching on B
        resp = await a.http.post(f"/v1/jobs/{job['id']}/cancel", headers=client)
        assert resp.status_code == 200, resp.text
        answer = await asyncio.wait_for(waiting, timeout=WOKEN_WITHIN_S)
        assert answer.json()["state"] == "cancelled"

    two_pg_replicas(body)


@pytest.mark.postgres
def test_one_replica_holds_the_duties_and_another_takes_them_when_it_dies(
    postgresql_store: Store,
) -> None:
    other = Store(PG_URL, schema=postgresql_store.schema)
    first, second = DutyLock(postgresql_store), DutyLock(other)
    try:
        assert first.held() is True
        assert second.held() is False
        assert first.held() is True  # still ours on the next round
        # The owner's connection dies (as when its process is SIGKILLed): the server frees
        # the lock and the next replica to ask takes it.
        assert first._conn is not None
        pid = first._conn.info.backend_pid
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            # Waits (up to 10 s) until the backend is gone, and its lock with it.
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
        assert second.held() is True
        assert first.held() is False
        second.release()
        assert first.held() is True
    finally:
        first.release()
        second.release()
        other.dispose()


def test_on_sqlite_one_process_holds_the_duties(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'orchestrator.db'}")
    first, second = DutyLock(store), DutyLock(store)
    try:
        assert first.held() is True
        assert second.held() is False
        first.release()
        assert second.held() is True
    finally:
        first.release()
        second.release()
        store.dispose()


@pytest.mark.postgres
def test_a_deadlock_victim_is_rerun_and_both_transactions_commit_once(
    postgresql_store: Store,
) -> None:
    store = postgresql_store
    with store.engine.begin() as conn:
        conn.execute(text("CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL)"))
        conn.execute(text("INSERT INTO counters VALUES (1, 0), (2, 0)"))
    both_hold_one = threading.Barrier(2)
    runs: Counter[int] = Counter()
    errors: list[BaseException] = []

    def bump_both(first: int, second: int) -> Callable[[], None]:
        @retry_transient
        def run() -> None:
            runs[first] += 1
            with store.transaction() as s:
                s.execute(text("UPDATE counters SET n = n + 1 WHERE id = :i"), {"i": first})
                if runs[first] == 1:  # the first time, both hold one row: a real deadlock
                    both_hold_one.wait(timeout=10)
                s.execute(text("UPDATE counters SET n = n + 1 WHERE id = :i"), {"i": second})

        def guarded() -> None:
            try:
                run()
            except BaseException as exc:  # reported below
                errors.append(exc)

        return guarded

    threads = [threading.Thread(target=bump_both(1, 2)), threading.Thread(target=bump_both(2, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with store.read() as s:
        counts = {row[0]: row[1] for row in s.execute(text("SELECT id, n FROM counters"))}
    assert counts == {1: 2, 2: 2}  # each transaction took effect exactly once
    assert sum(runs.values()) == 3  # the deadlock's victim ran twice


def _deadlock_error() -> OperationalError:
    return OperationalError("UPDATE ...", {}, psycopg.errors.DeadlockDetected("deadlock detected"))


def test_only_transient_errors_are_rerun() -> None:
    calls = Counter[str]()

    @retry_transient
    def always_deadlocks() -> None:
        calls["deadlock"] += 1
        raise _deadlock_error()

    @retry_transient
    def broken() -> None:
        calls["broken"] += 1
        raise OperationalError("SELECT", {}, psycopg.errors.UndefinedTable("no such table"))

    with pytest.raises(OperationalError):
        always_deadlocks()
    with pytest.raises(OperationalError):
        broken()
    assert calls == {"deadlock": 4, "broken": 1}
    assert is_transient(_deadlock_error())


def test_a_transient_error_left_after_the_reruns_is_a_503_with_retry_after(
    services: Services, run_api: Callable[[Callable[[Api], Awaitable[None]]], None]
) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        job = await api.submit(client)

        def busy(*_: Any, **__: Any) -> Any:
            raise _deadlock_error()

        api.services.jobs.get = busy  # type: ignore[method-assign]
        resp = await api.http.get(f"/v1/jobs/{job['id']}", headers=client)
        assert_problem(resp, 503, "database_busy", "retry shortly")
        assert resp.headers["retry-after"] == "1"

    run_api(body)


def test_a_committed_job_is_answered_even_when_dispatch_fails(
    services: Services,
    run_api: Callable[[Callable[[Api], Awaitable[None]]], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_dispatch = services.leases.dispatch

    def failing_dispatch(now: float) -> list[tuple[str, str]]:
        raise RuntimeError("dispatch round fell over")

    async def body(api: Api) -> None:
        client = await api.new_client()
        worker = await api.register_worker()
        services.leases.dispatch = failing_dispatch  # type: ignore[method-assign]
        resp = await api.http.post("/v1/jobs", json=inference_spec(), headers=client)
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]
        assert (await api.job(client, job_id))["state"] == "queued"
        services.leases.dispatch = real_dispatch  # type: ignore[method-assign]
        leased = await api.lease(worker)
        assert [j["job_id"] for j in leased] == [job_id]

    run_api(body)
    assert "dispatch after a submit failed" in caplog.text


def test_the_sweeper_runs_duties_only_on_the_replica_holding_them(
    settings: Settings, tmp_path: Path
) -> None:
    """Two replicas on one SQLite file: the expired lease is swept by exactly one of them."""
    fast = settings.model_copy(update={"sweep_interval_s": 0.05})
    stores = [Store(f"sqlite:///{tmp_path / 'market.db'}") for _ in range(2)]
    stores[0].migrate()
    replicas = [build_services(fast, store=s, clock=time.time) for s in stores]
    rounds = Counter[int]()
    for i, svc in enumerate(replicas):
        real = svc.leases.sweep

        def counted(now: float, i: int = i, real: Any = real) -> Any:
            rounds[i] += 1
            return real(now)

        svc.leases.sweep = counted  # type: ignore[method-assign]

    async def serve_both() -> None:
        apps = [create_app(fast, services=svc) for svc in replicas]
        async with apps[0].router.lifespan_context(apps[0]):
            async with apps[1].router.lifespan_context(apps[1]):
                await asyncio.sleep(1.0)

    try:
        asyncio.run(serve_both())
    finally:
        for s in stores:
            s.dispose()
    assert len(rounds) == 1 and sum(rounds.values()) > 3, rounds


# -- what every replica must share ------------------------------------------------------------


def _config(**overrides: str | None) -> dict[str, str | None]:
    base = shared_config("operator-token", None, None, "blob-store-1")
    return {**base, **overrides}


def test_a_replica_whose_shared_settings_differ_from_a_live_one_refuses_to_join(
    sqlite_store: Store,
) -> None:
    now = 1_800_000_000.0
    first = ReplicaRegistry(sqlite_store, _config())
    first.join(now)
    first.join(now + 1)  # idempotent
    ReplicaRegistry(sqlite_store, _config()).join(now + 2)  # the same settings: welcome
    with pytest.raises(ReplicaMismatch, match="GPUMARKET_BLOB_DIR"):
        ReplicaRegistry(sqlite_store, _config(blob_store="blob-store-2")).join(now + 2)
    other_token = shared_config("another-token", None, None, "blob-store-1")
    with pytest.raises(ReplicaMismatch, match="GPUMARKET_ADMIN_TOKEN"):
        ReplicaRegistry(sqlite_store, other_token).join(now + 2)
    # Once the others are gone (stopped, or dead and stale), new settings may start.
    assert len(first.live(now + 2)) == 2
    first.leave()
    later = now + REPLICA_STALE_S + 10
    assert first.live(later) == []
    ReplicaRegistry(sqlite_store, other_token).join(later)


def test_a_blob_folder_has_one_identity_whoever_asks(tmp_path: Path) -> None:
    shared = LocalBlobStore(tmp_path / "shared")
    assert shared.identity() == LocalBlobStore(tmp_path / "shared").identity()
    assert LocalBlobStore(tmp_path / "local").identity() != shared.identity()


def test_serve_refuses_a_second_replica_with_its_own_blob_folder(tmp_path: Path) -> None:
    """The real CLI, beside a live replica (its row written here) on the same database."""
    db = tmp_path / "market.db"
    store = Store(f"sqlite:///{db}")
    store.migrate()
    token = "operator-token-for-tests-0123456789abcdef"
    live = ReplicaRegistry(store, shared_config(token, None, None, "another-blob-store"))
    live.join(time.time())
    store.dispose()
    done = subprocess.run(
        [sys.executable, "-m", "gpumarket.cli", "orchestrator", "serve", "--port", "1"],
        env={
            **os.environ,
            "GPUMARKET_DB_URL": f"sqlite:///{db}",
            "GPUMARKET_DATA_DIR": str(tmp_path / "data"),
            "GPUMARKET_ADMIN_TOKEN": token,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "cannot start: the blob store (GPUMARKET_BLOB_DIR" in done.stderr
    assert "every replica must use the same one" in done.stderr
    assert "Traceback" not in done.stderr
