"""The store: one test class run against SQLite and PostgreSQL (the ``store`` fixture).

Covers migrations (and that they match the ORM models), exact wei amounts, transaction
semantics, and the locking that keeps two orchestrator replicas from handing out a job twice.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Numeric, String, Text, cast, func, inspect, select, text
from sqlalchemy.exc import DBAPIError

from orchestrator.config import Settings
from orchestrator.store import Store
from orchestrator.store import engine as engine_module
from orchestrator.store.engine import (
    MIGRATIONS_DIR,
    PG_MIGRATION_LOCK_ID,
    CanonicalJSON,
    is_transient,
    normalize_db_url,
    retry_transient,
    update_rows,
)
from orchestrator.store.models import Base, Client, Job, JobEvent, Worker
from orchestrator.wiring import Services, build_services
from protocol import JobSpec, JobState
from protocol.signing import canonical_json
from tests.conftest import PG_URL, FakeClock
from tests.support import EMBED_MODEL, TestWorker, agreed_price, completion, new_client, register

BIG_WEI = [0, 1, 10**30 + 7, 2**63, 2**255 + 1, 2**256 - 1]  # 2**256 - 1: the uint256 maximum
THREAD_TIMEOUT_S = 60
MIGRATE_SCRIPT = (
    "import sys\n"
    "from orchestrator.store import Store\n"
    "Store(sys.argv[1], schema=sys.argv[2] or None).migrate()\n"
)


def _current_schema(store: Store) -> str:
    with store.engine.connect() as conn:
        schema = conn.execute(text("SELECT current_schema()")).scalar_one()
        conn.rollback()
    return str(schema)


@contextmanager
def _replica(store: Store) -> Iterator[Store]:
    """A second Store over the same database, as a second orchestrator process would open."""
    twin = Store(store.url, schema=_current_schema(store) if store.is_postgres else None)
    try:
        yield twin
    finally:
        twin.dispose()


@contextmanager
def _empty_store(store: Store, tmp_path: Any) -> Iterator[Store]:
    """A Store on the same backend as ``store`` but over an empty, unmigrated database."""
    if not store.is_postgres:
        fresh = Store(f"sqlite:///{tmp_path / 'empty.db'}")
        try:
            yield fresh
        finally:
            fresh.dispose()
        return
    schema = f"gmtest_empty_{uuid.uuid4().hex[:12]}"
    with store.engine.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
        conn.commit()
    fresh = Store(store.url, schema=schema)
    try:
        yield fresh
    finally:
        fresh.dispose()
        with store.engine.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            conn.commit()


def _advisory_lock_is_free(store: Store) -> bool:
    with store.engine.connect() as conn:
        key = {"k": PG_MIGRATION_LOCK_ID}
        free = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), key).scalar_one())
        if free:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), key)
        conn.commit()
    return free


def _schema_diff(store: Store) -> list[Any]:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        diff = compare_metadata(context, Base.metadata)
        conn.rollback()
    return list(diff)


def _client(client_id: str | None = None, name: str = "c") -> Client:
    cid = client_id or uuid.uuid4().hex
    return Client(id=cid, name=name, api_key_hash=uuid.uuid4().hex, created_at=0.0)


def _worker_row(worker_id: str) -> Worker:
    return Worker(
        id=worker_id,
        address="0x" + uuid.uuid4().hex[:40].ljust(40, "0"),
        hardware={},
        offers=[],
        max_concurrency=1,
        status="registered",
        registered_at=0.0,
        last_seen_at=0.0,
    )


def _job_row(job_id: str, client_id: str, **wei: int | None) -> Job:
    return Job(
        id=job_id,
        client_id=client_id,
        request_hash="0" * 64,
        type="inference",
        model=EMBED_MODEL,
        precision="fp32",
        preference="balanced",
        spec={},
        max_price_wei_per_unit=wei.pop("max_price_wei_per_unit", 1),
        state="queued",
        max_attempts=1,
        deadline_at=0.0,
        created_at=0.0,
        updated_at=0.0,
        **wei,
    )


def _run_all(tasks: list[Callable[[], Any]]) -> list[Any]:
    """Run each task on its own thread, all released at once; re-raise the first failure."""
    barrier = threading.Barrier(len(tasks), timeout=THREAD_TIMEOUT_S)

    def released(task: Callable[[], Any]) -> Any:
        barrier.wait()
        return task()

    with ThreadPoolExecutor(max_workers=len(tasks)) as pool:
        futures = [pool.submit(released, task) for task in tasks]
        return [f.result(timeout=THREAD_TIMEOUT_S) for f in futures]


class TestStore:
    # -- migrations ----------------------------------------------------------------------------

    def test_migrated_schema_is_current(self, store: Store) -> None:
        assert store.schema_is_current()

    def test_migrate_twice_is_a_no_op(self, store: Store) -> None:
        with store.transaction() as s:
            s.add(_client("kept"))
        store.migrate()
        assert store.schema_is_current()
        head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
        with store.read() as s:
            versions = s.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
            assert versions == [head]
            assert s.get(Client, "kept") is not None

    def test_every_model_table_exists(self, store: Store) -> None:
        tables = set(inspect(store.engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        assert "alembic_version" in tables

    def test_migrated_schema_matches_the_models(self, store: Store) -> None:
        assert _schema_diff(store) == []

    def test_schema_comparison_sees_drift(self, store: Store) -> None:
        # Guards the test above: an empty diff must mean "same", not "did not look".
        with store.engine.connect() as conn:
            conn.execute(text("ALTER TABLE clients ADD COLUMN stray INTEGER"))
            conn.commit()
        diff = _schema_diff(store)
        assert [(op[0], op[3].name) for op in diff] == [("remove_column", "stray")]

    def test_wei_columns_have_exact_types(self, store: Store) -> None:
        columns = {c["name"]: c["type"] for c in inspect(store.engine).get_columns("jobs")}
        for name in ("max_price_wei_per_unit", "price_wei_per_unit", "cost_wei"):
            column_type = columns[name]
            if store.is_postgres:
                assert isinstance(column_type, Numeric)
                assert (column_type.precision, column_type.scale) == (78, 0)
            else:
                # Text, because SQLite's NUMERIC affinity turns integers past 2**63 into floats.
                assert isinstance(column_type, String)
                assert column_type.length == 78

    def test_empty_database_is_not_current_until_migrated(
        self, store: Store, tmp_path: Any
    ) -> None:
        with _empty_store(store, tmp_path) as fresh:
            assert not fresh.schema_is_current()
            fresh.migrate()
            assert fresh.schema_is_current()

    def test_two_replicas_migrating_at_once_both_succeed(self, store: Store, tmp_path: Any) -> None:
        # Separate processes, as real replicas are: they meet only in the database.
        with _empty_store(store, tmp_path) as fresh:
            schema = _current_schema(fresh) if fresh.is_postgres else ""
            migrators = [
                subprocess.Popen(
                    [sys.executable, "-c", MIGRATE_SCRIPT, fresh.url, schema],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            # Wait for both before judging either, so no process outlives the test.
            errors = [proc.communicate(timeout=THREAD_TIMEOUT_S)[1] for proc in migrators]
            for proc, err in zip(migrators, errors, strict=True):
                assert proc.returncode == 0, err
            assert fresh.schema_is_current()
            assert _schema_diff(fresh) == []

    def test_two_threads_migrating_at_once_both_succeed(self, store: Store, tmp_path: Any) -> None:
        with _empty_store(store, tmp_path) as fresh, _replica(fresh) as twin:
            _run_all([fresh.migrate, twin.migrate])
            assert fresh.schema_is_current()
            assert twin.schema_is_current()

    def test_failed_migration_rolls_back_whole_and_releases_its_lock(
        self, store: Store, tmp_path: Any
    ) -> None:
        with _empty_store(store, tmp_path) as fresh:
            # A stray "jobs" table makes the migration fail after it created other tables.
            with fresh.transaction() as s:
                s.execute(text("CREATE TABLE jobs (id VARCHAR(32) PRIMARY KEY)"))
            with pytest.raises(DBAPIError, match="jobs"):
                fresh.migrate()
            assert not fresh.schema_is_current()
            assert set(inspect(fresh.engine).get_table_names()) == {"jobs"}, "half a migration"
            with _replica(fresh) as twin:
                if twin.is_postgres:
                    assert _advisory_lock_is_free(twin), "the lock outlived the failed migration"
                with twin.transaction() as s:
                    s.execute(text("DROP TABLE jobs"))
                twin.migrate()  # would wait, or fail on half-made tables, if either leaked
                assert twin.schema_is_current()

    # -- money ---------------------------------------------------------------------------------

    @pytest.mark.parametrize("amount", BIG_WEI)
    def test_wei_amount_round_trips_exactly(self, store: Store, amount: int) -> None:
        with store.transaction() as s:
            s.add(_client("payer"))
            s.flush()
            s.add(
                _job_row(
                    "job",
                    "payer",
                    max_price_wei_per_unit=amount,
                    price_wei_per_unit=amount,
                    cost_wei=amount,
                )
            )
        with store.read() as s:
            row = s.execute(
                select(Job.max_price_wei_per_unit, Job.price_wei_per_unit, Job.cost_wei)
            ).one()
        assert tuple(row) == (amount, amount, amount)
        assert all(type(value) is int for value in row)

    def test_wei_amount_keeps_null(self, store: Store) -> None:
        with store.transaction() as s:
            s.add(_client("payer"))
            s.flush()
            s.add(_job_row("job", "payer", cost_wei=None))
        with store.read() as s:
            job = s.get(Job, "job")
            assert job is not None
            assert job.cost_wei is None
            assert job.price_wei_per_unit is None

    # -- transactions --------------------------------------------------------------------------

    def test_transaction_commits_on_success(self, store: Store) -> None:
        with store.transaction() as s:
            s.add(_client("c1", name="before"))
        with store.transaction() as s:
            row = s.get(Client, "c1")
            assert row is not None
            row.name = "after"
        with store.read() as s:
            committed = s.get(Client, "c1")
            assert committed is not None and committed.name == "after"

    def test_transaction_rolls_back_on_exception(self, store: Store) -> None:
        with store.transaction() as s:
            s.add(_client("c1", name="original"))
        with pytest.raises(RuntimeError, match="boom"), store.transaction() as s:
            s.add(_client("c2"))
            row = s.get(Client, "c1")
            assert row is not None
            row.name = "changed"
            s.flush()  # the changes reached the database before the failure
            raise RuntimeError("boom")
        with store.read() as s:
            assert s.get(Client, "c2") is None
            kept = s.get(Client, "c1")
            assert kept is not None and kept.name == "original"

    def test_read_sees_committed_but_not_uncommitted_rows(self, store: Store) -> None:
        with store.transaction() as w:
            w.add(_client("pending"))
            w.flush()
            # A read while a write transaction is open neither waits for it (SQLite: WAL and
            # a plain BEGIN; a second BEGIN IMMEDIATE would block here) nor sees its rows.
            with store.read() as r:
                assert r.get(Client, "pending") is None
        with store.read() as r:
            assert r.get(Client, "pending") is not None

    def test_locked_read_modify_write_loses_no_update(self, store: Store) -> None:
        with store.transaction() as s:
            s.add(_worker_row("w"))
        increments_per_thread = 15

        def bump(target: Store) -> None:
            for _ in range(increments_per_thread):
                with target.transaction() as s:
                    row = s.get(Worker, "w", with_for_update=True)
                    assert row is not None
                    row.jobs_succeeded += 1

        with _replica(store) as twin:
            _run_all([lambda: bump(store), lambda: bump(twin), lambda: bump(store)])
        with store.read() as s:
            row = s.get(Worker, "w")
            assert row is not None and row.jobs_succeeded == 3 * increments_per_thread

    # -- two replicas dispatching and claiming at once -----------------------------------------

    def test_concurrent_dispatch_and_claim_never_double_assign(
        self, store: Store, settings: Settings, clock: FakeClock
    ) -> None:
        """Two orchestrators over one database: every job goes out once, slots are respected.

        On PostgreSQL this leans on SELECT ... FOR UPDATE (SKIP LOCKED); on SQLite on
        BEGIN IMMEDIATE. Within one process a lock serializes dispatch, so the two replicas
        here have separate Store objects and separate services.
        """
        with _replica(store) as twin:
            replicas = [
                build_services(settings, store=store, clock=clock, rng=random.Random(1)),
                build_services(settings, store=twin, clock=clock, rng=random.Random(2)),
            ]
            _dispatch_everything(replicas, clock.t)


MAX_CONCURRENCY = 4
N_WORKERS = 6
N_JOBS = 48
DISPATCH_CALLS_PER_ROUND = 3
MIN_CLAIM_CALLS_PER_ROUND = 2
MAX_ROUNDS = 20


def _dispatch_everything(replicas: list[Services], now: float) -> None:
    a = replicas[0]
    workers = [register(a, max_concurrency=MAX_CONCURRENCY) for _ in range(N_WORKERS)]
    client, _ = new_client(a)
    for i in range(N_JOBS):
        spec = JobSpec.model_validate(
            {
                "type": "inference",
                "model": EMBED_MODEL,
                "input": {"texts": [f"text {i}"]},
                "max_price_wei_per_unit": 10**18,
            }
        )
        replicas[i % 2].jobs.submit(client, spec, now)
    # Workers announce fewer free slots than their concurrency, so a dispatcher that trusted
    # max_concurrency over the announced slots would show up as an over-assignment.
    announced = {w.id: 1 + i % (MAX_CONCURRENCY - 1) for i, w in enumerate(workers)}
    assigned_ever: Counter[str] = Counter()
    done = 0
    for _ in range(MAX_ROUNDS):
        for i, w in enumerate(workers):
            replicas[i % 2].leases.open_poll(w.principal, announced[w.id], now + 60, now)
        queued = N_JOBS - done
        assigned, claimed = _one_round(replicas, workers, now)

        assigned_ever.update(job_id for job_id, _ in assigned)
        twice = [job_id for job_id, n in assigned_ever.items() if n > 1]
        assert not twice, f"jobs assigned more than once: {twice}"
        per_worker = Counter(worker_id for _, worker_id in assigned)
        for w in workers:
            assert per_worker[w.id] <= announced[w.id], (
                f"worker {w.id} got {per_worker[w.id]} jobs with {announced[w.id]} free slots"
            )
        # Liveness: every announced slot is filled while jobs remain.
        assert len(assigned) == min(sum(announced.values()), queued)
        delivered = Counter(job_id for job_id, _ in claimed)
        assert all(n == 1 for n in delivered.values()), f"delivered twice: {delivered}"
        assert sorted(claimed) == sorted(assigned), "claims must hand out exactly the assignments"

        _complete_all(replicas, workers, claimed, now)
        done += len(assigned)
        if done == N_JOBS:
            break
    _assert_final_state(replicas[0].store, workers)


def _one_round(
    replicas: list[Services], workers: list[TestWorker], now: float
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Both replicas dispatch while every worker claims through both; returns both lists."""
    assigned: list[tuple[str, str]] = []
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()
    finished = [threading.Event() for _ in replicas]

    def dispatcher(index: int) -> None:
        try:
            for _ in range(DISPATCH_CALLS_PER_ROUND):
                got = replicas[index].leases.dispatch(now)
                with lock:
                    assigned.extend(got)
        finally:
            finished[index].set()

    def claimer(services: Services, worker: TestWorker) -> None:
        # Claim again and again while dispatch runs, so claims race dispatch and each other.
        calls = 0
        while calls < MIN_CLAIM_CALLS_PER_ROUND or not all(e.is_set() for e in finished):
            got = services.leases.claim(worker.principal, MAX_CONCURRENCY, now)
            calls += 1
            with lock:
                claimed.extend((job.job_id, worker.id) for job in got)

    # Each worker claims through both replicas at once, as a worker whose poll was retried
    # on another replica would.
    tasks: list[Callable[[], None]] = [partial(dispatcher, i) for i in range(len(replicas))]
    tasks += [partial(claimer, r, w) for w in workers for r in replicas]
    _run_all(tasks)
    # Whatever was assigned after a worker's last claim is still waiting for it.
    for i, w in enumerate(workers):
        for job in replicas[i % 2].leases.claim(w.principal, MAX_CONCURRENCY, now):
            claimed.append((job.job_id, w.id))
    return assigned, claimed


