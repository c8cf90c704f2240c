"""Dynamic batching: group concurrent requests for one model into one model call.

A model call costs much the same for 1 item as for 32 (MiniLM on 2 CPU cores: roughly 4x
the throughput at batch 32), so the worker queues the items of concurrent jobs for one
(model, precision) and runs them together.

Semantics of :class:`DynamicBatcher`:

* A batch starts once ``max_batch`` items wait, or ``max_wait_s`` after the oldest waiting
  item arrived, whichever comes first. While a batch runs the next one fills, so under load
  batches form without waiting at all.
* Jobs are taken first come, first served, and a job's items stay together in one batch,
  except that a job of more than ``max_batch`` items is cut into chunks of ``max_batch``
  (in order) that batch like separate jobs; its results are put back together in order.
* The batch function runs in a worker thread, so the event loop never blocks on the model;
  one batch per batcher runs at a time.
* An exception from the batch function fails every job in that batch, and only those; a
  job cut into chunks fails if any chunk fails. ``validate`` (when given) runs at submit, so
  a malformed job fails alone instead of taking its batch-mates down with it.
* A caller that is cancelled leaves the queue; if its batch already started, the result is
  dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeVar

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT_S",
    "DEFAULT_MAX_WAIT_S",
    "BatchSizeMismatch",
    "BatchTarget",
    "BatcherClosed",
    "BatcherPool",
    "BatcherStats",
    "DynamicBatcher",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_WAIT_S: Final = 0.005
DEFAULT_CLOSE_TIMEOUT_S: Final = 30.0

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosed(RuntimeError):
    """The batcher was closed before (or while) this job could run."""


class BatchSizeMismatch(RuntimeError):
    """The batch function returned a different number of results than it got items."""


@dataclass(frozen=True, slots=True)
class BatcherStats:
    """Counters since the batcher started; sizes are in items, ``busy_s`` in seconds."""

    batches: int = 0
    items: int = 0
    failed_batches: int = 0
    busy_s: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    """Histogram: batch size in items → number of batches of that size."""

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    @property
    def max_batch_size(self) -> int:
        return max(self.batch_sizes, default=0)


@dataclass(eq=False, slots=True)
class _Chunk(Generic[T, R]):
    """One job, or one max_batch-sized piece of a large job, waiting in the queue."""

    items: list[T]
    future: asyncio.Future[list[R]]
    enqueued_at: float  # loop.time(), seconds


class DynamicBatcher(Generic[T, R]):
    """Batch concurrent :meth:`submit` calls into calls of ``run_batch`` (see module doc).

    ``run_batch`` takes a list of items and returns one result per item, in order.
    ``max_batch`` is in items, ``max_wait_s`` in seconds. A batcher belongs to the event
    loop of its first :meth:`submit`.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], list[R]],
        max_batch: int,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        *,
        validate: Callable[[list[T]], None] | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.name = name
        self._run_batch = run_batch
        self._validate = validate
        self._queue: deque[_Chunk[T, R]] = deque()
        self._queued_items = 0
        self._wakeup: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._batches = 0
        self._items = 0
        self._failed_batches = 0
        self._busy_s = 0.0
        self._sizes: Counter[int] = Counter()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> BatcherStats:
        """A snapshot of the counters."""
        return BatcherStats(
            batches=self._batches,
            items=self._items,
            failed_batches=self._failed_batches,
            busy_s=self._busy_s,
            batch_sizes=dict(sorted(self._sizes.items())),
        )

    async def submit(self, items: list[T]) -> list[R]:
        """Queue one job's items; return their results in order once their batch has run.

        Raises what ``validate`` or ``run_batch`` raised, :class:`BatcherClosed` after
        :meth:`close`, or :class:`BatchSizeMismatch` if ``run_batch`` miscounted.
        """
        if self._closed:
            raise BatcherClosed(f"{self.name} is closed")
        items = list(items)
        if not items:
            return []
        if self._validate is not None:
            self._validate(items)
        loop = self._bind_loop()
        now = loop.time()
        chunks = [
            _Chunk(items[start : start + self.max_batch], loop.create_future(), now)
            for start in range(0, len(items), self.max_batch)
        ]
        self._queue.extend(chunks)
        self._queued_items += len(items)
        self._wake()
        if len(chunks) == 1:
            return await chunks[0].future
        # return_exceptions: every chunk's outcome is retrieved, none is left unobserved.
        outcomes = await asyncio.gather(*(chunk.future for chunk in chunks), return_exceptions=True)
        results: list[R] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            results.extend(outcome)
        return results

    async def close(
        self, *, drain: bool = True, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S
    ) -> None:
        """Stop taking jobs and stop the batching task; safe to call twice.

        With ``drain`` the queued jobs still run; without, they fail with
        :class:`BatcherClosed`. The batch in flight gets ``timeout_s`` seconds to finish;
        after that its callers get :class:`BatcherClosed` (the thread itself cannot be
        interrupted and finishes in the background).
        """
        self._closed = True
        if not drain:
            self._fail_queued(BatcherClosed(f"{self.name} closed before this job ran"))
        runner = self._runner
        if runner is None or runner.done():
            self._fail_queued(BatcherClosed(f"{self.name} is closed"))
            return
        self._wake()
        try:
            await asyncio.wait_for(asyncio.shield(runner), timeout_s)
        except TimeoutError:
            logger.warning(
                "%s: batch still running after %.1f s; abandoning it", self.name, timeout_s
            )
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    # --- the batching task ----------------------------------------------------------------

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._wakeup = asyncio.Event()
        elif self._loop is not loop:
            raise RuntimeError(f"{self.name} belongs to another event loop")
        if self._runner is None or self._runner.done():
            # A runner that died of a bug is replaced, so queued callers never hang.
            self._runner = loop.create_task(self._run(), name=f"{self.name}-runner")
        return loop

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _run(self) -> None:
        assert self._wakeup is not None
        try:
            while True:
                if not self._queue:
                    if self._closed:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._wait_to_fill()
                batch = self._take_batch()
                if batch:
                    await self._execute(batch)
        finally:
            self._fail_queued(BatcherClosed(f"{self.name} stopped before this job ran"))

    async def _wait_to_fill(self) -> None:
        """Wait until a full batch waits or the oldest waiting item has waited max_wait_s."""
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        deadline = self._queue[0].enqueued_at + self.max_wait_s
        while self._queued_items < self.max_batch and not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Chunk[T, R]]:
        """Pop chunks in arrival order while they fit in max_batch (at least one)."""
        batch: list[_Chunk[T, R]] = []
        size = 0
        while self._queue:
            chunk = self._queue[0]
            if not chunk.future.done() and batch and size + len(chunk.items) > self.max_batch:
                break
            self._queue.popleft()
            self._queued_items -= len(chunk.items)
            if chunk.future.done():  # its caller was cancelled
                continue
            batch.append(chunk)
            size += len(chunk.items)
        return batch

    async def _execute(self, batch: list[_Chunk[T, R]]) -> None:
        items = [item for chunk in batch for item in chunk.items]
        started = time.perf_counter()
        try:
            results = list(await asyncio.to_thread(self._run_batch, items))
            if len(results) != len(items):
                raise BatchSizeMismatch(
                    f"{self.name}: batch function returned {len(results)} results "
                    f"for {len(items)} items"
                )
        except asyncio.CancelledError:
            self._settle_failed(batch, BatcherClosed(f"{self.name} closed while this job ran"))
            raise
        except Exception as exc:
            logger.warning("%s: batch of %d items failed: %r", self.name, len(items), exc)
            self._settle_failed(batch, exc)
            return
        finally:
            self._busy_s += time.perf_counter() - started
            self._batches += 1
            self._items += len(items)
            self._sizes[len(items)] += 1
        offset = 0
        for chunk in batch:
            end = offset + len(chunk.items)
            if not chunk.future.done():
                chunk.future.set_result(results[offset:end])
            offset = end

    def _settle_failed(self, batch: list[_Chunk[T, R]], exc: BaseException) -> None:
        self._failed_batches += 1
        for chunk in batch:
            if not chunk.future.done():
                chunk.future.set_exception(exc)

    def _fail_queued(self, exc: BaseException) -> None:
        while self._queue:
            chunk = self._queue.popleft()
            if not chunk.future.done():
                chunk.future.set_exception(exc)
        self._queued_items = 0


