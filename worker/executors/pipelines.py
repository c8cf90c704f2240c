"""The pipelines behind the ``Executor`` seam: torch inference, LLM generation, PyAV transcoding.

They adapt the executor cores (``inference``, ``transcode``) to leased jobs: read the input,
run, and count units (input items for inference, output pixels for transcode).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from protocol import Fault, JobType, LeasedJob, Precision, SkippedRendition
from protocol.batches import StreamPart, StreamPartItem
from protocol.generation import GenerationInput
from protocol.jobs import DEFAULT_LADDER, MAX_INPUT_JSON_BYTES
from protocol.jobs import Rendition as WireRendition
from protocol.workers import TensorShape
from worker.batching import BatcherPool
from worker.executors import generation, inference, transcode
from worker.executors.base import Capability, Execution, FetchBlob, JobRejected, OutputFile

log = logging.getLogger("gpumarket.worker.pipelines")

CALIBRATION_TEXT = "Calibration sentence {} for measuring how fast this worker embeds text."


class InferencePipeline:
    """Inference with warm models and dynamic batching across concurrent jobs."""

    job_type = JobType.INFERENCE

    def __init__(
        self, registry: inference.ModelRegistry, *, max_batch: int, max_wait_s: float
    ) -> None:
        self.registry = registry
        self.batchers = BatcherPool(
            lambda model, precision: registry.get(model, precision),
            max_wait_s=max_wait_s,
            max_batch=max_batch,
        )
        self._max_batch = max_batch
        self._measured: dict[tuple[str, Precision], float] = {}

    def capabilities(self) -> list[Capability]:
        return [
            Capability(
                model=name,
                precision=precision,
                max_batch=self._max_batch,
                units_per_s=self._measured.get((name, precision)),
                input=self._input_shape(name),
            )
            for name, precision in self.registry.offers()
        ]

    def _input_shape(self, name: str) -> TensorShape | None:
        """The row a TorchScript model's manifest takes, for the offer (checked at submit)."""
        spec = self.registry.spec(name)
        if spec.input is None:
            return None
        return TensorShape(dtype=spec.input.dtype, shape=list(spec.input.row_shape))

    async def warm_up(self) -> None:
        """Load the built-in model before the first job, so that job does not pay for it, and
        time one full batch: the throughput this worker reports in its offer (texts/s), which
        matching uses until the orchestrator has measured the worker's own results."""
        key = (inference.BUILTIN_EMBEDDING_MODEL, Precision.FP32)
        if key not in self.registry.offers():
            return
        await self.batchers.get(key[0], key[1].value)
        # Timed on the model itself, beside the batchers, so job statistics stay the jobs'.
        model = await asyncio.to_thread(self.registry.get, *key)
        texts = [CALIBRATION_TEXT.format(i) for i in range(self._max_batch)]
        await asyncio.to_thread(model.run_batch, texts[:1])  # first-call overheads
        started = time.perf_counter()
        await asyncio.to_thread(model.run_batch, texts)
        elapsed = time.perf_counter() - started
        if elapsed > 0:
            self._measured[key] = len(texts) / elapsed

    async def _items(self, job: LeasedJob, workdir: Path, fetch: FetchBlob) -> list[Any]:
        body: dict[str, Any] | None = job.input
        if body is None and job.input_blob is not None:
            path = await fetch(job.input_blob, workdir / "input.json")
            if path.stat().st_size > MAX_INPUT_JSON_BYTES:
                raise JobRejected(f"input blob is over {MAX_INPUT_JSON_BYTES} bytes")
            try:
                body = json.loads(path.read_bytes())
            except (ValueError, UnicodeDecodeError) as exc:
                raise JobRejected(f"input blob is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise JobRejected('inference input must be {"texts": [...]} or {"tensors": [...]}')
        items = body.get("texts") or body.get("tensors")
        if not isinstance(items, list) or not items:
            raise JobRejected('inference input must be {"texts": [...]} or {"tensors": [...]}')
        return items

    async def run(self, job: LeasedJob, workdir: Path, fetch: FetchBlob) -> Execution:
        items = await self._items(job, workdir, fetch)
        try:
            spec = self.registry.spec(job.model)
            results = await self.batchers.submit(job.model, job.precision.value, items)
        except inference.InvalidInput as exc:
            raise JobRejected(str(exc), fault=Fault.INPUT) from exc
        except (
            inference.ModelNotFound,
            inference.ModelLoadError,
            inference.UnsupportedPrecision,
        ) as exc:
            # This worker offered the model at this precision: not the client's fault.
            raise JobRejected(str(exc), fault=Fault.WORKER) from exc
        if spec.kind is not inference.ModelKind.EMBEDDING:
            return Execution(units=len(items), output={"outputs": results})
        model = await asyncio.to_thread(self.registry.get, job.model, job.precision)
        assert isinstance(model, inference.EmbeddingModel)
        truncated = await asyncio.to_thread(model.truncated, items)
        output = {
            "embeddings": results,
            # Texts longer than the model reads were cut: which, how long, and where.
            "truncated": [
                {"index": t.index, "tokens": t.tokens, "kept_tokens": t.kept_tokens}
                for t in truncated
            ],
        }
        return Execution(units=len(items), output=output)

    async def close(self) -> None:
        await self.batchers.close(drain=False)


def _core_rendition(wire: WireRendition) -> transcode.Rendition:
    return transcode.Rendition(
        name=wire.label,
        width=wire.width,
        height=wire.height,
        fps=wire.fps,
        bitrate_kbps=wire.bitrate_kbps,
    )


class TranscodePipeline:
    """H.264 rendition ladders with PyAV, priced per output pixel."""

    job_type = JobType.TRANSCODE

    def __init__(self, *, threads: int | None = None) -> None:
        self.threads = threads

    def capabilities(self) -> list[Capability]:
        return [Capability(model="h264", precision=Precision.FP32)]

    async def warm_up(self) -> None:
        return None

    async def run(self, job: LeasedJob, workdir: Path, fetch: FetchBlob) -> Execution:
        if job.input_blob is None:
            raise JobRejected("transcode jobs need an input video blob")
        source = await fetch(job.input_blob, workdir / "input")
        wire = job.renditions or list(DEFAULT_LADDER)
        (workdir / "out").mkdir(exist_ok=True)
        try:
            ladder = [_core_rendition(r) for r in wire]
            result = await asyncio.to_thread(
                transcode.transcode,
                source,
                ladder,
                job.container.value if job.container else "mp4",
                workdir / "out",
                threads=self.threads,
            )
        except (transcode.TranscodeInputError, transcode.InvalidRendition) as exc:
            raise JobRejected(str(exc), fault=Fault.INPUT) from exc
        files = tuple(
            OutputFile(
                name=out.name,
                path=out.path,
                width=out.width,
                height=out.height,
                frames=out.frame_count,
            )
            for out in result.outputs
        )
        skipped = tuple(SkippedRendition(name=s.name, reason=s.reason) for s in result.skipped)
        return Execution(units=result.total_output_pixels, files=files, skipped=skipped)

    async def close(self) -> None:
        return None


PublishParts = Callable[[list[StreamPart]], Awaitable[list[StreamPartItem]]]
CALIBRATION_PROMPT = "Write one sentence about graphics cards."
CALIBRATION_TOKENS = 16
STREAM_FLUSH_S = 0.2
"""How long streamed text gathers before it is sent (a job's first piece goes at once, for the
time to first token): fewer requests for the orchestrator, tokens still arrive live."""
STREAM_CLOSE_TIMEOUT_S = 10.0
"""How long a finished job waits for its last text to be sent before it reports its result."""
GENERATION_BATCH_WAIT_S = 0.02
"""How long a generation batch waits for more requests before it starts (later ones join it
between two tokens, at the cost of a prefill each time)."""


class _GenerationBatcher:
    """Continuous batching for one generation model: requests that arrive within
    ``max_wait_s`` of each other start as one padded batch, and requests that arrive while it
    decodes join it between two tokens (up to ``max_batch`` decoding at once); each request's
    ``submit`` returns as soon as it is done."""

    def __init__(self, model: generation.GenerationModel, max_batch: int, max_wait_s: float):
        self.model = model
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        # Appended on the event loop, taken on the generating thread (deque ops are atomic).
        self._pending: collections.deque[
            tuple[generation.GenerationRequest, asyncio.Future[None]]
        ] = collections.deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.largest_batch = 0

    async def submit(self, request: generation.GenerationRequest) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name=f"generate-{self.model.name}")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((request, done))
        self._arrived.set()
        await done

    def _take(self, room: int) -> list[tuple[generation.GenerationRequest, asyncio.Future[None]]]:
        taken: list[tuple[generation.GenerationRequest, asyncio.Future[None]]] = []
        while len(taken) < room and self._pending:
            taken.append(self._pending.popleft())
        return taken

    async def _loop(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if not self._pending:
                continue
            await asyncio.sleep(self.max_wait_s)  # let a burst of requests start together
            await self._run_batch(self._take(self.max_batch))
            if self._pending:
                self._arrived.set()

    async def _run_batch(
        self, first: list[tuple[generation.GenerationRequest, asyncio.Future[None]]]
    ) -> None:
        loop = asyncio.get_running_loop()
        waiting = {id(r): done for r, done in first}

        def admit(active: int) -> list[generation.GenerationRequest]:  # generating thread
            joining = self._take(self.max_batch - active)
            waiting.update({id(r): done for r, done in joining})
            self.largest_batch = max(self.largest_batch, active + len(joining))
            return [r for r, _ in joining]

        def finished(request: generation.GenerationRequest) -> None:  # generating thread
            done = waiting.pop(id(request), None)
            if done is not None:
                loop.call_soon_threadsafe(_resolve, done, None)

        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(first))
        try:
            await asyncio.to_thread(self.model.generate, [r for r, _ in first], admit, finished)
        except Exception as exc:  # the batch failed: each of its jobs fails with it
            for done in list(waiting.values()):
                _resolve(done, exc)
            return
        for done in list(waiting.values()):  # none should be left; never leave one hanging
            _resolve(done, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _resolve(done: asyncio.Future[None], error: Exception | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


class _JobStream:
    """One job's text waiting to go (``StreamSender``)."""

    def __init__(self, job: LeasedJob, on_lost: Callable[[], None] | None) -> None:
        self.job = job
        self.on_lost = on_lost
        self.seq = 0
        self.text: list[str] = []  # added on the generating thread, under the sender's lock
        self.tokens = 0
        self.first_noted = False  # its first text has woken the sender
        self.in_flight = False  # a send holding some of its text has not answered yet
        self.closing = False
        self.sent = asyncio.Event()  # set once closing and nothing is left to send

    @property
    def pending(self) -> bool:
        return bool(self.text) or self.tokens > 0


class StreamSender:
    """Sends every generating job's new text to the orchestrator, all of a worker's jobs in
    one request (``POST /v1/workers/streams``): a job's first text at once (time to first
    token), later text every ``STREAM_FLUSH_S``, so a worker streaming many jobs makes a few
    requests a second, not a few per job. The generating thread only appends text (under a
    lock): it wakes the event loop for a job's first text alone, not at every token. Parts go
    in order, one request at a time. A failed send is logged and its text dropped: the stream
    is a preview, the signed result is what counts (and what is billed). A part refused
    because the job's lease is gone (403, 404, 409) stops that job (``on_lost``)."""

    def __init__(self, publish: PublishParts) -> None:
        self.publish = publish
        self.requests = 0
        self._jobs: dict[str, _JobStream] = {}
        self._lock = threading.Lock()  # the jobs' text: the generating thread adds to it
        self._urgent = asyncio.Event()  # a first text, or a job ending: send now
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def open(self, job: LeasedJob, on_lost: Callable[[], None] | None = None) -> None:
        """Start streaming ``job`` (on the event loop)."""
        self._loop = asyncio.get_running_loop()
        self._closed = False
        with self._lock:
            self._jobs[job.job_id] = _JobStream(job, on_lost)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="stream-sender")

    def add(self, job_id: str, text: str, tokens: int) -> None:
        """New text of a job; called on the generating thread."""
        with self._lock:
            stream = self._jobs.get(job_id)
            if stream is None or stream.closing:
                return
            stream.text.append(text)
            stream.tokens += tokens
            first = not stream.first_noted
            stream.first_noted = True
        if first and self._loop is not None:
            self._loop.call_soon_threadsafe(self._urgent.set)

    async def close(self, job_id: str) -> None:
        """The job's text is all there: send what is left of it now, and forget it."""
        with self._lock:
            stream = self._jobs.get(job_id)
            if stream is None:
                return
            stream.closing = True
            waiting = stream.pending or stream.in_flight
        if waiting:
            self._urgent.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STREAM_CLOSE_TIMEOUT_S):
                    await stream.sent.wait()
        with self._lock:
            self._jobs.pop(job_id, None)

    async def _run(self) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that races its inner wait, and this loop would then outlive close_all.
        while self._jobs and not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STREAM_FLUSH_S):
                    await self._urgent.wait()
            self._urgent.clear()
            await self._send_pending()

    async def _send_pending(self) -> None:
        parts: list[StreamPart] = []
        with self._lock:
            ready = [s for s in self._jobs.values() if s.pending]
            for stream in ready:
                parts.append(
                    StreamPart(
                        job_id=stream.job.job_id,
                        attempt=stream.job.attempt,
                        seq=stream.seq,
                        text="".join(stream.text),
                        tokens=stream.tokens,
                    )
                )
                stream.text, stream.tokens = [], 0
                stream.seq += 1
                stream.in_flight = True
        if ready:
            await self._send(ready, parts)
        with self._lock:
            for stream in ready:
                stream.in_flight = False
            done = [s for s in self._jobs.values() if s.closing and not s.pending]
        for stream in done:
            stream.sent.set()

    async def _send(self, ready: list[_JobStream], parts: list[StreamPart]) -> None:
        self.requests += 1
        try:
            outcomes = await self.publish(parts)
        except Exception as exc:
            log.warning("stream text of %d job(s) not sent: %s", len(parts), exc)
            return
        for stream, outcome in zip(ready, outcomes, strict=False):
            if outcome.error is None:
                continue
            job_id = stream.job.job_id
            if outcome.error.status in (403, 404, 409) and stream.on_lost is not None:
                log.warning("job %s: %s; stopping it", job_id, outcome.error.detail)
                stream.on_lost()  # the lease is gone: generating more helps nobody
                stream.on_lost = None
            else:
                log.warning("job %s: stream text not taken: %s", job_id, outcome.error.detail)

    async def close_all(self) -> None:
        self._closed = True  # the loop ends at its next turn, cancelled or not
        self._urgent.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class GenerationPipeline:
    """LLM text generation, priced per token (prompt + completion), streamed while produced.

    Models come from files (``worker.executors.generation``); a verification job (its input
    carries ``check_tokens``) is answered by teacher forcing instead of generating."""

    job_type = JobType.GENERATE

    def __init__(
        self,
        specs: list[generation.GenerationSpec],
        *,
        max_batch: int,
        max_wait_s: float,
        device: str | None = None,
    ) -> None:
        self.specs = {s.name: s for s in specs}
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.device = device
        self.publish: PublishParts | None = None
        self._sender: StreamSender | None = None
        self._batchers: dict[tuple[str, Precision], _GenerationBatcher] = {}
        self._measured: dict[str, float] = {}
        self._context: dict[str, int] = {}
        self._token_bytes: dict[str, int] = {}

    def capabilities(self) -> list[Capability]:
        """Each model at each precision its device runs (fp16 and bf16 on a CUDA GPU too)."""
        precisions = generation.runnable_precisions(generation.generation_device(self.device))
        return [
            Capability(
                model=name,
                precision=precision,
                max_batch=self.max_batch,
                units_per_s=self._measured.get(name),
                context_tokens=self._context.get(name),
                max_token_bytes=self._token_bytes.get(name),
            )
            for name in self.specs
            for precision in precisions
        ]

    async def _model(self, name: str, precision: Precision) -> generation.GenerationModel:
        spec = self.specs.get(name)
        if spec is None:
            raise JobRejected(f"no generation model {name!r} here", fault=Fault.WORKER)
        try:
            model = await asyncio.to_thread(
                generation.load_generation_model, spec, precision, self.device
            )
        except generation.GenerationError as exc:
            raise JobRejected(str(exc), fault=Fault.WORKER) from exc
        self._context[name] = model.context_tokens
        self._token_bytes[name] = model.max_token_bytes
        return model

    async def warm_up(self) -> None:
        """Load each model and time a short greedy generation: the tokens/s in the offer."""
        for name in self.specs:
            model = await self._model(name, Precision.FP32)
            request = GenerationInput(prompt=CALIBRATION_PROMPT, max_tokens=CALIBRATION_TOKENS)
            await asyncio.to_thread(model.generate, [model.request_for(request)])  # first call
            timed = model.request_for(request)
            started = time.perf_counter()
            await asyncio.to_thread(model.generate, [timed])
            elapsed = time.perf_counter() - started
            if elapsed > 0 and timed.token_ids:
                self._measured[name] = len(timed.token_ids) / elapsed

    def _stream_sender(self) -> StreamSender | None:
        """The sender of every job's streamed text (None when nothing publishes it)."""
        if self.publish is None:
            return None
        if self._sender is None or self._sender.publish is not self.publish:
            self._sender = StreamSender(self.publish)
        return self._sender

    def _batcher(
        self, model: generation.GenerationModel, precision: Precision
    ) -> _GenerationBatcher:
        key = (model.name, precision)
        if key not in self._batchers:
            self._batchers[key] = _GenerationBatcher(model, self.max_batch, self.max_wait_s)
        return self._batchers[key]

    async def run(self, job: LeasedJob, workdir: Path, fetch: FetchBlob) -> Execution:
        try:
            request = GenerationInput.model_validate(job.input or {})
        except ValueError as exc:
            raise JobRejected(f"generation input is not valid: {exc}") from exc
        model = await self._model(job.model, job.precision)
        if request.check_tokens is not None:
            return await self._check(model, request)
        entry: generation.GenerationRequest | None = None

        def lost() -> None:
            if entry is not None:
                entry.cancelled = True

        sender = self._stream_sender()
        if sender is not None:
            sender.open(job, lost)

        def on_text(text: str, tokens: int) -> None:  # on the generating thread
            if sender is not None:
                sender.add(job.job_id, text, tokens)

        try:
            try:
                entry = await asyncio.to_thread(model.request_for, request, on_text)
            except generation.PromptTooLong as exc:
                raise JobRejected(str(exc), fault=Fault.INPUT) from exc
            try:
                await self._batcher(model, job.precision).submit(entry)
            except asyncio.CancelledError:
                entry.cancelled = True  # the job was cancelled: free its place in the batch
                raise
        finally:
            if sender is not None:
                await sender.close(job.job_id)
        assert entry.finish_reason is not None
        usage = {"prompt_tokens": len(entry.prompt_ids), "completion_tokens": len(entry.token_ids)}
        output = {
            "text": entry.text,
            "token_ids": entry.token_ids,
            "finish_reason": entry.finish_reason.value,
            "usage": usage,
        }
        return Execution(
            units=sum(usage.values()), output=output, prompt_units=usage["prompt_tokens"]
        )

    async def _check(
        self, model: generation.GenerationModel, request: GenerationInput
    ) -> Execution:
        claimed = request.check_tokens or []
        result = await asyncio.to_thread(model.check, request, claimed)
        usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": len(claimed)}
        return Execution(
            units=sum(usage.values()),
            output={"check": result, "usage": usage},
            prompt_units=usage["prompt_tokens"],
        )

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
        if self._sender is not None:
            await self._sender.close_all()