def _complete_all(
    replicas: list[Services],
    workers: list[TestWorker],
    claimed: list[tuple[str, str]],
    now: float,
) -> None:
    by_id = {w.id: w for w in workers}
    for n, (job_id, worker_id) in enumerate(claimed):
        services = replicas[n % 2]
        worker = by_id[worker_id]
        services.leases.start(worker.principal, job_id, 1, now)
        price = agreed_price(services, job_id)
        req = completion(
            worker, job_id, 1, {"embeddings": [[0.5, 0.5]]}, units=1, price_wei_per_unit=price
        )
        services.leases.complete(worker.principal, job_id, req, now)


def _assert_final_state(store: Store, workers: list[TestWorker]) -> None:
    with store.read() as s:
        states = Counter(s.scalars(select(Job.state)))
        assert states == {JobState.SUCCEEDED.value: N_JOBS}
        assignments = dict(
            s.execute(
                select(JobEvent.job_id, func.count())
                .where(JobEvent.state == JobState.ASSIGNED.value)
                .group_by(JobEvent.job_id)
            ).all()
        )
        assert len(assignments) == N_JOBS
        assert set(assignments.values()) == {1}
        rows = list(s.scalars(select(Worker).where(Worker.id.in_([w.id for w in workers]))))
        assert all(row.free_slots >= 0 for row in rows)
        assert sum(row.jobs_succeeded for row in rows) == N_JOBS


