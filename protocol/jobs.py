"""Job wire types: what a client submits and what it reads back."""

from __future__ import annotations

import math
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.generation import GenerationInput
from protocol.units import MAX_UNITS, SHA256_PATTERN, Wei, cost_wei

MAX_TEXTS_PER_JOB = 1024
MAX_TEXT_CHARS = 20_000
MAX_TENSOR_ROWS_PER_JOB = 1024
MAX_INPUT_JSON_BYTES = 16 * 1024 * 1024  # an inference input_blob (JSON), in bytes
DEFAULT_DEADLINE_S = 3600.0
MAX_DEADLINE_S = 7 * 24 * 3600.0
DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS_LIMIT = 10
TRANSCODE_MODEL = "h264"

# Ids and hashes used by the schema examples below (what /docs shows).
_EXAMPLE_JOB_ID = "4f0c2d0e9b7a4c4e8a1f2b3c4d5e6f70"
_EXAMPLE_SHA256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
_EXAMPLE_WORKER = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
_EXAMPLE_SIGNATURE = "0x" + "5e" * 64 + "1b"


class JobType(StrEnum):
    INFERENCE = "inference"
    TRANSCODE = "transcode"
    GENERATE = "generate"


class JobState(StrEnum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    # Done, and sampled for a re-run on another worker: the result waits for the comparison.
    VERIFYING = "verifying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


FINAL_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED}
)
LEASED_STATES = frozenset({JobState.ASSIGNED, JobState.RUNNING})


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


class Preference(StrEnum):
    COST = "cost"
    SPEED = "speed"
    BALANCED = "balanced"
    GREEN = "green"


class Container(StrEnum):
    MP4 = "mp4"
    MPEGTS = "mpegts"


class Fault(StrEnum):
    """Whose fault a failure is (docs/TRUST.md, "Blame"). Only ``worker`` costs reputation."""

    INPUT = "input"  # the client's input or request: the same job fails on every worker
    WORKER = "worker"  # the worker's machine, model files or software
    NONE = "none"  # neither: a transient condition (the orchestrator was full, say)