class BatchTarget(Protocol):
    """What :class:`BatcherPool` needs from a loaded model (``LoadedModel`` fits)."""

    @property
    def max_batch(self) -> int: ...

    def run_batch(self, items: list[Any]) -> list[Any]: ...

    def check_items(self, items: list[Any]) -> None: ...


class BatcherPool:
    """One :class:`DynamicBatcher` per (model, precision), created on first use.

    ``load(model, precision)`` returns the model to batch for; it may take seconds (it
    loads weights), so it runs in a worker thread. ``max_batch`` caps every model's own
    ``max_batch`` (items); ``max_wait_s`` is in seconds.
    """

    def __init__(
        self,
        load: Callable[[str, str], BatchTarget],
        *,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        max_batch: int | None = None,
    ) -> None:
        self._load = load
        self.max_wait_s = max_wait_s
        self.max_batch = max_batch
        self._batchers: dict[tuple[str, str], DynamicBatcher[Any, Any]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._closed = False

    async def get(self, model: str, precision: str) -> DynamicBatcher[Any, Any]:
        """The batcher for (model, precision), loading the model on first use."""
        key = (str(model), str(precision))
        batcher = self._batchers.get(key)
        if batcher is not None:
            return batcher
        async with self._locks.setdefault(key, asyncio.Lock()):
            batcher = self._batchers.get(key)
            if batcher is None:
                if self._closed:
                    raise BatcherClosed("batcher pool is closed")
                try:
                    target = await asyncio.to_thread(self._load, *key)
                except BaseException:
                    self._locks.pop(key, None)  # unknown models must not pile up locks
                    raise
                if self._closed:
                    raise BatcherClosed("batcher pool is closed")
                max_batch = target.max_batch
                if self.max_batch is not None:
                    max_batch = min(max_batch, self.max_batch)
                batcher = DynamicBatcher(
                    target.run_batch,
                    max_batch,
                    self.max_wait_s,
                    validate=target.check_items,
                    name=f"{key[0]}/{key[1]}",
                )
                self._batchers[key] = batcher
        return batcher

    async def submit(self, model: str, precision: str, items: list[Any]) -> list[Any]:
        """Run ``items`` on (model, precision), batched with concurrent submits."""
        if self._closed:
            raise BatcherClosed("batcher pool is closed")
        batcher = await self.get(model, precision)
        return await batcher.submit(items)

    def stats(self) -> dict[tuple[str, str], BatcherStats]:
        return {key: batcher.stats for key, batcher in self._batchers.items()}

    async def close(self, *, drain: bool = True) -> None:
        """Close every batcher (see :meth:`DynamicBatcher.close`)."""
        self._closed = True
        await asyncio.gather(*(batcher.close(drain=drain) for batcher in self._batchers.values()))
