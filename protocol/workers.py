"""Worker wire types: registration, heartbeats, leases, completion."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from protocol.jobs import (
    Container,
    Fault,
    JobType,
    OutputBlob,
    Precision,
    Rendition,
    SkippedRendition,
    check_finite,
)
from protocol.units import ADDRESS_PATTERN, MAX_UNITS, SHA256_PATTERN, Wei

MAX_OFFERS = 64
MAX_CONCURRENCY = 256
MAX_LEASE_JOBS = 64

EnergySource = Literal["nvml", "rapl", "estimate"]


class _Strict(BaseModel):
    # NaN and infinities are not JSON: a request must not smuggle in what no response can carry.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class GpuDescriptor(BaseModel):
    index: int = Field(ge=0)
    name: str
    vram_mb: int = Field(ge=0)
    compute_capability: str | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    uuid: str | None = None


class HardwareDescriptor(BaseModel):
    """What the worker's probe found. Memory in MiB."""

    cpu_model: str = "unknown"
    cpu_cores: int = Field(default=1, ge=1)
    ram_mb: int = Field(default=0, ge=0)
    platform: str | None = None
    python: str | None = None
    torch_version: str | None = None
    cuda_available: bool = False
    gpus: list[GpuDescriptor] = Field(default_factory=list, max_length=64)

    @property
    def vram_mb(self) -> int:
        """VRAM of the largest GPU in MiB; 0 for a CPU-only worker."""
        return max((gpu.vram_mb for gpu in self.gpus), default=0)


class TensorShape(_Strict):
    """One input row of a TorchScript model, from its manifest: dtype and the row's shape
    (the manifest's shape without its batch dimension)."""

    dtype: str = Field(min_length=1, max_length=16)
    shape: list[int] = Field(max_length=8)

    @model_validator(mode="after")
    def _positive(self) -> TensorShape:
        if any(dim < 1 for dim in self.shape):
            raise ValueError("row dimensions must be positive")
        return self


_EXAMPLE_ADDRESS = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
_EXAMPLE_SIGNATURE = "0x" + "5e" * 64 + "1b"
_EXAMPLE_SHA256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
_EXAMPLE_OFFER: dict[str, JsonValue] = {
    "job_type": "inference",
    "model": "all-MiniLM-L6-v2",
    "precision": "fp32",
    "price_wei_per_unit": "800000000000",
    "max_batch": 32,
    "units_per_s": 350.0,
}


class Offer(_Strict):
    """What a worker sells: one (job type, model, precision) at a price in wei per unit.

    Generate offers price prompt tokens at ``prompt_price_wei_per_unit`` (when not given:
    ``price_wei_per_unit``, as completion tokens are). ``units_per_s`` is the worker's own
    benchmark, used until the orchestrator has measured it; ``energy_j_per_unit`` likewise.
    ``input`` (TorchScript models) is the row its manifest takes, so the orchestrator refuses a
    misshapen row at submit instead of leasing it; ``context_tokens`` and ``max_token_bytes``
    (generate) let it refuse a prompt that cannot fit the model's context.
    """

    model_config = ConfigDict(json_schema_extra={"examples": [_EXAMPLE_OFFER]})

    job_type: JobType
    model: str = Field(min_length=1, max_length=128)
    precision: Precision = Precision.FP32
    price_wei_per_unit: Wei = Field(gt=0)
    max_batch: int = Field(default=1, ge=1, le=4096)
    units_per_s: float | None = Field(default=None, gt=0)
    energy_j_per_unit: float | None = Field(default=None, ge=0)
    input: TensorShape | None = None
    # Generate offers: the model's context length in tokens (prompt + completion).
    context_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    # Generate offers: the price of a prompt token (None: price_wei_per_unit).
    prompt_price_wei_per_unit: Wei | None = Field(default=None, gt=0)
    # Generate offers: the longest token of the model's tokenizer, in UTF-8 bytes. A prompt of
    # B bytes is then at least ceil(B / max_token_bytes) tokens (services/inputs.py).
    max_token_bytes: int | None = Field(default=None, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _generate_fields(self) -> Self:
        if self.job_type is not JobType.GENERATE:
            given = [
                name
                for name in ("context_tokens", "prompt_price_wei_per_unit", "max_token_bytes")
                if getattr(self, name) is not None
            ]
            if given:
                raise ValueError(f"{', '.join(given)} apply to generate offers only")
        return self

    @property
    def prompt_price(self) -> int:
        """Wei per prompt token (generate); the offer's price when it names none."""
        return self.prompt_price_wei_per_unit or self.price_wei_per_unit


class ChallengeRequest(_Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"address": _EXAMPLE_ADDRESS}]})

    address: str = Field(pattern=ADDRESS_PATTERN)


class ChallengeResponse(BaseModel):
    nonce: str
    message: str
    expires_at: datetime