# Demuxers a transcode input may use (FFmpeg names); the worker refuses anything else, and the
# orchestrator probes uploads with the same list before any worker is leased.
ALLOWED_INPUT_FORMATS = (
    "mov,mp4,m4a,3gp,3g2,mj2",
    "mpegts",
    "matroska,webm",
    "avi",
    "flv",
    "mpeg",
    "h264",
    "hevc",
    "m4v",
    "ivf",
)
RENDITION_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Strict(BaseModel):
    # NaN and infinities are not JSON: a request must not smuggle in what no response can carry.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def check_finite(value: Any, where: str) -> None:
    """Raise ValueError if a JSON-like value holds NaN or an infinity anywhere inside it.

    A list of numbers (an embedding, a tensor row) is checked in one pass at C speed; a
    result's output is mostly such lists, and looking at each float from Python had cost more
    than the rest of the result's validation."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{where} holds {item}; numbers must be finite")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            try:
                finite = all(map(math.isfinite, item))
            except (TypeError, OverflowError):  # not only floats: look at each item
                stack.extend(item)
                continue
            if not finite:
                bad = next(x for x in item if not math.isfinite(x))
                raise ValueError(f"{where} holds {bad}; numbers must be finite")


class Rendition(_Strict):
    """One rung of a transcoding ladder. Sizes in pixels, rate in frames/s, bitrate in kbit/s."""

    name: str | None = Field(default=None, pattern=RENDITION_NAME_PATTERN)
    height: int = Field(ge=16, le=4320)
    width: int | None = Field(default=None, ge=16, le=7680)
    fps: float | None = Field(default=None, gt=0, le=240)
    bitrate_kbps: int = Field(gt=0, le=100_000)

    @model_validator(mode="after")
    def _even(self) -> Rendition:
        # H.264 in yuv420p halves the chroma planes: odd sizes cannot be encoded.
        for axis, value in (("height", self.height), ("width", self.width)):
            if value is not None and value % 2:
                raise ValueError(f"rendition {axis} must be even (yuv420p), got {value}")
        return self

    @property
    def label(self) -> str:
        """The rendition's name, or ``<height>p`` when it has none (its output file's stem)."""
        return self.name or f"{self.height}p"


DEFAULT_LADDER: tuple[Rendition, ...] = (
    Rendition(name="720p", height=720, bitrate_kbps=3000),
    Rendition(name="480p", height=480, bitrate_kbps=1500),
    Rendition(name="360p", height=360, bitrate_kbps=800),
)


class InferenceInput(_Strict):
    """Inline inference input: texts for embedding models, or numeric rows for TorchScript."""

    texts: list[str] | None = Field(default=None, min_length=1, max_length=MAX_TEXTS_PER_JOB)
    tensors: list[Any] | None = Field(
        default=None, min_length=1, max_length=MAX_TENSOR_ROWS_PER_JOB
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> InferenceInput:
        if (self.texts is None) == (self.tensors is None):
            raise ValueError("give exactly one of input.texts or input.tensors")
        check_finite(self.tensors, "input.tensors")
        for i, text in enumerate(self.texts or []):
            if len(text) > MAX_TEXT_CHARS:
                raise ValueError(f"input.texts[{i}] is longer than {MAX_TEXT_CHARS} characters")
            if not text.strip():
                raise ValueError(f"input.texts[{i}] is empty; remove it or give it some text")
        return self

    @property
    def item_count(self) -> int:
        return len(self.texts or self.tensors or [])


class JobSpec(_Strict):
    """A job as a client submits it.

    Prices are wei per unit: per input item for inference, per output pixel for transcode,
    per token for generate. A generate job's ``max_price_wei_per_unit`` caps the price of its
    completion tokens, and of its prompt tokens too unless ``max_prompt_price_wei_per_unit``
    caps those apart. Before it runs, a job can cost at most ``cost_bound_wei()``.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "inference",
                    "model": "all-MiniLM-L6-v2",
                    "input": {"texts": ["a cat sat on the mat", "GPUs are scarce"]},
                    "max_price_wei_per_unit": "1000000000000",
                    "preference": "cost",
                },
                {
                    "type": "transcode",
                    "input_blob": _EXAMPLE_SHA256,
                    "renditions": [
                        {"name": "720p", "height": 720, "bitrate_kbps": 3000},
                        {"name": "360p", "height": 360, "fps": 30, "bitrate_kbps": 800},
                    ],
                    "max_price_wei_per_unit": "2",
                    "max_units": 103680000,
                    "deadline_s": 600,
                },
            ]
        }
    )

    type: JobType
    model: str | None = Field(default=None, min_length=1, max_length=128)
    precision: Precision = Precision.FP32
    input: InferenceInput | None = None
    # Generate jobs: the chat or prompt, and how to sample (priced per token).
    generation: GenerationInput | None = None
    input_blob: str | None = Field(default=None, pattern=SHA256_PATTERN)
    renditions: list[Rendition] | None = Field(default=None, min_length=1, max_length=8)
    container: Container = Container.MP4
    max_price_wei_per_unit: Wei = Field(gt=0)
    max_prompt_price_wei_per_unit: Wei | None = Field(
        default=None,
        gt=0,
        description="Generate jobs: the most you pay per prompt token (default: "
        "max_price_wei_per_unit, which then caps both).",
    )
    deadline_s: float = Field(default=DEFAULT_DEADLINE_S, gt=0, le=MAX_DEADLINE_S)
    preference: Preference = Preference.BALANCED
    # Printable: a control character (NUL above all: PostgreSQL's text refuses it) is a typo.
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$"
    )
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1, le=MAX_ATTEMPTS_LIMIT)
    min_vram_mb: int = Field(default=0, ge=0)
    max_units: int | None = Field(
        default=None,
        gt=0,
        le=MAX_UNITS,
        description="Most units you pay for (inline inference: the item count). Output pixels "
        "for transcode, e.g. frames x the sum of width x height over the ladder.",
    )

    @model_validator(mode="after")
    def _check_shape(self) -> JobSpec:
        if self.type is not JobType.GENERATE and self.generation is not None:
            raise ValueError("generation applies to generate jobs only")
        if self.type is not JobType.GENERATE and self.max_prompt_price_wei_per_unit is not None:
            raise ValueError(
                "max_prompt_price_wei_per_unit applies to generate jobs only (prompt tokens)"
            )
        if self.type is JobType.GENERATE:
            self._check_generate()
        elif self.type is JobType.INFERENCE:
            if self.model is None:
                raise ValueError("inference jobs need a model, e.g. 'all-MiniLM-L6-v2'")
            if (self.input is None) == (self.input_blob is None):
                raise ValueError("inference jobs need exactly one of input or input_blob")
            if self.renditions is not None:
                raise ValueError("renditions apply to transcode jobs only")
            if self.input is not None:
                items = self.input.item_count
                if self.max_units is not None and self.max_units != items:
                    raise ValueError(f"max_units is {self.max_units}, but input has {items} items")
                self.max_units = items
        else:
            if self.input_blob is None:
                raise ValueError("transcode jobs need input_blob: upload the video to /v1/blobs")
            if self.input is not None:
                raise ValueError("transcode jobs take their video from input_blob, not input")
            if self.model is None:
                self.model = TRANSCODE_MODEL
            if self.precision is not Precision.FP32:
                raise ValueError("precision applies to inference jobs only")
            labels = [r.label for r in self.ladder]
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            if repeated:
                raise ValueError(
                    f"rendition names must be unique (a missing name is '<height>p'); "
                    f"repeated: {', '.join(repeated)}"
                )
        return self

    def _check_generate(self) -> None:
        if self.model is None:
            raise ValueError("generate jobs need a model, e.g. 'SmolLM2-135M-Instruct'")
        if self.generation is None:
            raise ValueError("generate jobs need generation: {messages: [...]} or {prompt: ...}")
        if self.input is not None or self.input_blob is not None or self.renditions is not None:
            raise ValueError("generate jobs take their prompt from generation only")
        if self.precision is Precision.INT8:
            raise ValueError("generate jobs run at fp32, fp16 or bf16")
        bound = self.generation.units_bound()
        if self.max_units is not None and self.max_units < bound:
            raise ValueError(
                f"max_units {self.max_units} is below this job's token bound {bound} (prompt "
                "bytes + template + max_tokens); lower max_tokens to cap what it can cost"
            )
        self.max_units = bound

    @property
    def ladder(self) -> list[Rendition]:
        return list(self.renditions or DEFAULT_LADDER)

    @property
    def prompt_price_cap(self) -> int:
        """The most a prompt token may cost (wei): its own cap, else the job's max price."""
        return self.max_prompt_price_wei_per_unit or self.max_price_wei_per_unit

    def cost_bound_wei(self) -> int | None:
        """The most this job can cost (wei), None while its units are unbounded: max_units at
        the max price; for generate, the prompt's token bound at the prompt price cap plus
        max_tokens at the max price (what a payer's budget must cover at submit)."""
        if self.max_units is None:
            return None
        if self.generation is None:
            return self.max_units * self.max_price_wei_per_unit
        return cost_wei(
            self.max_units,
            self.max_price_wei_per_unit,
            self.generation.prompt_token_bound(),
            self.prompt_price_cap,
        )


