"""The ``Executor`` seam: what the worker's job loop needs from a pipeline.

One executor per job type. The daemon owns leases, signing and energy; an executor only
turns a leased job's input into an output and counts its units (the pricing unit).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from protocol import Fault, JobType, LeasedJob, Precision, SkippedRendition
from protocol.workers import TensorShape

FetchBlob = Callable[[str, Path], Awaitable[Path]]


class JobRejected(Exception):
    """This job cannot be done here, and retrying it here cannot help.

    ``fault`` says whose fault that is (the orchestrator confirms an "input" claim before
    it costs the client anything, docs/TRUST.md): ``INPUT`` for the job's own input or request
    (corrupt video, a misshapen row), ``WORKER`` for this machine (model files missing, a
    precision it cannot run although it offered it).
    """

    def __init__(self, message: str, fault: Fault = Fault.INPUT) -> None:
        super().__init__(message)
        self.fault = fault


@dataclass(frozen=True)
class OutputFile:
    """A result file to upload; sizes in pixels, ``frames`` for video."""

    name: str
    path: Path
    width: int | None = None
    height: int | None = None
    frames: int | None = None


@dataclass(frozen=True)
class Execution:
    """What an executor produced: an inline ``output`` or ``files``, and the units done."""

    units: int
    output: dict[str, Any] | None = None
    # Generation: how many of ``units`` are prompt tokens (billed at the prompt price).
    prompt_units: int = 0
    files: tuple[OutputFile, ...] = ()
    # Transcodes: requested renditions not produced, each with its reason.
    skipped: tuple[SkippedRendition, ...] = ()


@dataclass(frozen=True)
class Capability:
    model: str
    precision: Precision
    max_batch: int = 1
    # Throughput measured on this machine at warm-up (units per second), if measured.
    units_per_s: float | None = None
    # The input row a TorchScript model takes (from its manifest), advertised in the offer.
    input: TensorShape | None = None
    # Generation models: the context length in tokens (prompt + completion), and the longest
    # token of the tokenizer in UTF-8 bytes (a prompt's bytes over it bound its tokens).
    context_tokens: int | None = None
    max_token_bytes: int | None = None


class Executor(Protocol):
    job_type: JobType

    def capabilities(self) -> list[Capability]: ...

    async def warm_up(self) -> None:
        """Load what the first job would otherwise wait for (model weights)."""

    async def run(self, job: LeasedJob, workdir: Path, fetch: FetchBlob) -> Execution:
        """Run ``job``. ``workdir`` is the job's own folder, made (and removed afterwards) for
        a job with an input blob: its download and any output files go there."""
        ...

    async def close(self) -> None: ...
