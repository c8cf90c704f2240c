"""The pipelines behind the Executor seam: the inference pipeline measures its throughput at
warm-up and offers it; results say what was cut or skipped; refusals say whose fault they are."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from protocol import Fault, JobType, LeasedJob, Precision
from protocol.jobs import Rendition as WireRendition
from worker.executors.base import Execution, JobRejected
from worker.executors.inference import (
    BUILTIN_EMBEDDING_MODEL,
    DEFAULT_MAX_SEQ_TOKENS,
    ModelRegistry,
    builtin_embedding_path,
)
from worker.executors.pipelines import InferencePipeline, TranscodePipeline
from worker.executors.transcode import make_test_clip


def test_warm_up_measures_throughput_that_the_offer_carries() -> None:
    pipeline = InferencePipeline(ModelRegistry(device="cpu"), max_batch=8, max_wait_s=0.005)
    before = {(c.model, c.precision): c.units_per_s for c in pipeline.capabilities()}
    assert before[(BUILTIN_EMBEDDING_MODEL, Precision.FP32)] is None  # nothing measured yet

    async def warm() -> None:
        try:
            await pipeline.warm_up()
        finally:
            await pipeline.close()

    asyncio.run(warm())
    after = {(c.model, c.precision): c.units_per_s for c in pipeline.capabilities()}
    measured = after[(BUILTIN_EMBEDDING_MODEL, Precision.FP32)]
    assert measured is not None and measured > 1.0  # texts per second on this machine
    # Only what was timed is claimed: other precisions wait for the orchestrator's figures.
    assert all(v is None for k, v in after.items() if k[1] is not Precision.FP32)


# --- what results say, and whose fault a refusal is -------------------------------------------

LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def leased(job_type: JobType, model: str, **fields: Any) -> LeasedJob:
    now = datetime.now(UTC)
    return LeasedJob(
        job_id="job-1",
        attempt=1,
        type=job_type,
        model=model,
        precision=Precision.FP32,
        price_wei_per_unit=1,
        lease_expires_at=now,
        deadline_at=now,
        **fields,
    )


async def no_fetch(sha256: str, dest: Path) -> Path:
    raise AssertionError("inline inputs need no download")


def run_pipeline(pipeline: InferencePipeline, job: LeasedJob, workdir: Path) -> Execution:
    async def go() -> Execution:
        try:
            return await pipeline.run(job, workdir, no_fetch)
        finally:
            await pipeline.close()

    return asyncio.run(go())


def test_embedding_results_say_which_texts_were_cut_and_at_how_many_tokens(
    tmp_path: Path,
) -> None:
    from transformers import AutoTokenizer

    pipeline = InferencePipeline(ModelRegistry(device="cpu"), max_batch=8, max_wait_s=0.005)
    texts = ["short text", LONG_TEXT, "hi", LONG_TEXT[:300]]
    job = leased(JobType.INFERENCE, BUILTIN_EMBEDDING_MODEL, input={"texts": texts})

    execution = run_pipeline(pipeline, job, tmp_path)

    assert execution.output is not None
    assert len(execution.output["embeddings"]) == len(texts)
    tokenizer = AutoTokenizer.from_pretrained(str(builtin_embedding_path()), local_files_only=True)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    assert lengths[1] > DEFAULT_MAX_SEQ_TOKENS >= max(lengths[0], lengths[2], lengths[3])
    assert execution.output["truncated"] == [
        {"index": 1, "tokens": lengths[1], "kept_tokens": DEFAULT_MAX_SEQ_TOKENS}
    ]


def test_a_misshapen_input_is_the_inputs_fault_a_missing_model_the_workers(
    tmp_path: Path,
) -> None:
    pipeline = InferencePipeline(ModelRegistry(device="cpu"), max_batch=8, max_wait_s=0.005)
    numbers = leased(JobType.INFERENCE, BUILTIN_EMBEDDING_MODEL, input={"tensors": [[1.0]]})
    with pytest.raises(JobRejected, match="embeds text") as bad_input:
        run_pipeline(pipeline, numbers, tmp_path)
    assert bad_input.value.fault is Fault.INPUT

    pipeline = InferencePipeline(ModelRegistry(device="cpu"), max_batch=8, max_wait_s=0.005)
    unknown = leased(JobType.INFERENCE, "no-such-model", input={"texts": ["hello"]})
    with pytest.raises(JobRejected, match="no model 'no-such-model'") as missing:
        run_pipeline(pipeline, unknown, tmp_path)
    assert missing.value.fault is Fault.WORKER


def test_a_transcode_result_names_every_rendition_it_skipped_and_why(tmp_path: Path) -> None:
    clip = make_test_clip(tmp_path / "clip.mp4", 320, 180, frames=4, fps=24)

    async def fetch(sha256: str, dest: Path) -> Path:
        dest.write_bytes(clip.read_bytes())
        return dest

    ladder = [
        WireRendition(name="180p", height=180, bitrate_kbps=300),
        WireRendition(height=720, bitrate_kbps=3000),
        WireRendition(name="90p", height=90, bitrate_kbps=150),
    ]
    job = leased(JobType.TRANSCODE, "h264", input_blob="ab" * 32, renditions=ladder)

    execution = asyncio.run(TranscodePipeline(threads=1).run(job, tmp_path, fetch))

    assert [f.name for f in execution.files] == ["180p", "90p"]
    assert [s.name for s in execution.skipped] == ["720p"]
    assert "would upscale the 320x180 input" in execution.skipped[0].reason