class RegisterRequest(_Strict):
    """Register (or re-register) a worker; ``signature`` is EIP-191 over the challenge message."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "address": _EXAMPLE_ADDRESS,
                    "nonce": "Jx1v0m7Qy3H2cTq8LwZk",
                    "signature": _EXAMPLE_SIGNATURE,
                    "hardware": {"cpu_model": "AMD EPYC 7B13", "cpu_cores": 16, "ram_mb": 65536},
                    "offers": [_EXAMPLE_OFFER],
                    "max_concurrency": 4,
                    "carbon_intensity_g_per_kwh": 120.0,
                }
            ]
        }
    )

    address: str = Field(pattern=ADDRESS_PATTERN)
    nonce: str = Field(min_length=1, max_length=128)
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")
    hardware: HardwareDescriptor
    offers: list[Offer] = Field(min_length=1, max_length=MAX_OFFERS)
    max_concurrency: int = Field(default=1, ge=1, le=MAX_CONCURRENCY)
    carbon_intensity_g_per_kwh: float | None = Field(default=None, ge=0, le=2000)
    version: str | None = Field(default=None, max_length=64)


class RegisterResponse(BaseModel):
    worker_id: str
    session_token: str
    lease_ttl_s: float
    heartbeat_interval_s: float
    long_poll_max_s: float


class JobRef(_Strict):
    job_id: str = Field(min_length=1, max_length=64)
    attempt: int = Field(ge=1)


class HeartbeatRequest(_Strict):
    jobs: list[JobRef] = Field(default_factory=list, max_length=MAX_CONCURRENCY)


class HeartbeatResponse(BaseModel):
    """``cancel`` lists jobs the worker must stop: cancelled by the client or taken back."""

    cancel: list[JobRef]
    lease_ttl_s: float
    heartbeat_interval_s: float


class LeaseRequest(_Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"max_jobs": 4, "wait_s": 20}]})

    max_jobs: int = Field(default=1, ge=1, le=MAX_LEASE_JOBS)
    wait_s: float = Field(default=20.0, ge=0, le=60)


class LeasedJob(BaseModel):
    job_id: str
    attempt: int
    type: JobType
    model: str
    precision: Precision
    input: dict[str, Any] | None = None
    input_blob: str | None = None
    renditions: list[Rendition] | None = None
    container: Container | None = None
    price_wei_per_unit: Wei
    # Generate jobs: the price of a prompt token, signed with the result (0 for other types).
    prompt_price_wei_per_unit: Wei = 0
    lease_expires_at: datetime
    deadline_at: datetime


class LeaseResponse(BaseModel):
    jobs: list[LeasedJob]


class ResultFields(_Strict):
    """What a worker reports of a finished attempt, alone (``CompleteRequest``) or in a batch
    (``protocol.batches.BatchResult``): exactly one of ``output`` and ``output_blobs``."""

    attempt: int = Field(ge=1)
    output: dict[str, Any] | None = None
    output_blobs: list[OutputBlob] | None = Field(default=None, min_length=1, max_length=16)
    output_sha256: str = Field(pattern=SHA256_PATTERN)
    duration_s: float = Field(ge=0)
    energy_j: float = Field(ge=0)
    energy_source: EnergySource
    units: int = Field(ge=0, le=MAX_UNITS)
    # Generate results: how many of ``units`` are prompt tokens (usage.prompt_tokens); 0 else.
    prompt_units: int = Field(default=0, ge=0, le=MAX_UNITS)
    # Transcodes: the requested renditions not produced, each with its reason.
    skipped_renditions: list[SkippedRendition] | None = Field(default=None, max_length=16)

    @model_validator(mode="after")
    def _one_output(self) -> Self:
        if (self.output is None) == (self.output_blobs is None):
            raise ValueError("give exactly one of output or output_blobs")
        check_finite(self.output, "output")
        return self


class CompleteRequest(ResultFields):
    """A finished attempt. Duration in seconds, energy in joules, units as priced: input
    items for inference, output pixels (frames x width x height over the renditions) for
    transcode. The orchestrator counts the units itself and refuses other figures (422).
    ``signature``: EIP-712 over (job id, attempt, output sha256, units, price, prompt units,
    prompt price): see protocol/signing.py."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "attempt": 1,
                    "output_blobs": [
                        {
                            "name": "360p",
                            "sha256": _EXAMPLE_SHA256,
                            "size": 182304,
                            "width": 640,
                            "height": 360,
                            "frames": 48,
                        }
                    ],
                    "output_sha256": _EXAMPLE_SHA256,
                    "signature": _EXAMPLE_SIGNATURE,
                    "duration_s": 1.9,
                    "energy_j": 41.0,
                    "energy_source": "rapl",
                    "units": 11059200,
                }
            ]
        }
    )

    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")


class FailRequest(_Strict):
    """A worker gives a job up, saying whose fault it thinks it is (docs/TRUST.md, "Blame").

    ``fault`` is a claim the orchestrator checks, not a verdict: "input" (not retryable: the
    same input fails everywhere) is believed only once confirmed; "none" (retryable only) and
    "worker" are taken as said.
    """

    attempt: int = Field(ge=1)
    retryable: bool
    # Any text but a NUL, which PostgreSQL's text refuses (a traceback's newlines are fine).
    reason: str = Field(min_length=1, max_length=2000, pattern=r"^[^\x00]+$")
    fault: Fault = Fault.WORKER

    @model_validator(mode="after")
    def _consistent(self) -> FailRequest:
        if self.fault is Fault.INPUT and self.retryable:
            raise ValueError("fault 'input' is not retryable: the same input fails everywhere")
        if self.fault is Fault.NONE and not self.retryable:
            raise ValueError("fault 'none' is for retryable failures: another attempt may work")
        return self


