"""The ``Store``: engines, transactions and migrations for SQLite and PostgreSQL.

SQLite runs in WAL mode. Write transactions there start with ``BEGIN IMMEDIATE`` so two
writers never deadlock upgrading a read lock (SQLite would fail one with "database is
locked" at once instead of waiting); reads use a second engine with plain ``BEGIN``.
Within one process, SQLite writers also take turns on a lock of the ``Store``: SQLite makes a
blocked writer poll, sleeping up to 100 ms between tries, so under concurrent requests the
database sat idle while writers slept; the lock hands it over at once. The busy timeout still
covers writers in other processes.

Lock order (PostgreSQL; SQLite has one writer at a time and cannot deadlock). Every write
transaction takes row locks in this order, so no two can wait on each other in a cycle:

1. ``jobs`` rows: the job being changed, then (a verification check) its parent job;
2. ``workers`` rows: at most one the transaction waits for, or several in ``id`` order, all
   at once (a result locks its worker with every worker its verification verdict or its
   input blame may touch, in one ``SELECT ... ORDER BY id FOR UPDATE``);
3. ledger, voucher, slash and redemption rows.

Dispatch is the one path that locks many workers at once and then jobs; it takes both with
``SKIP LOCKED``, so it never waits on a row another transaction holds and cannot be in a
cycle. A transaction that still fails on a transient error (deadlock, serialization failure,
a dropped connection) is rolled back whole and re-run by ``retry_transient`` on the service
method that owns it; what is left after the retries is answered 503 with Retry-After, never 500.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    ARRAY,
    JSON,
    Boolean,
    ColumnElement,
    Engine,
    Float,
    Integer,
    String,
    Table,
    any_,
    bindparam,
    create_engine,
    event,
    insert,
    text,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, InvalidatePoolError
from sqlalchemy.orm import QueryableAttribute, Session, sessionmaker
from sqlalchemy.sql.schema import CallableColumnDefault, ScalarElementColumnDefault

from orchestrator.store.models import Base, JobEvent, WeiAmount

log = logging.getLogger("gpumarket.orchestrator.store")

SQLITE_BUSY_TIMEOUT_MS = 10_000
SQLITE_POOL_SIZE = 40
"""Connections kept per SQLite engine: anyio's default thread pool (40 request threads)."""
SQLITE_MIGRATION_LOCK_TIMEOUT_S = 120.0
PG_CONNECT_TIMEOUT_S = 5
PG_STATEMENT_TIMEOUT_MS = 30_000
# A pooled connection unused this long is pinged before it is handed out (see _ping_when_idle).
PG_PING_AFTER_IDLE_S = 5.0
PG_MIGRATION_LOCK_ID = 0x67706D6B  # "gpmk": one migrator at a time across replicas
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Alembic keeps the running migration in module globals (alembic.context, alembic.op), so two
# upgrades in one process must not overlap even on different databases.
_MIGRATION_LOCK = threading.Lock()
# A transaction that lost a deadlock or a serialization check is re-run this many times in all,
# after a short random pause (so two that collided do not collide again in step).
TRANSIENT_ATTEMPTS = 4
TRANSIENT_BACKOFF_S = 0.02
# SQLSTATEs worth a re-run: serialization failure, deadlock, and the server or connection going
# away under us (a failover or a restart): the transaction was rolled back whole.
TRANSIENT_SQLSTATES = frozenset(
    {"40001", "40P01", "57P01", "57P02", "57P03", "08000", "08003", "08006"}
)

P = ParamSpec("P")
R = TypeVar("R")


