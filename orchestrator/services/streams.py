"""Token streams: the text a generate job's worker sends while it runs, held in memory for the
client reading it live (SSE: ``GET /v1/jobs/{id}/stream`` and the OpenAI-compatible routes).

A stream is a preview, never what is billed: the job's signed result (``output.text``, with its
token count) is what the client pays for and what verification checks. So streams live in this
process's memory only, one per job, for the job's current attempt: a newer attempt starts the
stream over (readers are told, see ``StreamView``), and a chunk of an older attempt after that
is refused (409), which tells its worker to stop generating.
Chunks carry a sequence number, so a resent chunk is taken once. Writers are woken readers via
the hub (``stream:<job id>``). With several replicas (PostgreSQL), each chunk a replica takes is
relayed to the others (``relay``, see ``replicas.PgWakeBus``), which append it with
``take_relayed``, so a client reads the stream live on any replica; a chunk lost on the way
leaves a gap in that preview only (the stream ends with the job's final state and its signed
text either way).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.exceptions import Conflict, Forbidden, NotFound
from orchestrator.services.auth import Principal
from orchestrator.services.lifecycle import is_leased
from orchestrator.services.wakeups import STREAM_KEY_PREFIX, WakeHub
from orchestrator.store import Store
from orchestrator.store.models import Job
from protocol.generation import StreamChunk

STREAMS_KEPT = 1024
"""Streams kept in memory at most (the oldest go first; a finished job's result stays)."""
MAX_STREAM_CHARS = 1_000_000
"""Text kept per stream at most; a worker that sends more is cut off there."""


def stream_key(job_id: str) -> str:
    return f"{STREAM_KEY_PREFIX}{job_id}"


@dataclass
class _Stream:
    attempt: int
    chunks: list[str] = field(default_factory=list)
    tokens: int = 0
    chars: int = 0
    next_seq: int = 0
    # Relayed chunks come in parts (a NOTIFY payload's limit): the parts of chunk ``next_seq``
    # taken so far.
    next_part: int = 0


@dataclass(frozen=True)
class StreamView:
    """What a reader has not seen yet: chunks from ``offset`` of ``attempt``'s stream."""

    attempt: int
    offset: int
    chunks: list[str]
    tokens: int


@dataclass(frozen=True)
class RelayedChunk:
    """A chunk one replica took, as the others get it: part ``part`` of ``parts`` of the
    worker's chunk ``seq``; ``tokens`` rides on the last part."""

    job_id: str
    attempt: int
    seq: int
    part: int
    parts: int
    text: str
    tokens: int


Relay = Callable[[str, StreamChunk], None]
"""Sends a chunk this replica took (job id, chunk) to the other replicas."""


class TokenStreams:
    def __init__(self, store: Store, hub: WakeHub, relay: Relay | None = None) -> None:
        self._store = store
        self._hub = hub
        self._relay = relay
        self._lock = threading.Lock()
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        # (job id, attempt, worker id) whose lease was checked: a stream's later chunks are not
        # (a lost lease shows at the worker's completion, refused; the stream is a preview).
        self._holders: OrderedDict[tuple[str, int, str], None] = OrderedDict()

    def append(self, worker: Principal, job_id: str, chunk: StreamChunk, now: float) -> None:
        """Take a chunk from the worker holding the job's lease for ``chunk.attempt``; the
        job's first text is timed (``first_token_at``, for /metrics)."""
        holder = (job_id, chunk.attempt, worker.id)
        with self._lock:
            known = holder in self._holders
        first = False if known else self._check_holder(worker, job_id, chunk.attempt)
        if not known:
            with self._lock:  # checked once per attempt: later chunks skip the store
                self._holders[holder] = None
                while len(self._holders) > STREAMS_KEPT:
                    self._holders.popitem(last=False)
        if first and chunk.text:
            with self._store.transaction() as s:
                job = s.get(Job, job_id, with_for_update=True)
                if job is not None and job.first_token_at is None:
                    job.first_token_at = now
        with self._lock:
            stream = self._streams.get(job_id)
            if stream is None or chunk.attempt > stream.attempt:
                stream = self._streams[job_id] = _Stream(attempt=chunk.attempt)
                while len(self._streams) > STREAMS_KEPT:
                    self._streams.popitem(last=False)
            if chunk.attempt < stream.attempt:
                raise Conflict(
                    f"attempt {chunk.attempt} of job {job_id} is over (attempt "
                    f"{stream.attempt} streams now); stop generating it",
                    current_attempt=stream.attempt,
                )
            if chunk.seq < stream.next_seq:
                return  # a resent chunk
            if stream.chars + len(chunk.text) > MAX_STREAM_CHARS:
                return
            stream.next_seq = chunk.seq + 1  # a skipped seq was dropped by the worker
            stream.next_part = 0
            stream.chunks.append(chunk.text)
            stream.tokens += chunk.tokens
            stream.chars += len(chunk.text)
        self._hub.notify_waiting(stream_key(job_id))
        if self._relay is not None:
            self._relay(job_id, chunk)

    def take_relayed(self, chunk: RelayedChunk) -> None:
        """Append a chunk another replica took (its lease was checked there), once and in
        order: a part already taken, or one whose earlier parts never came, is dropped."""
        with self._lock:
            stream = self._streams.get(chunk.job_id)
            if stream is None or chunk.attempt > stream.attempt:
                stream = self._streams[chunk.job_id] = _Stream(attempt=chunk.attempt)
                while len(self._streams) > STREAMS_KEPT:
                    self._streams.popitem(last=False)
            if chunk.attempt < stream.attempt:
                return
            if chunk.seq == stream.next_seq:
                in_order = chunk.part == stream.next_part
            else:  # a skipped seq was dropped by the worker; a chunk is taken from its start
                in_order = chunk.seq > stream.next_seq and chunk.part == 0
            if not in_order or stream.chars + len(chunk.text) > MAX_STREAM_CHARS:
                return
            if chunk.part + 1 < chunk.parts:
                stream.next_seq, stream.next_part = chunk.seq, chunk.part + 1
            else:
                stream.next_seq, stream.next_part = chunk.seq + 1, 0
            stream.chunks.append(chunk.text)
            stream.tokens += chunk.tokens
            stream.chars += len(chunk.text)
        self._hub.notify_waiting(stream_key(chunk.job_id))

    def _check_holder(self, worker: Principal, job_id: str, attempt: int) -> bool:
        """Refuse a chunk from anyone but the lease holder; True if the job has no first
        token time yet."""
        with self._store.read() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id}")
            if job.worker_id != worker.id:
                raise Forbidden(f"job {job_id} is not leased to you")
            if job.attempt != attempt or not is_leased(job):
                raise Conflict(
                    f"attempt {attempt} of job {job_id} is not running (the job is attempt "
                    f"{job.attempt}, {job.state}); stop streaming it",
                    current_attempt=job.attempt,
                )
            return job.first_token_at is None

    def read(self, job_id: str, attempt: int | None, offset: int) -> StreamView | None:
        """Chunks after ``offset`` of the current attempt's stream; from 0 when the attempt is
        not ``attempt`` (a retry started over). None when nothing was streamed yet."""
        with self._lock:
            stream = self._streams.get(job_id)
            if stream is None:
                return None
            start = offset if attempt == stream.attempt else 0
            return StreamView(
                attempt=stream.attempt,
                offset=len(stream.chunks),
                chunks=stream.chunks[start:],
                tokens=stream.tokens,
            )

    def wake(self, job_id: str) -> None:
        self._hub.notify_waiting(stream_key(job_id))
