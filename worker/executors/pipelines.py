"""The two pipelines behind the ``Executor`` seam: torch inference and PyAV transcoding.

They adapt the executor cores (``inference``, ``transcode``) to leased jobs: read the input,
run, and count units (input items for inference, output pixels for transcode).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from protocol import Fault, JobType, LeasedJob, Precision, SkippedRendition
from protocol.jobs import DEFAULT_LADDER, MAX_INPUT_JSON_BYTES
from protocol.jobs import Rendition as WireRendition
from protocol.workers import TensorShape
from worker.batching import BatcherPool
from worker.executors import inference, transcode
from worker.executors.base import Capability, Execution, FetchBlob, JobRejected, OutputFile

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