class WorkerView(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "b1e3f0a2c4d64e1f9a7b8c6d5e4f3a21",
                    "address": _EXAMPLE_ADDRESS,
                    "status": "registered",
                    "hardware": {"cpu_model": "AMD EPYC 7B13", "cpu_cores": 16, "ram_mb": 65536},
                    "offers": [_EXAMPLE_OFFER],
                    "max_concurrency": 4,
                    "running_jobs": 1,
                    "free_slots": 3,
                    "jobs_succeeded": 812,
                    "jobs_failed": 3,
                    "leases_expired": 1,
                    "reputation": 0.97,
                    "carbon_intensity_g_per_kwh": 120.0,
                    "registered_at": "2026-12-01T09:00:00Z",
                    "last_seen_at": "2026-12-02T16:00:00Z",
                }
            ]
        }
    )

    id: str
    address: str
    status: str
    hardware: HardwareDescriptor
    offers: list[Offer]
    max_concurrency: int
    running_jobs: int
    free_slots: int
    jobs_succeeded: int
    jobs_failed: int
    leases_expired: int
    reputation: float
    carbon_intensity_g_per_kwh: float | None
    registered_at: datetime
    last_seen_at: datetime


class MarketStats(BaseModel):
    """Operator's overview. Money in wei, energy in joules."""

    jobs_by_state: dict[str, int]
    queue_depth: int
    workers_registered: int
    workers_online: int
    wei_earned_total: Wei
    energy_j_total: float


class StartRequest(_Strict):
    attempt: int = Field(ge=1)


class FailResponse(BaseModel):
    job_id: str
    state: str


class DeregisterResponse(BaseModel):
    requeued_jobs: int


class ClientCreate(_Strict):
    name: str = Field(min_length=1, max_length=128)


class ClientCreated(BaseModel):
    client_id: str
    api_key: str


class PayerChallengeRequest(_Strict):
    address: str = Field(pattern=ADDRESS_PATTERN)


class PayerLinkRequest(_Strict):
    """Proof that the client controls ``address``: EIP-191 signature over the challenge."""

    address: str = Field(pattern=ADDRESS_PATTERN)
    nonce: str = Field(min_length=1, max_length=128)
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")


class BudgetView(BaseModel):
    """What the payer can still be charged. Wei."""

    deposit_wei: Wei
    cap_remaining_wei: Wei
    unredeemed_wei: Wei
    reserved_wei: Wei
    available_wei: Wei
    unlocking: bool


class AccountView(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "client_id": "7d2c9e1f0a3b4c5d6e7f8091a2b3c4d5",
                    "name": "my-app",
                    "payer_address": "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
                    "payments": True,
                    "signer_address": "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
                    "budget": {
                        "deposit_wei": "1000000000000000000",
                        "cap_remaining_wei": "900000000000000000",
                        "unredeemed_wei": "1600000000000",
                        "reserved_wei": "2000000000000",
                        "available_wei": "899996400000000000",
                        "unlocking": False,
                    },
                }
            ]
        }
    )

    client_id: str
    name: str
    payer_address: str | None
    payments: bool
    signer_address: str | None = None
    budget: BudgetView | None = None


class SignedVoucherView(BaseModel):
    voucher: dict[str, Any]
    signature: str
    chain_id: int
    payment_broker: str


class VoucherList(BaseModel):
    vouchers: list[SignedVoucherView]


class SettlementPair(BaseModel):
    """One (payer, payee). ``redeemed_wei``: the highest voucher total redeemed on chain, by
    confirmed redemption rows. ``redemptions``, ``paid_wei`` and ``fee_wei``: every redemption
    row (confirmed or not); ``chain_*``: the chain's Redeemed events through ``through_block``
    (None without a chain)."""

    payer: str
    payee: str
    ledger_wei: Wei
    voucher_wei: Wei
    redeemed_wei: Wei
    redemptions: int = 0
    unconfirmed_redemptions: int = 0
    paid_wei: Wei = 0
    fee_wei: Wei = 0
    chain_redemptions: int | None = None
    chain_paid_wei: Wei | None = None
    chain_fee_wei: Wei | None = None


class SettlementReport(BaseModel):
    """Ledger against vouchers against the chain, per (payer, payee). Wei.

    ``consistent``: no ``problems``: per pair, ledger = voucher >= redeemed, and every
    redemption row is one of the chain's Redeemed events (same log, same block) and the other
    way round, through ``through_block``, the block the orchestrator last read up to."""

    pairs: list[SettlementPair]
    ledger_entries: int
    consistent: bool
    through_block: int | None = None
    problems: list[str] = Field(default_factory=list)
