"""What lets several orchestrator replicas share one database as one market.

- ``PgWakeBus``: a change committed on one replica wakes the long-polls waiting for it on every
  replica, through PostgreSQL ``LISTEN/NOTIFY`` (milliseconds instead of the waiters' 1 s
  fallback look at the store, which stays as a safety net). SQLite has one process, and wakes
  in-process only (``WakeHub``). The same bus carries generate jobs' token streams: each chunk
  a replica takes from a worker goes to the others (channel ``gpumarket_stream``, in parts
  under NOTIFY's payload limit), so a client reads it live on any replica.
- ``ReplicaRegistry``: what every replica must share (operator token, voucher signer, chain
  deployment, blob store) is checked at start-up against the live replicas, and a replica that
  disagrees refuses to start, naming the setting.
- ``DutyLock``: the background duties (lease and deadline sweep, stalled verifications,
  periodic dispatch, slash sending, reconcile, stake refresh) have one owner at a time: the
  replica holding a PostgreSQL advisory lock on a connection of its own. The lock goes with
  that connection, so when the owner dies (its socket closes, or keepalives give up on it) the
  next replica to ask takes over within one sweep interval. On SQLite, an ``flock`` on a file
  beside the database plays the same part across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import socket
import threading
import uuid
from collections.abc import Callable
from typing import IO, Any

import psycopg
from psycopg import sql
from sqlalchemy import delete, select, text

from orchestrator.services.streams import RelayedChunk
from orchestrator.services.wakeups import JOB_KEY_PREFIX, STREAM_KEY_PREFIX, WakeHub
from orchestrator.store import Store
from orchestrator.store.models import Replica
from protocol.generation import StreamChunk

log = logging.getLogger("gpumarket.orchestrator.replicas")

WAKE_CHANNEL = "gpumarket_wake"
STREAM_CHANNEL = "gpumarket_stream"
# NOTIFY payloads must stay under 8000 bytes: keys are sent in chunks below that.
NOTIFY_PAYLOAD_MAX_BYTES = 7000
# A stream chunk's text goes in parts of this many characters: JSON spends 6 bytes at most on
# one (an escaped control character), so a part and its envelope stay under the limit above.
STREAM_PART_CHARS = 1000
LISTEN_POLL_S = 0.5  # how often the listener looks up from its socket to see a stop
RECONNECT_BACKOFF_S = 1.0
CONNECT_TIMEOUT_S = 5
STOP_JOIN_TIMEOUT_S = 5.0
# The server drops a dead replica's lock connection after about idle + interval x count
# seconds when the replica's host vanished (a killed process closes its socket at once).
KEEPALIVE_OPTIONS = (
    "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3"
)

WORKER_KEY = "w:"
JOB_KEY = "j:"


def _connect(store: Store, *, keepalive: bool = False) -> psycopg.Connection[Any]:
    options = KEEPALIVE_OPTIONS if keepalive else ""
    if store.schema:
        options += f" -c search_path={store.schema}"
    return psycopg.connect(
        store.libpq_url,
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT_S,
        options=options.strip(),
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=3,
    )


def _scoped(name: str, store: Store) -> str:
    """A name of its own per schema, so markets sharing one PostgreSQL server stay apart."""
    return f"{name}_{store.schema}" if store.schema else name


class PgWakeBus:
    """Sends this replica's wake-ups to the others and delivers theirs to the local hub.

    ``publish`` only queues (it runs right after a commit, on a request thread); one thread
    sends what has queued as one ``pg_notify`` per chunk, and another listens. A message lost
    while the connection is down is covered by the waiters' fallback look at the store.
    """

    def __init__(self, store: Store, hub: WakeHub) -> None:
        self._store = store
        self._hub = hub
        self._channel = _scoped(WAKE_CHANNEL, store)
        self._stream_channel = _scoped(STREAM_CHANNEL, store)
        self._origin = uuid.uuid4().hex[:12]  # our own messages are delivered locally already
        # A wake-up key, or a stream chunk (job id, chunk) to relay; None stops the sender.
        self._outbox: queue.SimpleQueue[str | tuple[str, StreamChunk] | None] = queue.SimpleQueue()
        # Where the other replicas' stream chunks go (``TokenStreams.take_relayed``).
        self.on_stream_chunk: Callable[[RelayedChunk], None] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.listening = threading.Event()  # set while LISTEN is in force (tests wait on it)

    def publish(self, key: str) -> None:
        """Wake ``key``'s waiters on the other replicas: ``w:<worker id>`` or ``j:<job id>``."""
        self._outbox.put(key)

    def publish_chunk(self, job_id: str, chunk: StreamChunk) -> None:
        """Relay a stream chunk this replica took to the other replicas' readers."""
        self._outbox.put((job_id, chunk))

    def start(self) -> None:
        for target, name in (
            (self._send_forever, "wake-send"),
            (self._listen_forever, "wake-listen"),
        ):
            thread = threading.Thread(target=target, name=f"gpumarket-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._outbox.put(None)
        for thread in self._threads:
            thread.join(timeout=STOP_JOIN_TIMEOUT_S)
        self._threads.clear()

    # -- sending ---------------------------------------------------------------------------------

    def _next_keys(self) -> tuple[set[str], list[tuple[str, StreamChunk]]] | None:
        """Block for one key or chunk, then take whatever else has queued meanwhile (one
        NOTIFY for a burst of commits; chunks in the order they came); None when stopping."""
        try:
            first = self._outbox.get(timeout=LISTEN_POLL_S)
        except queue.Empty:
            return set(), []
        keys: set[str] = set()
        chunks: list[tuple[str, StreamChunk]] = []
        item = first
        while True:
            if item is None:
                return None
            if isinstance(item, str):
                keys.add(item)
            else:
                chunks.append(item)
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return keys, chunks

    def _stream_payloads(self, job_id: str, chunk: StreamChunk) -> list[str]:
        text = chunk.text
        parts = [text[i : i + STREAM_PART_CHARS] for i in range(0, len(text), STREAM_PART_CHARS)]
        parts = parts or [""]
        return [
            json.dumps(
                {
                    "o": self._origin,
                    "j": job_id,
                    "a": chunk.attempt,
                    "s": chunk.seq,
                    "p": i,
                    "n": len(parts),
                    "k": chunk.tokens if i == len(parts) - 1 else 0,
                    "x": part,
                },
                ensure_ascii=False,
            )
            for i, part in enumerate(parts)
        ]

    def _payloads(self, keys: set[str]) -> list[str]:
        payloads, chunk, size = [], [self._origin], len(self._origin)
        for key in sorted(keys):
            if size + 1 + len(key) > NOTIFY_PAYLOAD_MAX_BYTES:
                payloads.append(" ".join(chunk))
                chunk, size = [self._origin], len(self._origin)
            chunk.append(key)
            size += 1 + len(key)
        if len(chunk) > 1:
            payloads.append(" ".join(chunk))
        return payloads

    def _send_forever(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self._stop.is_set():
                batch = self._next_keys()
                if batch is None:
                    return
                keys, chunks = batch
                if not keys and not chunks:
                    continue
                try:
                    conn = conn or _connect(self._store)
                    # Text first: a job's end, woken next, finds its stream's text in place.
                    for job_id, chunk in chunks:
                        for payload in self._stream_payloads(job_id, chunk):
                            conn.execute(
                                "SELECT pg_notify(%s, %s)", (self._stream_channel, payload)
                            )
                    for payload in self._payloads(keys):
                        conn.execute("SELECT pg_notify(%s, %s)", (self._channel, payload))
                except psycopg.Error as exc:
                    log.warning("cannot send wake-ups to other replicas (%s); retrying", exc)
                    if conn is not None:
                        conn.close()
                    conn = None
                    self._stop.wait(RECONNECT_BACKOFF_S)
        finally:
            if conn is not None:
                conn.close()

    # -- listening -------------------------------------------------------------------------------

    def _listen_forever(self) -> None:
        while not self._stop.is_set():
            try:
                with _connect(self._store, keepalive=True) as conn:
                    for channel in (self._channel, self._stream_channel):
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self.listening.set()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=LISTEN_POLL_S):
                            if note.channel == self._stream_channel:
                                self._deliver_chunk(note.payload)
                            else:
                                self._deliver(note.payload)
            except psycopg.Error as exc:
                self.listening.clear()
                if self._stop.is_set():
                    return
                log.warning("lost the wake-up channel (%s); reconnecting", exc)
                self._stop.wait(RECONNECT_BACKOFF_S)
        self.listening.clear()

    def _deliver(self, payload: str) -> None:
        origin, _, rest = payload.partition(" ")
        if origin == self._origin:
            return
        for key in rest.split():
            if key.startswith(WORKER_KEY):
                self._hub.notify(key[len(WORKER_KEY) :])
            elif key.startswith(JOB_KEY):
                job_id = key[len(JOB_KEY) :]
                self._hub.notify_waiting(f"{JOB_KEY_PREFIX}{job_id}")
                # A stream's reader ends with its job, as on the replica that changed it.
                self._hub.notify_waiting(f"{STREAM_KEY_PREFIX}{job_id}")

    def _deliver_chunk(self, payload: str) -> None:
        try:
            body = json.loads(payload)
            if body["o"] == self._origin or self.on_stream_chunk is None:
                return
            chunk = RelayedChunk(
                job_id=str(body["j"]),
                attempt=int(body["a"]),
                seq=int(body["s"]),
                part=int(body["p"]),
                parts=int(body["n"]),
                text=str(body["x"]),
                tokens=int(body["k"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("dropped a stream chunk from another replica (%s)", exc)
            return
        self.on_stream_chunk(chunk)


def duty_lock_id(store: Store) -> int:
    """The advisory lock key of this market's background duties (a signed 64-bit int)."""
    digest = hashlib.sha256(_scoped("gpumarket_duties", store).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class DutyLock:
    """Whether this replica owns the background duties now; asked once per sweep round.

    Not thread-safe: the sweeper is its only caller.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._conn: psycopg.Connection[Any] | None = None
        self._file: IO[bytes] | None = None
        self._held = False

    def held(self) -> bool:
        """True while this replica holds the lock; tries to take it when it does not."""
        was_held = self._held
        if self._store.is_postgres:
            self._held = self._held_pg()
        else:
            self._held = self._held_file()
        if self._held != was_held:
            log.info(
                "this replica %s the background duties (sweep, reconcile, slashes, stakes)",
                "now runs" if self._held else "no longer runs",
            )
        return self._held

    def _held_pg(self) -> bool:
        try:
            if self._conn is None:
                self._conn = _connect(self._store, keepalive=True)
            if self._held:
                self._conn.execute("SELECT 1")  # the lock lives exactly as long as this link
                return True
            row = self._conn.execute(
                "SELECT pg_try_advisory_lock(%s)", (duty_lock_id(self._store),)
            ).fetchone()
            return bool(row and row[0])
        except psycopg.Error as exc:
            log.warning("duties lock connection failed (%s); will ask again", exc)
            self._close_pg()
            return False

    def _close_pg(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def _held_file(self) -> bool:
        path = self._store.sqlite_path
        if path is None:
            return True  # an in-memory database lives in this process alone
        if self._held:
            return True
        if self._file is None:
            self._file = open(f"{path}.duties-lock", "a+b")  # noqa: SIM115 (held for life)
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        """Give the duties up (a clean shutdown); another replica takes them at once."""
        self._close_pg()
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        self._held = False


# -- what every replica must share -------------------------------------------------------------

REPLICA_STALE_S = 15.0  # a replica not seen for this long is taken for dead
# Each fingerprint, and the setting that makes it agree.
SHARED_SETTINGS = {
    "admin_token_sha256": "the operator token (GPUMARKET_ADMIN_TOKEN)",
    "signer_address": "the voucher signer (GPUMARKET_SIGNER_KEY)",
    "deployment": "the chain and contracts (GPUMARKET_DEPLOYMENT_FILE)",
    "blob_store": "the blob store (GPUMARKET_BLOB_DIR: one folder every replica mounts)",
}


class ReplicaMismatch(ValueError):
    """This replica's settings disagree with those of a live replica on the same database."""


class ReplicaRegistry:
    """This process's row in ``replicas``: written at start (after checking that what must be
    shared is shared), kept fresh every sweep, removed on a clean stop."""

    def __init__(self, store: Store, config: dict[str, str | None]) -> None:
        self._store = store
        self.id = uuid.uuid4().hex
        self.config = config

    def join(self, now: float) -> None:
        """Check this replica against the live ones and record it. Idempotent.

        Raises ``ReplicaMismatch`` naming the setting that differs."""
        with self._store.transaction() as s:
            if self._store.is_postgres:  # one joiner at a time: two new replicas see each other
                s.execute(
                    text("SELECT pg_advisory_xact_lock(:k)"), {"k": duty_lock_id(self._store) ^ 1}
                )
            live = s.scalars(
                select(Replica).where(
                    Replica.seen_at >= now - REPLICA_STALE_S, Replica.id != self.id
                )
            )
            for other in live:
                self._check(other, now)
            mine = s.get(Replica, self.id)
            if mine is None:
                s.add(
                    Replica(
                        id=self.id,
                        host=socket.gethostname()[:255],
                        pid=os.getpid(),
                        started_at=now,
                        seen_at=now,
                        config=self.config,
                    )
                )
            else:
                mine.seen_at = now

    def _check(self, other: Replica, now: float) -> None:
        for key, setting in SHARED_SETTINGS.items():
            if other.config.get(key) != self.config.get(key):
                raise ReplicaMismatch(
                    f"{setting} differs from that of the replica running on {other.host} "
                    f"(pid {other.pid}, seen {max(0.0, now - other.seen_at):.0f} s ago) on this "
                    "database; every replica must use the same one"
                )

    def touch(self, now: float) -> None:
        """Still here (every sweep round); re-joins if a leader pruned us while we stalled."""
        with self._store.transaction() as s:
            mine = s.get(Replica, self.id, with_for_update=True)
            if mine is not None:
                mine.seen_at = now
                return
        self.join(now)

    def prune(self, now: float) -> int:
        """Forget replicas long dead (the duties' owner does this); returns how many."""
        with self._store.transaction() as s:
            gone = s.execute(delete(Replica).where(Replica.seen_at < now - 4 * REPLICA_STALE_S))
            return int(getattr(gone, "rowcount", 0) or 0)

    def leave(self) -> None:
        with self._store.transaction() as s:
            s.execute(delete(Replica).where(Replica.id == self.id))

    def live(self, now: float) -> list[Replica]:
        with self._store.read() as s:
            return list(
                s.scalars(
                    select(Replica)
                    .where(Replica.seen_at >= now - REPLICA_STALE_S)
                    .order_by(Replica.started_at)
                )
            )


def shared_config(
    admin_token: str, signer_address: str | None, deployment: str | None, blob_store: str
) -> dict[str, str | None]:
    """The fingerprints a replica is checked on (no secret is stored, only its sha256)."""
    return {
        "admin_token_sha256": hashlib.sha256(admin_token.encode()).hexdigest(),
        "signer_address": signer_address,
        "deployment": deployment,
        "blob_store": blob_store,
    }
