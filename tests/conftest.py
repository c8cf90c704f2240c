"""Shared fixtures: stores (SQLite and PostgreSQL), a fake clock, services and the app."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from orchestrator.config import Settings
from orchestrator.store import Store
from orchestrator.wiring import Services, build_services

PG_URL = os.environ.get("GPUMARKET_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("GPUMARKET_REQUIRE_POSTGRES") == "1"
PG_CONNECT_TIMEOUT_S = 3


class FakeClock:
    """Unix seconds that move only when a test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


def _pg_unreachable_reason() -> str | None:
    try:
        with psycopg.connect(PG_URL, connect_timeout=PG_CONNECT_TIMEOUT_S):
            return None
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def require_postgres() -> None:
    """Skip (or, with GPUMARKET_REQUIRE_POSTGRES=1 as in CI, fail) without PostgreSQL."""
    reason = _pg_unreachable_reason()
    if reason is None:
        return
    if REQUIRE_PG:
        pytest.fail(f"GPUMARKET_REQUIRE_POSTGRES=1 but PostgreSQL is unreachable: {reason}")
    pytest.skip(
        f"PostgreSQL at {PG_URL} is unreachable ({reason}); "
        "set GPUMARKET_REQUIRE_POSTGRES=1 to make this a failure"
    )


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'orchestrator.db'}")
    store.migrate()
    yield store
    store.dispose()


@pytest.fixture
def postgresql_store() -> Iterator[Store]:
    """A Store in a fresh PostgreSQL schema of its own, dropped afterwards."""
    require_postgres()
    schema = f"gmtest_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    store = Store(PG_URL, schema=schema)
    try:
        store.migrate()
        yield store
    finally:
        store.dispose()
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def pg_database() -> Iterator[str]:
    """The URL of a PostgreSQL database of the test's own, dropped afterwards: for orchestrator
    processes, which keep their tables in the default schema."""
    require_postgres()
    name = f"gmtest_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield PG_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest) -> Store:
    """The same test, once against SQLite and once against PostgreSQL."""
    backend: Store = request.getfixturevalue(f"{request.param}_store")
    return backend


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        admin_token="operator-token-for-tests-0123456789abcdef",
        lease_ttl_s=30.0,
        heartbeat_interval_s=10.0,
        long_poll_max_s=5.0,
        max_blob_bytes=1024 * 1024,
        # Off unless a test turns it on: a sampled job waits for a second worker.
        verify_rate=0.0,
        verify_rate_new=0.0,
    )


@pytest.fixture
def services(settings: Settings, sqlite_store: Store, clock: FakeClock) -> Services:
    """Services over SQLite with a fake clock and a seeded random choice."""
    return build_services(settings, store=sqlite_store, clock=clock, rng=random.Random(7))


@pytest.fixture
def any_services(settings: Settings, store: Store, clock: FakeClock) -> Services:
    """Services over each store backend in turn."""
    return build_services(settings, store=store, clock=clock, rng=random.Random(7))
