"""``gpumarket worker run`` with paced stand-in executors instead of torch and PyAV.

Everything but the executors is the real worker: the CLI, settings, the daemon's pull loop,
heartbeats, signed reports with retries, blob uploads, staking and the voucher redeemer. The
executors take ``GPUMARKET_FAULTS_JOB_S`` seconds per job and return outputs that depend only
on the job's input, so every attempt of a job produces the same result. The real worker loads
MiniLM for ~13 s on a 2-core box; this one starts in ~2 s, which is what lets a trial kill and
restart workers dozens of times.

``GPUMARKET_FAULTS_LOSE_HEARTBEATS=1`` drops every heartbeat before it is sent, as a lossy
link would: the worker keeps working, but its leases are not extended.

``GPUMARKET_FAULTS_CHEAT=1`` makes a lazy cheat: every embedding it returns is made up (the
stand-in embedding of other text), signed like an honest result; verification must catch it.

Run: ``python -m tests.faults.paced_worker --orchestrator URL --key-file K ...`` (the options
of ``gpumarket worker run``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import sys
import tempfile
from pathlib import Path

from protocol import HeartbeatResponse, JobRef, JobType, LeasedJob, Precision
from protocol.jobs import DEFAULT_LADDER, TRANSCODE_MODEL
from worker.executors.base import Capability, Execution, Executor, FetchBlob, OutputFile

EMBED_MODEL = "all-MiniLM-L6-v2"
JOB_S_ENV = "GPUMARKET_FAULTS_JOB_S"
OUTPUT_BYTES_ENV = "GPUMARKET_FAULTS_OUTPUT_BYTES"
LOSE_HEARTBEATS_ENV = "GPUMARKET_FAULTS_LOSE_HEARTBEATS"
CHEAT_ENV = "GPUMARKET_FAULTS_CHEAT"
DEFAULT_JOB_S = 1.0
DEFAULT_OUTPUT_BYTES = 64 * 1024
FRAMES = 2  # frames "encoded" per rendition: units = frames x width x height
EMBED_DIM = 4


def embedding(text: str) -> list[float]:
    """A deterministic stand-in embedding of ``text`` (the trials check it)."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255.0, 6) for b in digest[:EMBED_DIM]]


def rendition_width(height: int) -> int:
    return (height * 16 // 9) // 2 * 2


def transcode_units(heights: list[int]) -> int:
    """Output pixels the paced transcoder bills for a ladder of these heights."""
    return sum(FRAMES * rendition_width(h) * h for h in heights)


TS_NULL_PACKET = b"\x47\x1f\xff\x10" + b"\xff" * 184  # MPEG-TS padding; demuxers skip it


def rendition_bytes(input_sha256: str, height: int, size: int) -> bytes:
    """The stand-in rendition file: a real MPEG-TS clip of the rung's size and ``FRAMES``
    frames (the orchestrator bills what it probes in the file), padded with null packets to
    at least ``size`` bytes. The same for every input, so every attempt of a job agrees."""
    clip = _rendition_clip(height)
    missing = max(0, size - len(clip))
    return clip + TS_NULL_PACKET * -(-missing // len(TS_NULL_PACKET))


@functools.cache
def _rendition_clip(height: int) -> bytes:
    from worker.executors.transcode import make_test_clip

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.ts"
        make_test_clip(path, rendition_width(height), height, FRAMES, 24, container="mpegts")
        return path.read_bytes()


class PacedInference:
    job_type = JobType.INFERENCE

    def __init__(self, job_s: float, cheat: bool = False) -> None:
        self.job_s = job_s
        self.cheat = cheat

    def capabilities(self) -> list[Capability]:
        return [Capability(EMBED_MODEL, Precision.FP32)]

    async def warm_up(self) -> None:
        return None

    async def run(self, job: LeasedJob, workdir: Path, fetch: FetchBlob) -> Execution:
        await asyncio.sleep(self.job_s)
        texts = list((job.input or {}).get("texts") or [])
        if self.cheat:  # made up, not computed: right shape, wrong numbers
            texts = [f"made up {t}" for t in texts]
        return Execution(units=len(texts), output={"embeddings": [embedding(t) for t in texts]})

    async def close(self) -> None:
        return None


class PacedTranscode:
    job_type = JobType.TRANSCODE

    def __init__(self, job_s: float, output_bytes: int) -> None:
        self.job_s = job_s
        self.output_bytes = output_bytes

    def capabilities(self) -> list[Capability]:
        return [Capability(TRANSCODE_MODEL, Precision.FP32)]

    async def warm_up(self) -> None:
        return None

    async def run(self, job: LeasedJob, workdir: Path, fetch: FetchBlob) -> Execution:
        assert job.input_blob is not None
        await fetch(job.input_blob, workdir / "input")  # the real download path
        await asyncio.sleep(self.job_s)
        files = []
        for rung in job.renditions or list(DEFAULT_LADDER):
            path = workdir / f"{rung.height}p.mp4"
            path.write_bytes(rendition_bytes(job.input_blob, rung.height, self.output_bytes))
            files.append(
                OutputFile(
                    name=f"{rung.height}p",
                    path=path,
                    width=rendition_width(rung.height),
                    height=rung.height,
                    frames=FRAMES,
                )
            )
        heights = [f.height for f in files if f.height is not None]
        return Execution(units=transcode_units(heights), files=tuple(files))

    async def close(self) -> None:
        return None


def _paced_executors(_settings: object) -> list[Executor]:
    job_s = float(os.environ.get(JOB_S_ENV, DEFAULT_JOB_S))
    output_bytes = int(os.environ.get(OUTPUT_BYTES_ENV, DEFAULT_OUTPUT_BYTES))
    cheat = os.environ.get(CHEAT_ENV) == "1"
    return [PacedInference(job_s, cheat), PacedTranscode(job_s, output_bytes)]


async def _lost_heartbeat(self: object, jobs: list[JobRef]) -> HeartbeatResponse:
    """A heartbeat that never reaches the orchestrator; the daemon hears nothing back."""
    return HeartbeatResponse(cancel=[], lease_ttl_s=3600.0, heartbeat_interval_s=0.5)


def main() -> None:
    import worker.main
    from gpumarket.cli import app
    from worker.client import OrchestratorClient

    worker.main.build_executors = _paced_executors  # type: ignore[assignment]
    if os.environ.get(LOSE_HEARTBEATS_ENV) == "1":
        OrchestratorClient.heartbeat = _lost_heartbeat  # type: ignore[method-assign]
    app(args=["worker", "run", *sys.argv[1:]], prog_name="gpumarket")


if __name__ == "__main__":
    main()
