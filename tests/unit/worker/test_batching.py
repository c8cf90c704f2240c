"""The asyncio dynamic batcher, with fake batch functions and once with the real model.

pytest-asyncio is not a dependency: each test drives its own loop with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
import torch

from protocol.jobs import Precision
from worker.batching import (
    BatcherClosed,
    BatcherPool,
    BatchSizeMismatch,
    DynamicBatcher,
)
from worker.executors.inference import BUILTIN_EMBEDDING_MODEL, ModelRegistry

# Generous upper bound so a broken batcher fails the test instead of hanging it; no test
# asserts how fast anything is.
NO_HANG_S = 30.0

X = TypeVar("X")


def run(coro: Awaitable[X]) -> X:
    async def bounded() -> X:
        return await asyncio.wait_for(coro, NO_HANG_S)

    return asyncio.run(bounded())


class EchoBatch:
    """A batch function that tags each item and records the batches it saw."""

    def __init__(self, delay_s: float = 0.0, fail_on: str | None = None) -> None:
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.batches: list[list[str]] = []
        self.threads: set[int] = set()

    def __call__(self, items: list[str]) -> list[str]:
        self.threads.add(threading.get_ident())
        self.batches.append(list(items))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot process {self.fail_on}")
        return [f"out:{item}" for item in items]


def test_concurrent_submits_are_batched_and_routed_back() -> None:
    echo = EchoBatch(delay_s=0.01)
    batcher: DynamicBatcher[str, str] = DynamicBatcher(echo, max_batch=16, max_wait_s=0.05)

    async def scenario() -> list[list[str]]:
        results = await asyncio.gather(*(batcher.submit([f"s{i}"]) for i in range(64)))
        await batcher.close()
        return list(results)

    results = run(scenario())
    assert results == [[f"out:s{i}"] for i in range(64)]
    stats = batcher.stats
    assert stats.items == 64
    assert stats.batches == len(echo.batches) < 64
    assert 1 < stats.max_batch_size <= 16
    assert sum(size * count for size, count in stats.batch_sizes.items()) == 64
    assert threading.get_ident() not in echo.threads  # ran off the event loop's thread


def test_a_jobs_items_stay_together_and_in_order() -> None:
    echo = EchoBatch(delay_s=0.01)
    batcher: DynamicBatcher[str, str] = DynamicBatcher(echo, max_batch=8, max_wait_s=0.05)
    jobs = [[f"j{job}-{n}" for n in range(3)] for job in range(20)]

    async def scenario() -> list[list[str]]:
        results = await asyncio.gather(*(batcher.submit(job) for job in jobs))
        await batcher.close()
        return list(results)

    results = run(scenario())
    assert results == [[f"out:{item}" for item in job] for job in jobs]
    for job in jobs:
        assert sum(1 for batch in echo.batches if job[0] in batch) == 1
        (batch,) = (batch for batch in echo.batches if job[0] in batch)
        start = batch.index(job[0])
        assert batch[start : start + 3] == job
    assert all(len(batch) <= 8 for batch in echo.batches)
    assert batcher.stats.max_batch_size > 3  # several jobs shared a batch


def test_a_job_larger_than_max_batch_is_cut_into_chunks() -> None:
    echo = EchoBatch()
    batcher: DynamicBatcher[str, str] = DynamicBatcher(echo, max_batch=16, max_wait_s=0.01)
    job = [f"x{i}" for i in range(40)]

    async def scenario() -> list[str]:
        result = await batcher.submit(job)
        await batcher.close()
        return result

    assert run(scenario()) == [f"out:{item}" for item in job]
    assert [len(batch) for batch in echo.batches] == [16, 16, 8]


def test_a_lone_request_runs_after_max_wait() -> None:
    echo = EchoBatch()
    batcher: DynamicBatcher[str, str] = DynamicBatcher(echo, max_batch=32, max_wait_s=0.05)

    async def scenario() -> list[str]:
        result = await batcher.submit(["alone"])
        await batcher.close()
        return result

    assert run(scenario()) == ["out:alone"]
    assert echo.batches == [["alone"]]


def test_a_full_batch_does_not_wait_for_max_wait() -> None:
    echo = EchoBatch()
    # max_wait_s far beyond NO_HANG_S: only "the batch is full" can start it in time.
    batcher: DynamicBatcher[str, str] = DynamicBatcher(echo, max_batch=4, max_wait_s=3600.0)

    async def scenario() -> list[str]:
        result = await batcher.submit(["a", "b", "c", "d"])
        await batcher.close()
        return result

    assert run(scenario()) == ["out:a", "out:b", "out:c", "out:d"]


def test_requests_arriving_within_max_wait_share_a_batch() -> None:
    echo = EchoBatch()
    batcher: DynamicBatcher[str, str] = DynamicBatcher(echo, max_batch=32, max_wait_s=1.0)

    async def scenario() -> None:
        first = asyncio.create_task(batcher.submit(["first"]))
        await asyncio.sleep(0)
        second = asyncio.create_task(batcher.submit(["second"]))
        assert await first == ["out:first"]
        assert await second == ["out:second"]
        await batcher.close()

    run(scenario())
    assert echo.batches == [["first", "second"]]


def test_an_exception_fails_only_its_batch() -> None:
    echo = EchoBatch(fail_on="boom")
    batcher: DynamicBatcher[str, str] = DynamicBatcher(echo, max_batch=2, max_wait_s=0.05)

    async def scenario() -> list[Any]:
        # FIFO with max_batch 2 makes the batches [a, boom] and [c, d].
        outcomes = await asyncio.gather(
            *(batcher.submit([item]) for item in ["a", "boom", "c", "d"]),
            return_exceptions=True,
        )
        outcomes.append(await batcher.submit(["after"]))
        await batcher.close()
        return outcomes

    a, boom, c, d, after = run(scenario())
    assert echo.batches[:2] == [["a", "boom"], ["c", "d"]]
    assert isinstance(a, ValueError) and isinstance(boom, ValueError)
    assert "cannot process boom" in str(boom)
    assert (c, d, after) == (["out:c"], ["out:d"], ["out:after"])
    assert batcher.stats.failed_batches == 1
    assert batcher.stats.batches == 3


def test_a_chunked_job_fails_if_one_chunk_fails() -> None:
    echo = EchoBatch(fail_on="x5")
    batcher: DynamicBatcher[str, str] = DynamicBatcher(echo, max_batch=4, max_wait_s=0.01)

    async def scenario() -> None:
        with pytest.raises(ValueError, match="cannot process x5"):
            await batcher.submit([f"x{i}" for i in range(10)])
        await batcher.close()

    run(scenario())
    assert batcher.stats.failed_batches == 1


def test_validate_rejects_a_bad_job_alone() -> None:
    echo = EchoBatch(delay_s=0.01)

    def validate(items: list[str]) -> None:
        if "bad" in items:
            raise TypeError("bad input")

    batcher: DynamicBatcher[str, str] = DynamicBatcher(
        echo, max_batch=8, max_wait_s=0.05, validate=validate
    )

    async def scenario() -> list[Any]:
        outcomes = await asyncio.gather(
            *(batcher.submit([item]) for item in ["a", "bad", "b"]), return_exceptions=True
        )
        await batcher.close()
        return outcomes

    a, bad, b = run(scenario())
    assert (a, b) == (["out:a"], ["out:b"])
    assert isinstance(bad, TypeError)
    assert echo.batches == [["a", "b"]]


def test_a_miscounting_batch_function_is_an_error() -> None:
    batcher: DynamicBatcher[str, str] = DynamicBatcher(
        lambda items: items[:-1], max_batch=4, max_wait_s=0.0
    )

    async def scenario() -> None:
        with pytest.raises(BatchSizeMismatch, match="returned 1 results for 2 items"):
            await batcher.submit(["a", "b"])
        await batcher.close()

    run(scenario())


def test_the_event_loop_keeps_running_during_a_batch() -> None:
    echo = EchoBatch(delay_s=0.3)
    batcher: DynamicBatcher[str, str] = DynamicBatcher(echo, max_batch=4, max_wait_s=0.0)

    async def scenario() -> int:
        job = asyncio.create_task(batcher.submit(["slow"]))
        ticks = 0
        while not job.done():
            await asyncio.sleep(0.01)
            ticks += 1
        await job
        await batcher.close()
        return ticks

    assert run(scenario()) >= 3


def test_a_cancelled_caller_leaves_the_queue() -> None:
    echo = EchoBatch(delay_s=0.1)
    batcher: DynamicBatcher[str, str] = DynamicBatcher(echo, max_batch=1, max_wait_s=0.0)

    async def scenario() -> None:
        first = asyncio.create_task(batcher.submit(["first"]))
        await asyncio.sleep(0.02)  # "first" is running now
        gone = asyncio.create_task(batcher.submit(["gone"]))
        kept = asyncio.create_task(batcher.submit(["kept"]))
        await asyncio.sleep(0)
        gone.cancel()
        assert await first == ["out:first"]
        assert await kept == ["out:kept"]
        assert gone.cancelled()
        await batcher.close()

    run(scenario())
    assert echo.batches == [["first"], ["kept"]]


def test_close_drains_queued_jobs_then_refuses_new_ones() -> None:
    echo = EchoBatch(delay_s=0.02)
    batcher: DynamicBatcher[str, str] = DynamicBatcher(echo, max_batch=2, max_wait_s=0.0)

    async def scenario() -> list[Any]:
        jobs = [asyncio.create_task(batcher.submit([f"q{i}"])) for i in range(5)]
        await asyncio.sleep(0)
        await batcher.close()
        assert all(job.done() for job in jobs)
        with pytest.raises(BatcherClosed):
            await batcher.submit(["late"])
        await batcher.close()  # twice is fine
        leftovers = [task for task in asyncio.all_tasks() if task.get_name().endswith("-runner")]
        assert leftovers == []  # the batching task has ended
        return [job.result() for job in jobs]

    assert run(scenario()) == [[f"out:q{i}"] for i in range(5)]
    assert batcher.closed


def test_close_without_drain_fails_queued_jobs() -> None:
    echo = EchoBatch(delay_s=0.05)
    batcher: DynamicBatcher[str, str] = DynamicBatcher(echo, max_batch=1, max_wait_s=0.0)

    async def scenario() -> list[Any]:
        jobs = [asyncio.create_task(batcher.submit([f"q{i}"])) for i in range(4)]
        await asyncio.sleep(0.01)  # q0 is running
        await batcher.close(drain=False)
        return list(await asyncio.gather(*jobs, return_exceptions=True))

    first, *rest = run(scenario())
    assert first == ["out:q0"]  # the batch in flight still finishes
    assert all(isinstance(outcome, BatcherClosed) for outcome in rest)


def test_close_gives_up_on_a_stuck_batch_after_its_timeout() -> None:
    release = threading.Event()

    def stuck(items: list[str]) -> list[str]:
        release.wait(NO_HANG_S)
        return items

    batcher: DynamicBatcher[str, str] = DynamicBatcher(stuck, max_batch=1, max_wait_s=0.0)

    async def scenario() -> None:
        job = asyncio.create_task(batcher.submit(["x"]))
        await asyncio.sleep(0.01)
        await batcher.close(timeout_s=0.05)
        with pytest.raises(BatcherClosed):
            await job
        release.set()  # let the abandoned thread finish so asyncio.run can shut down

    run(scenario())


def test_constructor_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        DynamicBatcher(EchoBatch(), max_batch=0, max_wait_s=0.01)
    with pytest.raises(ValueError, match="max_wait_s"):
        DynamicBatcher(EchoBatch(), max_batch=1, max_wait_s=-1)


class FakeTarget:
    def __init__(self, tag: str, max_batch: int) -> None:
        self.tag = tag
        self.max_batch = max_batch

    def run_batch(self, items: list[Any]) -> list[Any]:
        return [f"{self.tag}:{item}" for item in items]

    def check_items(self, items: list[Any]) -> None:
        if not all(isinstance(item, str) for item in items):
            raise TypeError("text only")


def test_pool_keeps_one_batcher_per_model_and_precision() -> None:
    loads: list[tuple[str, str]] = []

    def load(model: str, precision: str) -> FakeTarget:
        loads.append((model, precision))
        time.sleep(0.02)  # concurrent first calls must still load once
        return FakeTarget(f"{model}/{precision}", max_batch=64)

    pool = BatcherPool(load, max_wait_s=0.01, max_batch=8)

    async def scenario() -> list[Any]:
        results = await asyncio.gather(
            *(pool.submit("m", Precision.FP32, [f"a{i}"]) for i in range(16)),
            *(pool.submit("m", "int8", [f"b{i}"]) for i in range(4)),
        )
        assert (await pool.get("m", "fp32")).max_batch == 8  # the pool's cap wins
        with pytest.raises(TypeError, match="text only"):
            await pool.submit("m", "fp32", [1])
        await pool.close()
        with pytest.raises(BatcherClosed):
            await pool.submit("m", "fp32", ["late"])
        return list(results)

    results = run(scenario())
    assert results[:16] == [[f"m/fp32:a{i}"] for i in range(16)]
    assert results[16:] == [[f"m/int8:b{i}"] for i in range(4)]
    assert sorted(loads) == [("m", "fp32"), ("m", "int8")]
    stats = pool.stats()
    assert set(stats) == {("m", "fp32"), ("m", "int8")}
    assert stats[("m", "fp32")].items == 16


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(device="cpu")


@pytest.mark.slow
def test_real_model_batches_concurrent_sentences(registry: ModelRegistry) -> None:
    model = registry.get(BUILTIN_EMBEDDING_MODEL, Precision.FP32)
    sentences = [f"Request {i} asks about topic number {i % 7}." for i in range(64)]
    expected = [model.run_batch([sentence])[0] for sentence in sentences]
    pool = BatcherPool(registry.get, max_wait_s=0.02)

    async def scenario() -> list[list[list[float]]]:
        results = await asyncio.gather(
            *(pool.submit(BUILTIN_EMBEDDING_MODEL, "fp32", [s]) for s in sentences)
        )
        await pool.close()
        return list(results)

    results = run(scenario())
    for sentence, (got,), want in zip(sentences, results, expected, strict=True):
        cosine = torch.nn.functional.cosine_similarity(torch.tensor(got), torch.tensor(want), dim=0)
        assert float(cosine) >= 0.99999, sentence
    stats = pool.stats()[(BUILTIN_EMBEDDING_MODEL, "fp32")]
    assert stats.items == 64
    assert stats.max_batch_size > 1
    assert stats.batches < 64