def test_migrations_form_one_line_of_history() -> None:
    # Two branches adding a revision each on top of the same parent would leave two heads,
    # and Store.migrate() ("head") would refuse to start.
    scripts = ScriptDirectory(str(MIGRATIONS_DIR))
    assert len(scripts.get_heads()) == 1
    assert len(scripts.get_bases()) == 1


# -- SQLite only -------------------------------------------------------------------------------


def test_sqlite_store_runs_in_wal_mode(sqlite_store: Store) -> None:
    for engine in (sqlite_store.engine, sqlite_store.read_engine):
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            conn.rollback()


def test_sqlite_store_creates_the_folder_of_its_file(tmp_path: Any) -> None:
    store = Store(f"sqlite:///{tmp_path / 'deep' / 'er' / 'orchestrator.db'}")
    try:
        store.migrate()
        assert (tmp_path / "deep" / "er" / "orchestrator.db").is_file()
    finally:
        store.dispose()


# -- URLs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["mysql://user@localhost/db", "oracle://scott@localhost/orcl"])
def test_store_rejects_an_unsupported_database(url: str) -> None:
    with pytest.raises(ValueError, match=r"unsupported database .*sqlite:// or postgresql://"):
        Store(url)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u@h:5432/db", "postgresql+psycopg://u@h:5432/db"),
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_postgres_urls_get_the_psycopg_driver(given: str, expected: str) -> None:
    assert normalize_db_url(given) == expected