def is_transient(exc: BaseException) -> bool:
    """True for a database error that a re-run of the same transaction may not meet again."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in TRANSIENT_SQLSTATES:
        return True
    # SQLite: another process held the write lock past the busy timeout.
    return isinstance(exc.orig, sqlite3.OperationalError) and "locked" in str(exc.orig)


def retry_transient(fn: Callable[P, R]) -> Callable[P, R]:
    """Re-run ``fn`` when its transaction fails on a transient database error.

    Only for a function whose effects are all in the transactions it runs, and whose re-run
    after a rollback is the same request again (every service method keyed by job id and
    attempt is). The last failure propagates; the API answers it 503 with Retry-After.
    """

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
            try:
                return fn(*args, **kwargs)
            except DBAPIError as exc:
                if attempt == TRANSIENT_ATTEMPTS or not is_transient(exc):
                    raise
                log.info(
                    "%s: transient database error (%s), re-running (try %d of %d)",
                    fn.__qualname__,
                    getattr(exc.orig, "sqlstate", None) or type(exc.orig).__name__,
                    attempt + 1,
                    TRANSIENT_ATTEMPTS,
                )
                time.sleep(random.uniform(0, TRANSIENT_BACKOFF_S * attempt))
        raise AssertionError("unreachable")

    return run


def _enable_wal(cur: Any) -> None:
    """Switch the file to WAL, waiting out another process that holds it.

    Switching needs an exclusive lock, and SQLite answers "database is locked" at once,
    without calling the busy handler, while another connection is opening the same new file
    (two replicas starting together). WAL is a property of the file, so once any connection
    has switched it the others see ``wal`` and stop.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def _sqlite_engine(url: str, *, immediate: bool) -> Engine:
    engine = create_engine(
        url,
        json_serializer=store_json,
        connect_args={"check_same_thread": False, "timeout": 10},
        # As many kept connections as the request threads that may hold one: past the default
        # five, each extra connection was opened (PRAGMAs, WAL check) and closed per use.
        pool_size=SQLITE_POOL_SIZE,
        max_overflow=SQLITE_POOL_SIZE,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _enable_wal(cur)
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _postgres_engine(url: str, schema: str | None) -> Engine:
    options = f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}"
    if schema:
        options += f" -c search_path={schema}"
    engine = create_engine(
        url,
        json_serializer=store_json,
        pool_size=10,
        max_overflow=10,
        connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S, "options": options},
    )
    # Many rows inserted through SQLAlchemy (what insert_rows leaves to it, and other tables)
    # go as one INSERT ... VALUES (...), (...) per 1,000 rows, as psycopg2's dialect does:
    # psycopg 3's executemany sends a statement per row (pipelined), each parsed, bound and
    # run by the server. Measured on row b of the bench: 16 statements per job -> 6.4.
    engine.dialect.use_insertmanyvalues_wo_returning = True
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """``pool_pre_ping``, for connections that sat idle in the pool ``PG_PING_AFTER_IDLE_S``
    or more: the ping is a round trip, and pinging at every checkout cost a busy orchestrator
    about 0.1 ms of CPU per transaction (and its latency), for connections used milliseconds
    before. A dead idle connection (the server restarted, a failover, an idle timeout) is
    replaced, and every connection older than it too, as with pre-ping. One that dies while in
    use fails its statement: SQLAlchemy invalidates the pool, and ``retry_transient`` re-runs
    the transaction on a new connection."""

    @event.listens_for(engine, "checkin")
    def _idle_from(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        idle_s = time.monotonic() - since if since is not None else 0.0
        if idle_s < PG_PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise InvalidatePoolError(f"a connection idle for {idle_s:.0f} s is gone") from exc


def normalize_db_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` and pick the psycopg 3 driver."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


class CanonicalJSON(dict[str, Any]):
    """A JSON object whose text is already made: a result's output, in the canonical JSON its
    sha256 was checked over. The store writes that text as is (``store_json``) instead of
    serializing the object again; for an embedding that was a second pass over every float."""

    __slots__ = ("text",)

    def __init__(self, value: dict[str, Any], text: str) -> None:
        super().__init__(value)
        self.text = text


def store_json(value: Any) -> str:
    """The JSON columns' serializer: a ``CanonicalJSON``'s own text, else ``json.dumps``."""
    if isinstance(value, CanonicalJSON):
        return value.text
    return json.dumps(value)


PENDING_EVENTS = "pending_job_events"
"""Key in ``Session.info``: job events noted by ``services.lifecycle.record_event``."""


def write_pending_events(session: Session) -> None:
    """Write the job events noted since the last flush, in one statement (after the flush
    has written the jobs they reference)."""
    rows = session.info.pop(PENDING_EVENTS, None)
    if rows:
        insert_rows(session.connection(), JobEvent, rows)


def insert_rows(connection: Connection, model: type[Base], rows: list[dict[str, Any]]) -> None:
    """INSERT ``rows`` of ``model`` (dicts with the same keys: column names) in one statement,
    in their order (ids from a sequence follow it).

    On PostgreSQL the rows go as one JSON parameter (``json_populate_recordset``). A multi-row
    ``INSERT ... VALUES`` of 100 jobs has 3,000 parameters, and psycopg parses such a statement
    again at every execution (it keeps the parse only for statements of at most 50 parameters
    and 4 KiB): 5 ms per 100 jobs, about a tenth of the orchestrator's CPU per job in the
    bench's row b. A statement with one parameter is parsed once, and prepared by the server.
    Only for what JSON carries exactly (``_json_rows``): wei amounts as JSON integers, text,
    finite floats, booleans, JSON values; anything else, and SQLite, take SQLAlchemy's INSERT.
    """
    table = cast(Table, model.__table__)
    payload = _json_rows(table, rows) if connection.dialect.name == "postgresql" else None
    if payload is None:
        connection.execute(insert(table), rows)
        return
    quote = connection.dialect.identifier_preparer.quote
    columns = ", ".join(quote(name) for name in payload[0])
    name = quote(table.name)
    connection.execute(
        text(
            f"INSERT INTO {name} ({columns}) SELECT {columns} "
            f"FROM json_populate_recordset(NULL::{name}, :rows) WITH ORDINALITY AS r "
            "ORDER BY r.ordinality"
        ),
        {"rows": payload[1]},
    )


def update_rows(connection: Connection, model: type[Base], rows: list[dict[str, Any]]) -> None:
    """UPDATE rows of ``model`` by their ``id`` (each dict: ``id`` and the same other column
    names, the new values), in one statement; the ids must differ.

    On PostgreSQL the rows go as one JSON parameter, as ``insert_rows``'s do (``UPDATE ...
    FROM json_populate_recordset``): an executemany UPDATE is one statement per row there, each
    with its own parse and bind. Elsewhere, and for values JSON does not carry exactly,
    SQLAlchemy's executemany UPDATE."""
    table = cast(Table, model.__table__)
    names = [name for name in rows[0] if name != "id"]
    payload = (
        _json_rows(table, rows, fill_defaults=False)
        if connection.dialect.name == "postgresql"
        else None
    )
    if payload is None:
        statement = (
            update(table)
            .where(table.c.id == bindparam("key_id"))
            .values({name: bindparam(f"new_{name}", type_=table.c[name].type) for name in names})
        )
        connection.execute(
            statement,
            [{"key_id": row["id"], **{f"new_{n}": row[n] for n in names}} for row in rows],
        )
        return
    quote = connection.dialect.identifier_preparer.quote
    name = quote(table.name)
    sets = ", ".join(f"{quote(column)} = r.{quote(column)}" for column in names)
    connection.execute(
        text(
            f"UPDATE {name} SET {sets} FROM json_populate_recordset(NULL::{name}, :rows) AS r "
            f"WHERE {name}.id = r.id"
        ),
        {"rows": payload[1]},
    )


# Column types whose values JSON carries exactly into json_populate_recordset (Text and
# BigInteger are subclasses of String and Integer).
_JSON_EXACT_TYPES = (String, Integer, Float, Boolean, WeiAmount)


def _json_rows(
    table: Table, rows: list[dict[str, Any]], *, fill_defaults: bool = True
) -> tuple[list[str], str] | None:
    """The column names and JSON text of ``rows`` for ``insert_rows`` (with the columns'
    Python-side defaults filled in: SQLAlchemy's INSERT fills them, a text statement does not)
    or ``update_rows`` (``fill_defaults`` False); None where SQLAlchemy's own statement must
    run: a single row, a column type or value JSON does not carry as SQLAlchemy would bind it
    (a JSON column's None is JSON null there, SQL NULL here), a non-finite float, or a default
    that is a SQL expression or takes an execution context. A ``CanonicalJSON`` value goes in
    as its own text, as ``store_json`` writes it."""
    if len(rows) < 2:
        return None
    names = list(rows[0])
    json_columns = []
    for name in names:
        column_type = table.c[name].type
        if isinstance(column_type, JSON):
            json_columns.append(name)
        elif not isinstance(column_type, _JSON_EXACT_TYPES):
            return None
    made_text: set[str] = set()  # JSON columns with a CanonicalJSON in some row
    for row in rows:
        for name in json_columns:
            if row[name] is None:
                return None
            if isinstance(row[name], CanonicalJSON):
                made_text.add(name)
    filled: dict[str, Any] = {}
    for column in table.c:
        default = column.default
        if not fill_defaults or column.name in names or default is None:
            continue
        if isinstance(default, ScalarElementColumnDefault):
            filled[column.name] = default.arg
            continue
        # A function of nothing (``default=list``), which SQLAlchemy wraps to take a context.
        callable_default = default if isinstance(default, CallableColumnDefault) else None
        made = getattr(callable_default.arg, "__wrapped__", None) if callable_default else None
        if made is None:
            return None
        filled[column.name] = made()
    if filled:
        rows = [{**filled, **row} for row in rows]
    try:
        if made_text:
            payload = "[" + ",".join(_row_json(row, made_text) for row in rows) + "]"
        else:
            payload = json.dumps(rows, allow_nan=False)
    except (TypeError, ValueError):  # a value JSON cannot carry: SQLAlchemy binds it
        return None
    # A NUL character (escaped \u0000): a JSON column holds it, but json_populate_recordset
    # cannot turn it into text on the way there; SQLAlchemy binds the column's JSON whole.
    return None if "\\u0000" in payload else ([*filled, *names], payload)


def _row_json(row: dict[str, Any], made_text: set[str]) -> str:
    """One row as a JSON object, the ``made_text`` columns' CanonicalJSON values as their own
    text (valid JSON: the canonical form a result's hash was checked over)."""
    rest = json.dumps({k: v for k, v in row.items() if k not in made_text}, allow_nan=False)
    spliced = ",".join(
        f"{json.dumps(name)}:"
        + (
            row[name].text
            if isinstance(row[name], CanonicalJSON)
            else json.dumps(row[name], allow_nan=False)
        )
        for name in made_text
    )
    return rest[:-1] + ("," if rest != "{}" else "") + spliced + "}"


BEFORE_COMMIT = "before_commit"
"""Key in ``Session.info``: work noted by ``before_commit``, done once as the transaction
commits."""


def before_commit(session: Session, key: Hashable, work: Callable[[], object]) -> None:
    """Do ``work`` once, just before ``session``'s transaction commits (not at all if it rolls
    back); noting the same ``key`` again replaces the earlier work. For what a transaction
    should do once however many rows asked for it: a voucher that many jobs paid into is
    signed once, over its final amount."""
    session.info.setdefault(BEFORE_COMMIT, {})[key] = work


def _flush_with_events(session: Session) -> None:
    """Before a commit: the work noted for it, a flush, and the events (even when the flush
    had nothing to do)."""
    for work in session.info.pop(BEFORE_COMMIT, {}).values():
        work()
    session.flush()
    write_pending_events(session)


def _drop_noted(session: Session) -> None:
    session.info.pop(PENDING_EVENTS, None)
    session.info.pop(BEFORE_COMMIT, None)


class Store:
    """Source of truth for jobs, workers, clients and blobs' metadata.

    ``schema`` (PostgreSQL only) puts every table in that schema; tests use it to isolate runs.
    """

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        self.url = normalize_db_url(url)
        self.schema = schema
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = _sqlite_engine(self.url, immediate=True)
            self.read_engine = _sqlite_engine(self.url, immediate=False)
        elif self.dialect == "postgresql":
            self.engine = _postgres_engine(self.url, schema)
            self.read_engine = self.engine
        else:
            raise ValueError(
                f"unsupported database {self.dialect!r}: use sqlite:// or postgresql://"
            )
        self._write = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(self._write, "after_flush", lambda session, _: write_pending_events(session))
        event.listen(self._write, "before_commit", _flush_with_events)
        event.listen(self._write, "after_rollback", _drop_noted)
        self._read = sessionmaker(self.read_engine, expire_on_commit=False)
        # Reentrant: a nested write transaction behaves as it did without the lock (SQLite's
        # busy timeout), rather than deadlocking here.
        self._writer_turn: AbstractContextManager[Any] = (
            threading.RLock() if self.dialect == "sqlite" else nullcontext()
        )

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @property
    def libpq_url(self) -> str:
        """The PostgreSQL URL as psycopg takes it (for the listener and lock connections)."""
        return make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)

    @property
    def sqlite_path(self) -> str | None:
        """The SQLite file, or None (PostgreSQL, or an in-memory database)."""
        database = make_url(self.url).database
        if self.is_postgres or not database or database == ":memory:":
            return None
        return database

    def among(
        self, column: ColumnElement[Any] | QueryableAttribute[Any], values: Iterable[Any]
    ) -> ColumnElement[bool]:
        """``column IN values``, as one parameter on PostgreSQL (``column = ANY(:array)``).
        An IN list is a parameter per value: SQLAlchemy renders its placeholders at every
        execution, and psycopg parses a statement of more than 50 parameters again each time
        (a batch's reads and updates name 30 to 1,000 jobs); an array is one parameter, so
        the statement's text is the same whatever the number of values."""
        if self.is_postgres:
            return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
        return column.in_(list(values))

    def on_commit(self, callback: Callable[[Session], None]) -> None:
        """Call ``callback(session)`` after each write transaction commits (its ``info`` still
        holds what the transaction noted there); anything noted is dropped on rollback."""
        event.listen(self._write, "after_commit", callback)
        event.listen(self._write, "after_rollback", lambda session: session.info.clear())

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One write transaction: committed on success, rolled back on any exception."""
        with self._writer_turn, self._write.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session:
            yield session

    def _alembic_config(self, connection: Connection) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = connection
        return cfg

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (safe with several replicas)."""
        with _MIGRATION_LOCK, self._sqlite_migration_lock(), self.engine.connect() as conn:
            if self.is_postgres:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_MIGRATION_LOCK_ID})
                conn.commit()
            try:
                command.upgrade(self._alembic_config(conn), "head")
                conn.commit()
            finally:
                if self.is_postgres:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_MIGRATION_LOCK_ID})
                    conn.commit()

    @contextmanager
    def _sqlite_migration_lock(self) -> Iterator[None]:
        """Across processes, one migrator at a time on a SQLite file (PostgreSQL has its
        advisory lock). Without it two replicas starting on a new file both read "not
        migrated" and both run the same migration; the second fails on what the first made."""
        database = make_url(self.url).database
        if self.is_postgres or not database or database == ":memory:":
            yield
            return
        with open(f"{database}.migrate-lock", "a+b") as lock:
            deadline = time.monotonic() + SQLITE_MIGRATION_LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(
                            f"another process has been migrating {database} for over "
                            f"{SQLITE_MIGRATION_LOCK_TIMEOUT_S:g} s"
                        ) from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def schema_is_current(self) -> bool:
        """True when the database is at the newest migration (used by /readyz)."""
        head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
        with self.read_engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        return current == head

    def ping(self) -> None:
        with self.read_engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()