class VerificationStatus(StrEnum):
    PENDING = "pending"  # a check run is queued or running
    PASSED = "passed"  # a second worker's result agreed
    REPLACED = "replaced"  # the first result lost a tie-break: the client got the agreed one
    INCONCLUSIVE = "inconclusive"  # no check could finish, or three different answers
    UPHELD = "upheld"  # the check disagreed and lost the tie-break: the first result stands


class VerificationCheck(BaseModel):
    """One comparison of the job's result with a re-run on another worker."""

    worker_address: str
    metric: str  # "cosine" (embeddings) or "psnr_db" (transcodes)
    value: float | None = None
    threshold: float
    agrees: bool | None = None
    detail: str | None = None


class VerificationView(BaseModel):
    status: VerificationStatus
    checks: list[VerificationCheck] = Field(default_factory=list)
    detail: str | None = None
    slashed_address: str | None = None
    # When the result was replaced: the check job whose worker signed it (the signature covers
    # that job id, attempt 1, and the units and price that check was billed, not this job's).
    result_signed_for: str | None = None
    result_signed_units: int | None = None
    result_signed_price_wei_per_unit: Wei | None = None
    result_signed_prompt_units: int | None = None
    result_signed_prompt_price_wei_per_unit: Wei | None = None


class JobEventView(BaseModel):
    at: datetime
    attempt: int
    state: JobState
    detail: str | None = None


class OutputBlob(_Strict):
    """A result file in the blob store. Sizes in bytes and pixels."""

    name: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=0)
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    frames: int | None = Field(default=None, ge=0)