def _backend_pid(store: Store) -> int:
    with store.transaction() as s:
        return int(s.scalar(text("SELECT pg_backend_pid()")))


def _terminate(pid: int) -> None:
    """End the backend ``pid`` and wait (up to 5 s) until it has exited."""
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        ended = conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()
        assert ended is not None and ended[0], f"backend {pid} did not exit"


@pytest.mark.postgres
def test_a_pooled_connection_that_died_while_idle_is_replaced_before_use(
    postgresql_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection idle for PG_PING_AFTER_IDLE_S is pinged at checkout, and a dead one is
    replaced: the transaction runs, on another backend."""
    dead = _backend_pid(postgresql_store)
    _terminate(dead)
    monkeypatch.setattr(engine_module, "PG_PING_AFTER_IDLE_S", 0.0)
    assert _backend_pid(postgresql_store) != dead


@pytest.mark.postgres
def test_a_connection_used_moments_ago_is_not_pinged_and_a_retry_gets_a_new_one(
    postgresql_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within PG_PING_AFTER_IDLE_S no ping (the busy path): a connection that died meanwhile
    fails its statement as a transient error, the pool is invalidated, and the re-run that
    retry_transient makes runs on a new connection."""
    monkeypatch.setattr(engine_module, "PG_PING_AFTER_IDLE_S", 3600.0)
    first = _backend_pid(postgresql_store)
    _terminate(first)
    with pytest.raises(DBAPIError) as failed:
        _backend_pid(postgresql_store)
    assert is_transient(failed.value)

    second = _backend_pid(postgresql_store)  # the pool was invalidated: a new connection
    _terminate(second)
    attempts: list[int] = []

    def counted(store: Store) -> int:
        attempts.append(1)
        return _backend_pid(store)

    assert retry_transient(counted)(postgresql_store) not in (first, second)
    assert len(attempts) == 2  # the first met the dead connection; the re-run did not


def test_jobs_submitted_together_read_back_exactly(
    any_services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's jobs and their events go in one INSERT each (on PostgreSQL as one JSON
    parameter, store/engine.py insert_rows): wei amounts past 2**64, nested JSON, text
    beyond ASCII, floats, booleans, NULLs and the columns' defaults read back as they were
    given. Never job by job: that is the fallback for a batch whose INSERT failed."""
    services = any_services
    client, _ = new_client(services)

    def one_by_one(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the batch's INSERT failed; it fell back to one job at a time")

    monkeypatch.setattr(services.jobs, "submit", one_by_one)
    price = 2**70 + 3
    specs = [
        JobSpec.model_validate(
            {
                "type": "inference",
                "model": EMBED_MODEL,
                "input": {"texts": [f'naïve café {i} \u2603 "quoted" \\ back']},
                "max_price_wei_per_unit": price + i,
                "idempotency_key": f'clé-{i}-\u2603-"\\',
            }
        )
        for i in range(3)
    ]
    items = services.jobs.batch.submit(client, specs, services.now())
    ids = [item.job.id for item in items if item.job is not None]
    assert len(ids) == 3
    with services.store.read() as s:
        jobs = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}
        history = list(
            s.scalars(select(JobEvent).where(JobEvent.job_id.in_(ids)).order_by(JobEvent.id))
        )
    assert [e.job_id for e in history] == ids  # ids follow the rows' order
    events = Counter(e.job_id for e in history)
    for i, job_id in enumerate(ids):
        job = jobs[job_id]
        assert job.max_price_wei_per_unit == price + i
        assert job.spec["input"]["texts"] == [f'naïve café {i} \u2603 "quoted" \\ back']
        assert job.idempotency_key == f'clé-{i}-\u2603-"\\'
        assert job.created_at == services.now() and job.deadline_at > job.created_at
        assert job.delivered is False and job.excluded_workers == [] and job.worker_id is None
        assert job.state == JobState.QUEUED
        assert events[job_id] == 1


def test_rows_updated_together_read_back_exactly(any_services: Services) -> None:
    """``update_rows`` (a batch's results, recorded set-based; on PostgreSQL one JSON
    parameter): wei amounts past 2**64, a result's canonical JSON kept as its text, text
    beyond ASCII, floats and NULLs read back as given, each row by its own id. Rows JSON
    cannot carry (a NUL character) take SQLAlchemy's executemany UPDATE, with the same
    result."""
    services = any_services
    client, _ = new_client(services)
    spec = JobSpec.model_validate(
        {
            "type": "inference",
            "model": EMBED_MODEL,
            "input": {"texts": ["a"]},
            "max_price_wei_per_unit": 1_000,
        }
    )
    items = services.jobs.batch.submit(client, [spec] * 4, services.now())
    ids = [item.job.id for item in items if item.job is not None]
    wei = 2**70 + 3

    def output(i: int, text: str) -> CanonicalJSON:
        value = {"embeddings": [[0.5, -1e-300 * i]], "note": text}
        return CanonicalJSON(value, canonical_json(value).decode())

    def rows(job_ids: list[str], text: str) -> list[dict[str, Any]]:
        return [
            {
                "id": job_id,
                "cost_wei": wei + i,
                "output": output(i, text),
                "energy_source": f"é{i}",
                "duration_s": 0.1 * i,
                "lease_expires_at": None,
            }
            for i, job_id in enumerate(job_ids)
        ]

    as_json = rows(ids[:2], 'naïve \u2603 "quoted" \\ back')
    with_nul = rows(ids[2:], "before\x00after")
    assert engine_module._json_rows(Job.__table__, as_json, fill_defaults=False) is not None
    assert engine_module._json_rows(Job.__table__, with_nul, fill_defaults=False) is None
    with services.store.transaction() as s:
        update_rows(s.connection(), Job, as_json)
        update_rows(s.connection(), Job, with_nul)
    with services.store.read() as s:
        jobs = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}
        texts = dict(s.execute(select(Job.id, cast(Job.output, Text)).where(Job.id.in_(ids))).all())
    for row in as_json + with_nul:
        job = jobs[row["id"]]
        assert job.cost_wei == row["cost_wei"]
        assert job.output == dict(row["output"])
        assert texts[job.id] == row["output"].text  # the canonical text, as it was hashed
        assert job.energy_source == row["energy_source"]
        assert job.duration_s == row["duration_s"]
        assert job.lease_expires_at is None
        assert job.state == JobState.QUEUED  # untouched columns stay


def test_among_selects_the_rows_named_with_one_parameter_on_postgresql(
    any_services: Services,
) -> None:
    """``Store.among`` is ``IN`` on SQLite and ``= ANY(array)`` on PostgreSQL: the same rows
    (none for no values), and on PostgreSQL one parameter whatever the number of values."""
    services = any_services
    store = services.store
    client, _ = new_client(services)
    spec = JobSpec.model_validate(
        {"type": "inference", "model": EMBED_MODEL, "input": {"texts": ["a"]}}
        | {"max_price_wei_per_unit": 1_000}
    )
    items = services.jobs.batch.submit(client, [spec] * 5, services.now())
    ids = [item.job.id for item in items if item.job is not None]
    with store.read() as s:
        for wanted in ([], ids[:1], ids[1:4], [*ids, "no-such-job"]):
            query = select(Job.id).where(store.among(Job.id, wanted))
            assert sorted(s.scalars(query)) == sorted(set(wanted) & set(ids))
            sql = str(query.compile(dialect=s.get_bind().dialect))
            assert ("= ANY (" in sql) is store.is_postgres and (" IN " in sql) is not (
                store.is_postgres
            )


def test_a_batch_whose_input_holds_a_nul_character_is_stored_whole(
    any_services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JSON column holds a NUL character, but json_populate_recordset cannot pass one on to
    it: such rows take SQLAlchemy's INSERT (still one statement, never job by job)."""
    services = any_services
    client, _ = new_client(services)

    def one_by_one(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the batch's INSERT failed; it fell back to one job at a time")

    monkeypatch.setattr(services.jobs, "submit", one_by_one)
    text_with_nul = "before\x00after"
    spec = JobSpec.model_validate(
        {
            "type": "inference",
            "model": EMBED_MODEL,
            "input": {"texts": [text_with_nul]},
            "max_price_wei_per_unit": 1_000,
        }
    )
    items = services.jobs.batch.submit(client, [spec, spec], services.now())
    ids = [item.job.id for item in items if item.job is not None]
    assert len(ids) == 2
    with services.store.read() as s:
        for job in s.scalars(select(Job).where(Job.id.in_(ids))):
            assert job.spec["input"]["texts"] == [text_with_nul]
