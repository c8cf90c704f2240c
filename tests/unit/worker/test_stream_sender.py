"""The worker's stream sender: every generating job's text in one request per flush, a job's
first text at once, each part's refusal handled for its own job alone."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

import pytest

from protocol import JobType, LeasedJob, Precision
from protocol.batches import ItemError, StreamPart, StreamPartItem
from worker.executors import pipelines
from worker.executors.pipelines import StreamSender


def _job(job_id: str) -> LeasedJob:
    now = datetime.now(UTC)
    return LeasedJob(
        job_id=job_id,
        attempt=1,
        type=JobType.GENERATE,
        model="m",
        precision=Precision.FP32,
        input={"prompt": "x"},
        price_wei_per_unit=1,
        lease_expires_at=now,
        deadline_at=now,
    )


def test_jobs_share_requests_first_text_goes_at_once_and_close_sends_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pipelines, "STREAM_FLUSH_S", 5.0)  # only urgent sends in this test
    sent: list[list[StreamPart]] = []

    async def publish(parts: list[StreamPart]) -> list[StreamPartItem]:
        sent.append(parts)
        return [StreamPartItem(job_id=p.job_id) for p in parts]

    async def run() -> None:
        sender = StreamSender(publish)
        sender.open(_job("a"))
        sender.open(_job("b"))
        # Both jobs' first tokens in the same step (nothing runs on the loop between them).
        sender.add("a", "Hel", 1)
        sender.add("b", "Hi", 1)
        for _ in range(100):
            if sent:
                break
            await asyncio.sleep(0.01)
        assert [[(p.job_id, p.seq, p.text) for p in parts] for parts in sent] == [
            [("a", 0, "Hel"), ("b", 0, "Hi")]
        ]
        # Later text is not urgent: it waits for the flush, or for its job to end.
        adders = [
            threading.Thread(target=sender.add, args=("a", "lo", 1)),
            threading.Thread(target=sender.add, args=("b", " there", 2)),
        ]
        for adder in adders:  # the generating thread adds text: it wakes nobody
            adder.start()
        for adder in adders:
            adder.join()
        await asyncio.sleep(0.2)
        assert len(sent) == 1
        await asyncio.wait_for(sender.close("a"), timeout=2)
        await asyncio.wait_for(sender.close("b"), timeout=2)
        texts: dict[str, list[str]] = {p.job_id: [] for parts in sent for p in parts}
        tokens = dict.fromkeys(texts, 0)
        for parts in sent:
            for part in parts:
                texts[part.job_id].append(part.text)
                tokens[part.job_id] += part.tokens
        assert {k: "".join(v) for k, v in texts.items()} == {"a": "Hello", "b": "Hi there"}
        assert tokens == {"a": 2, "b": 3}
        assert len(sent) <= 3  # the first texts together, then at most one request per close
        await sender.close_all()

    asyncio.run(run())


def test_a_refused_part_stops_its_own_job_and_a_failed_request_stops_none() -> None:
    lost: list[str] = []
    failing = {"request": False}

    async def publish(parts: list[StreamPart]) -> list[StreamPartItem]:
        if failing["request"]:
            raise ConnectionError("orchestrator unreachable")
        gone = ItemError(status=409, code="conflict", detail="attempt 1 is over")
        return [
            StreamPartItem(job_id=p.job_id, error=gone if p.job_id == "a" else None) for p in parts
        ]

    async def run() -> None:
        sender = StreamSender(publish)
        sender.open(_job("a"), on_lost=lambda: lost.append("a"))
        sender.open(_job("b"), on_lost=lambda: lost.append("b"))
        sender.open(_job("c"), on_lost=lambda: lost.append("c"))

        def generate() -> None:
            sender.add("a", "x", 1)
            sender.add("b", "y", 1)

        await asyncio.to_thread(generate)
        await asyncio.wait_for(sender.close("a"), timeout=2)
        await asyncio.wait_for(sender.close("b"), timeout=2)
        assert lost == ["a"]  # told once; b's part was taken
        failing["request"] = True
        await asyncio.to_thread(sender.add, "c", "z", 1)
        await asyncio.wait_for(sender.close("c"), timeout=2)  # the text is dropped, c goes on
        assert lost == ["a"]
        await sender.close_all()

    asyncio.run(run())


def test_a_sender_cancelled_as_text_arrives_ends_with_its_event_loop() -> None:
    """A run that ends (here: fails) while a job's first text wakes the sender cancels the
    sender's loop at the moment its wait completes; the loop must end all the same (on Python
    3.11, ``asyncio.wait_for`` could swallow that cancellation and the loop outlived
    ``asyncio.run``, which then waited for it forever)."""

    async def publish(parts: list[StreamPart]) -> list[StreamPartItem]:
        return [StreamPartItem(job_id=p.job_id) for p in parts]

    async def run() -> None:
        sender = StreamSender(publish)
        sender.open(_job("a"))
        sender.open(_job("b"))
        sender.add("a", "x", 1)
        await asyncio.sleep(0)
        sender.add("b", "y", 1)
        raise RuntimeError("the run ends here")

    def runs() -> None:
        for _ in range(20):
            with pytest.raises(RuntimeError):
                asyncio.run(run())

    thread = threading.Thread(target=runs, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "asyncio.run never returned: the sender outlived it"