class JobView(BaseModel):
    """A job as its client sees it. Money in wei, times in seconds, energy in joules."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _EXAMPLE_JOB_ID,
                    "type": "inference",
                    "model": "all-MiniLM-L6-v2",
                    "precision": "fp32",
                    "state": "succeeded",
                    "attempt": 1,
                    "max_attempts": 3,
                    "preference": "cost",
                    "max_price_wei_per_unit": "1000000000000",
                    "max_units": 2,
                    "price_wei_per_unit": "800000000000",
                    "units": 2,
                    "cost_wei": "1600000000000",
                    "worker_address": _EXAMPLE_WORKER,
                    "created_at": "2026-12-02T16:00:00Z",
                    "updated_at": "2026-12-02T16:00:01.2Z",
                    "deadline_at": "2026-12-02T17:00:00Z",
                    "started_at": "2026-12-02T16:00:00.4Z",
                    "finished_at": "2026-12-02T16:00:01.2Z",
                    "duration_s": 0.8,
                    "energy_j": 12.5,
                    "energy_source": "estimate",
                    "co2_g": 0.00165,
                    "history": [
                        {"at": "2026-12-02T16:00:00Z", "attempt": 1, "state": "queued"},
                        {"at": "2026-12-02T16:00:01.2Z", "attempt": 1, "state": "succeeded"},
                    ],
                }
            ]
        }
    )

    id: str
    type: JobType
    model: str
    precision: Precision
    state: JobState
    attempt: int
    max_attempts: int
    preference: Preference
    max_price_wei_per_unit: Wei
    max_units: int | None = None
    # Generate jobs: the client's cap on a prompt token (None: max_price_wei_per_unit).
    max_prompt_price_wei_per_unit: Wei | None = None
    # The most the job can cost, fixed at submit (what a payer's budget holds for it).
    max_cost_wei: Wei | None = None
    price_wei_per_unit: Wei | None = None
    # Generate jobs: the agreed price of a prompt token, and the prompt tokens billed at it
    # (``units`` counts them too; the other units are billed at ``price_wei_per_unit``).
    prompt_price_wei_per_unit: Wei | None = None
    prompt_units: int | None = None
    units: int | None = None
    cost_wei: Wei | None = None
    worker_address: str | None = None
    idempotency_key: str | None = None
    input_blob: str | None = None
    renditions: list[Rendition] | None = None
    container: Container | None = None
    created_at: datetime
    updated_at: datetime
    deadline_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    failure_reason: str | None = None
    # Whose fault the failure was: "input" (yours), "worker" or "none" (docs/TRUST.md).
    fault: Fault | None = None
    waiting_reason: str | None = None
    duration_s: float | None = None
    energy_j: float | None = None
    energy_source: str | None = None
    # Estimated grams of CO2: energy x the worker's grid carbon intensity (see matching).
    co2_g: float | None = None
    verification: VerificationView | None = None
    history: list[JobEventView] = Field(default_factory=list)


class SkippedRendition(_Strict):
    """A requested rendition that was not produced, and why (e.g. it would upscale)."""

    name: str = Field(min_length=1, max_length=64)
    reason: str = Field(min_length=1, max_length=500)


class ResultBatchProof(BaseModel):
    """How a result reported in a batch is signed: ``signature`` (EIP-712 ``ResultBatch``) is
    over the Merkle root of the batch's ``count`` result hashes, and this job's ``Result``
    struct hash, at ``index``, leads to that root along ``path`` (protocol/signing.py,
    ``recover_job_result_signer``): the job's result is proven alone, without the other
    jobs' outputs or hashes, in log2(count) hashes. A batch signed over its list of hashes
    (``scheme`` "list": workers from before the Merkle root, and results stored then) carries
    ``result_hashes`` instead of ``path``, this job's hash at ``index``."""

    scheme: Literal["merkle", "list"] = "merkle"
    signature: str
    index: int
    count: int
    path: list[str] | None = None
    result_hashes: list[str] | None = None


class ResultView(BaseModel):
    """A job's result. ``signature`` is the worker's EIP-712 signature over (job id, attempt,
    output sha256, units, price in wei per unit, prompt units, prompt price in wei per unit):
    see protocol/signing.py. ``cost_wei`` is ``protocol.units.cost_wei`` of the signed fields
    (0 when verification replaced the result: the client pays nothing)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": _EXAMPLE_JOB_ID,
                    "attempt": 1,
                    "state": "succeeded",
                    "output": {"embeddings": [[0.031, -0.052, 0.117], [0.094, 0.008, -0.021]]},
                    "output_sha256": _EXAMPLE_SHA256,
                    "signature": _EXAMPLE_SIGNATURE,
                    "worker_address": _EXAMPLE_WORKER,
                    "units": 2,
                    "price_wei_per_unit": "800000000000",
                    "cost_wei": "1600000000000",
                    "duration_s": 0.8,
                    "energy_j": 12.5,
                    "energy_source": "estimate",
                    "co2_g": 0.00165,
                }
            ]
        }
    )

    job_id: str
    attempt: int
    state: JobState
    output: dict[str, Any] | None = None
    output_blobs: list[OutputBlob] | None = None
    # Transcodes: every requested rendition is in output_blobs or here, with the reason.
    skipped_renditions: list[SkippedRendition] | None = None
    output_sha256: str
    signature: str
    worker_address: str
    units: int
    price_wei_per_unit: Wei
    # Generate results: the prompt tokens among ``units``, and their price; 0 for other types.
    prompt_units: int = 0
    prompt_price_wei_per_unit: Wei = 0
    cost_wei: Wei
    duration_s: float
    energy_j: float
    energy_source: str
    co2_g: float | None = None
    verification: VerificationView | None = None
    # Reported in a batch: ``signature`` is the batch's, and this proves the job's part in it.
    batch: ResultBatchProof | None = None


class JobList(BaseModel):
    jobs: list[JobView]
    next_cursor: str | None = None


# Models every worker build can serve; workers may offer more (TorchScript in their models folder).
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "all-MiniLM-L6-v2": {"type": JobType.INFERENCE, "task": "text-embedding", "dim": 384},
    TRANSCODE_MODEL: {"type": JobType.TRANSCODE, "task": "h264-ladder"},
}
