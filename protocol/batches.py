"""Batch wire types: many jobs submitted, waited on and completed in one request each.

A batch is an envelope, not a unit of work: every job in it keeps its own id, idempotency key,
lease, attempt, price, cap and verification sampling. A batch answer lists each item's outcome
in the order asked, an item's error beside it (one bad item does not refuse the others).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from protocol.generation import StreamChunk
from protocol.jobs import (
    JobSpec,
    JobState,
    JobView,
    ResultView,
    _Strict,
)
from protocol.units import Wei
from protocol.workers import MAX_LEASE_JOBS, ResultFields

MAX_SUBMIT_BATCH = 500
MAX_WAIT_JOBS = 1000
MAX_RESULT_BATCH = 4 * MAX_LEASE_JOBS
MAX_STREAM_BATCH = 4 * MAX_LEASE_JOBS
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class ItemError(BaseModel):
    """Why one item of a batch was refused: the problem document's status, code and detail."""

    status: int
    code: str
    detail: str
    extra: dict[str, Any] | None = None


class JobBatchRequest(_Strict):
    """Jobs to submit together; each may carry its own ``idempotency_key``."""

    jobs: list[JobSpec] = Field(min_length=1, max_length=MAX_SUBMIT_BATCH)


class JobBatchItem(BaseModel):
    """One submitted job: ``job`` (``created`` false when its idempotency key already named
    it), or ``error``."""

    job: JobView | None = None
    created: bool = False
    error: ItemError | None = None


class JobBatchResponse(BaseModel):
    jobs: list[JobBatchItem]


class JobWaitRequest(_Strict):
    """Jobs to look at, waiting (a long-poll, at most ``wait_s`` seconds) until ``return_when``:
    ``any`` of them is final, or ``all`` are; ``wait_s`` 0 answers at once."""

    job_ids: list[str] = Field(min_length=1, max_length=MAX_WAIT_JOBS)
    wait_s: float = Field(default=0.0, ge=0, le=60)
    return_when: Literal["any", "all"] = "any"
    results: bool = Field(
        default=True, description="Carry the signed result of each succeeded job in the answer"
    )

    @model_validator(mode="after")
    def _check_ids(self) -> JobWaitRequest:
        for i, job_id in enumerate(self.job_ids):
            if not re.fullmatch(JOB_ID_PATTERN, job_id):
                raise ValueError(f"job_ids[{i}] {job_id[:80]!r} is not a job id")
        return self


class JobStateItem(BaseModel):
    id: str
    state: JobState


class JobWaitResponse(BaseModel):
    """``states``: every asked job's state, in the order asked. Each final job also comes
    whole, once: its signed result in ``results`` if it succeeded (and results were asked
    for), else its view in ``jobs`` (say, why it failed). Jobs still open come as states only,
    so a long-poll over many jobs costs little while it waits."""

    states: list[JobStateItem]
    jobs: list[JobView]
    results: list[ResultView]


class BatchResult(ResultFields):
    """One result of a batch: as ``CompleteRequest`` without its own signature, with the job
    id and the prices (wei per unit) the worker signed it at."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    price_wei_per_unit: Wei
    # Generate jobs: the prompt token price it was leased at (LeasedJob); 0 for other types.
    prompt_price_wei_per_unit: Wei = 0


class BatchCompleteRequest(_Strict):
    """Results reported together under one EIP-712 ``ResultBatch`` signature over the Merkle
    root of the per-job ``Result`` struct hashes, in this order, and their count
    (protocol/signing.py, ``result_hash``, ``sign_result_batch``)."""

    results: list[BatchResult] = Field(min_length=1, max_length=MAX_RESULT_BATCH)
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")

    @model_validator(mode="after")
    def _once_each(self) -> BatchCompleteRequest:
        ids = [r.job_id for r in self.results]
        twice = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) < len(ids) else []
        if twice:
            raise ValueError(f"a batch reports each job once; listed twice: {', '.join(twice)}")
        return self


class BatchCompleteItem(BaseModel):
    """One job's outcome: recorded (its ``state`` now, succeeded or verifying, and what it
    costs, in wei), or ``error`` (e.g. 409: a stale attempt). The result itself is not sent
    back: the worker has it, the client reads it (``GET /v1/jobs/{id}/result``)."""

    job_id: str
    state: JobState | None = None
    cost_wei: Wei | None = None
    error: ItemError | None = None


class BatchCompleteResponse(BaseModel):
    results: list[BatchCompleteItem]


class StreamPart(StreamChunk):
    """One job's text since its last part (``StreamChunk``, with the job's id)."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)


class StreamBatchRequest(_Strict):
    """What a worker's generating jobs produced since its last send: a part per job, in one
    request (``POST /v1/workers/streams``), so the requests a worker makes do not grow with
    the number of jobs it streams."""

    parts: list[StreamPart] = Field(min_length=1, max_length=MAX_STREAM_BATCH)

    @model_validator(mode="after")
    def _once_each(self) -> StreamBatchRequest:
        ids = [p.job_id for p in self.parts]
        if len(set(ids)) < len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"one part per job in a batch; listed twice: {', '.join(twice)}")
        return self


class StreamPartItem(BaseModel):
    """One part's outcome: taken (``error`` None), or refused, e.g. 409 when the attempt's
    lease is gone (stop generating that job)."""

    job_id: str
    error: ItemError | None = None


class StreamBatchResponse(BaseModel):
    parts: list[StreamPartItem]
