"""Worker wire types: registration, heartbeats, leases, completion."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class Offer(_Strict):
    """What a worker sells: one (job type, model, precision) at a price in wei per unit.

    ``units_per_s`` is the worker's own benchmark, used until the orchestrator has measured
    it; ``energy_j_per_unit`` likewise. ``input`` (TorchScript models) is the row its manifest
    takes, so the orchestrator refuses a misshapen row at submit instead of leasing it.
    """

    job_type: JobType
    model: str = Field(min_length=1, max_length=128)
    precision: Precision = Precision.FP32
    price_wei_per_unit: Wei = Field(gt=0)
    max_batch: int = Field(default=1, ge=1, le=4096)
    units_per_s: float | None = Field(default=None, gt=0)
    energy_j_per_unit: float | None = Field(default=None, ge=0)
    input: TensorShape | None = None


class ChallengeRequest(_Strict):
    address: str = Field(pattern=ADDRESS_PATTERN)


class ChallengeResponse(BaseModel):
    nonce: str
    message: str
    expires_at: datetime


class RegisterRequest(_Strict):
    """Register (or re-register) a worker; ``signature`` is EIP-191 over the challenge message."""

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
    lease_expires_at: datetime
    deadline_at: datetime


class LeaseResponse(BaseModel):
    jobs: list[LeasedJob]


class CompleteRequest(_Strict):
    """A finished attempt. Duration in seconds, energy in joules, units as priced."""

    attempt: int = Field(ge=1)
    output: dict[str, Any] | None = None
    output_blobs: list[OutputBlob] | None = Field(default=None, min_length=1, max_length=16)
    output_sha256: str = Field(pattern=SHA256_PATTERN)
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")
    duration_s: float = Field(ge=0)
    energy_j: float = Field(ge=0)
    energy_source: EnergySource
    units: int = Field(ge=0, le=MAX_UNITS)
    # Transcodes: the requested renditions not produced, each with its reason.
    skipped_renditions: list[SkippedRendition] | None = Field(default=None, max_length=16)

    @model_validator(mode="after")
    def _one_output(self) -> CompleteRequest:
        if (self.output is None) == (self.output_blobs is None):
            raise ValueError("give exactly one of output or output_blobs")
        check_finite(self.output, "output")
        return self


class FailRequest(_Strict):
    """A worker gives a job up, saying whose fault it thinks it is (docs/TRUST.md, "Blame").

    ``fault`` is a claim the orchestrator checks, not a verdict: "input" (not retryable: the
    same input fails everywhere) is believed only once confirmed; "none" (retryable only) and
    "worker" are taken as said.
    """

    attempt: int = Field(ge=1)
    retryable: bool
    reason: str = Field(min_length=1, max_length=2000)
    fault: Fault = Fault.WORKER

    @model_validator(mode="after")
    def _consistent(self) -> FailRequest:
        if self.fault is Fault.INPUT and self.retryable:
            raise ValueError("fault 'input' is not retryable: the same input fails everywhere")
        if self.fault is Fault.NONE and not self.retryable:
            raise ValueError("fault 'none' is for retryable failures: another attempt may work")
        return self


class WorkerView(BaseModel):
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
