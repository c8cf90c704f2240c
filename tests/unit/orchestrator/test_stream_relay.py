"""Relayed stream chunks (from another replica): taken once and in order, parts and all, and
split by the bus into NOTIFY payloads under PostgreSQL's limit."""

from __future__ import annotations

import json

from orchestrator.services.replicas import NOTIFY_PAYLOAD_MAX_BYTES, PgWakeBus
from orchestrator.services.streams import RelayedChunk, TokenStreams
from orchestrator.services.wakeups import WakeHub
from orchestrator.store import Store
from protocol.generation import StreamChunk

JOB = "job-1"


def _part(seq: int, text: str, part: int = 0, parts: int = 1, attempt: int = 1) -> RelayedChunk:
    return RelayedChunk(JOB, attempt, seq, part, parts, text, 1 if part == parts - 1 else 0)


def test_relayed_chunks_are_taken_once_in_order(sqlite_store: Store) -> None:
    streams = TokenStreams(sqlite_store, WakeHub())
    for chunk in [
        _part(0, "He", 0, 2),
        _part(0, "llo", 1, 2),
        _part(0, "llo", 1, 2),  # a part again: dropped
        _part(2, "rld", 1, 2),  # a later part whose first never came: dropped
        _part(3, "!"),  # seq 1 and 2 lost: the next whole chunk is taken
        _part(1, " wo"),  # older than what was taken: dropped
    ]:
        streams.take_relayed(chunk)
    view = streams.read(JOB, None, 0)
    assert view is not None and (view.chunks, view.tokens) == (["He", "llo", "!"], 2)
    # a newer attempt starts the stream over; the old one's chunks are dropped after it
    streams.take_relayed(_part(0, "Again", attempt=2))
    streams.take_relayed(_part(5, "late", attempt=1))
    view = streams.read(JOB, None, 0)
    assert view is not None and (view.attempt, view.chunks) == (2, ["Again"])


def test_a_long_chunk_goes_in_parts_under_the_payload_limit(sqlite_store: Store) -> None:
    bus = PgWakeBus(sqlite_store, WakeHub())
    text = "\x01é\U0001f600" * 2000  # the widest JSON there is: escapes and 4-byte characters
    payloads = bus._stream_payloads(JOB, StreamChunk(attempt=1, seq=4, text=text, tokens=9))
    assert len(payloads) > 1
    assert all(len(p.encode()) < NOTIFY_PAYLOAD_MAX_BYTES for p in payloads)
    bodies = [json.loads(p) for p in payloads]
    assert "".join(b["x"] for b in bodies) == text
    assert [b["p"] for b in bodies] == list(range(len(bodies)))
    assert {b["n"] for b in bodies} == {len(bodies)} and {b["s"] for b in bodies} == {4}
    assert [b["k"] for b in bodies] == [0] * (len(bodies) - 1) + [9]
    # what another replica takes from them is the chunk, whole
    streams = TokenStreams(sqlite_store, WakeHub())
    for b in bodies:
        streams.take_relayed(RelayedChunk(JOB, b["a"], b["s"], b["p"], b["n"], b["x"], b["k"]))
    view = streams.read(JOB, None, 0)
    assert view is not None and "".join(view.chunks) == text and view.tokens == 9
