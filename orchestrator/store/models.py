"""ORM tables. Instants are unix seconds (float, UTC); money is wei (see ``WeiAmount``)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine


class WeiAmount(TypeDecorator[int]):
    """Exact wei: NUMERIC(78, 0) on PostgreSQL, a decimal string on SQLite.

    SQLite's NUMERIC affinity would turn amounts past 2**63 into floats, so it gets text.
    """

    impl = String(78)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(Numeric(78, 0))
        return dialect.type_descriptor(String(78))

    def process_bind_param(self, value: int | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "postgresql":
            return Decimal(int(value))
        return str(int(value))

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        return None if value is None else int(value)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Client(Base):
    __tablename__ = "clients"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    # The on-chain account that pays for this client's jobs (proved by a signature).
    payer_address: Mapped[str | None] = mapped_column(String(42), nullable=True)
    # Jobs of this client that failed for their input, as a score that halves every
    # ``client_input_failure_half_life_s``, decayed to ``input_failures_at`` (throttling).
    input_failures: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    input_failures_at: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    address: Mapped[str] = mapped_column(String(42), unique=True)
    hardware: Mapped[dict[str, Any]] = mapped_column(JSON)
    offers: Mapped[list[Any]] = mapped_column(JSON)
    max_concurrency: Mapped[int] = mapped_column(Integer)
    carbon_intensity_g_per_kwh: Mapped[float | None] = mapped_column(Float, nullable=True)
    version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    session_token_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # registered | draining | deregistered; "online" is derived from last_seen_at.
    status: Mapped[str] = mapped_column(String(16))
    registered_at: Mapped[float] = mapped_column(Float)
    last_seen_at: Mapped[float] = mapped_column(Float)
    # A worker receives assignments only while it has a lease long-poll open.
    available_until: Mapped[float] = mapped_column(Float, default=0.0)
    free_slots: Mapped[int] = mapped_column(Integer, default=0)
    jobs_succeeded: Mapped[int] = mapped_column(Integer, default=0)
    jobs_failed: Mapped[int] = mapped_column(Integer, default=0)
    leases_expired: Mapped[int] = mapped_column(Integer, default=0)
    # Measured per offer key "type:model:precision": {"units_per_s", "energy_j_per_unit"}.
    perf: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # WorkerRegistry.isEligible as last read from the chain (None: never read, or no chain).
    stake_eligible: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    stake_checked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Reputation evidence, decayed to ``rep_at`` (see services/reputation.py).
    rep_good: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    rep_bad: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    rep_at: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    verifications_passed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    verifications_failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Challenge(Base):
    __tablename__ = "challenges"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(42))
    message: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[float] = mapped_column(Float)
    used: Mapped[bool] = mapped_column(Boolean, default=False)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("client_id", "idempotency_key", name="uq_jobs_client_idempotency"),
        Index("ix_jobs_state_created", "state", "created_at"),
        Index("ix_jobs_client_created", "client_id", "created_at"),
        # A worker's jobs in a state (the jobs it holds), and a worker's jobs (its prefix).
        Index("ix_jobs_worker_state", "worker_id", "state"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id"))
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(128))
    precision: Mapped[str] = mapped_column(String(8))
    preference: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    input_blob: Mapped[str | None] = mapped_column(String(64), nullable=True)
    max_price_wei_per_unit: Mapped[int] = mapped_column(WeiAmount)
    # Generate jobs: the client's cap on a prompt token (None: max_price_wei_per_unit).
    max_prompt_price_wei_per_unit: Mapped[int | None] = mapped_column(WeiAmount, nullable=True)
    # The most the job can cost, fixed at submit (services/billing.py, ``cost_bound_wei``);
    # None for jobs from before it was kept (their bound: max_units x max price).
    max_cost_wei: Mapped[int | None] = mapped_column(WeiAmount, nullable=True)
    min_vram_mb: Mapped[int] = mapped_column(Integer, default=0)
    # The most units the client pays for; a result claiming more is refused.
    max_units: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Who pays (the client's payer when the job was admitted); None without payments.
    payer_address: Mapped[str | None] = mapped_column(String(42), nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    max_attempts: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str | None] = mapped_column(ForeignKey("workers.id"), nullable=True)
    price_wei_per_unit: Mapped[int | None] = mapped_column(WeiAmount, nullable=True)
    # Generate jobs: the agreed price of a prompt token (from the offer), set with the price.
    prompt_price_wei_per_unit: Mapped[int | None] = mapped_column(WeiAmount, nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    delivered: Mapped[bool] = mapped_column(Boolean, default=False)
    excluded_workers: Mapped[list[Any]] = mapped_column(JSON, default=list)
    deadline_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Generate jobs: when the first streamed text of the job arrived (time to first token).
    first_token_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Whose fault a failure was: "input" | "worker" | "none" (protocol.Fault).
    fault: Mapped[str | None] = mapped_column(String(8), nullable=True)
    # Workers that said the input is bad without the orchestrator confirming it yet:
    # [{"worker_id", "attempt", "reason"}] (services/blame.py).
    input_claims: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    # Why the last dispatch round could not place this queued job (None once placed).
    waiting_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    units: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Generate results: how many of ``units`` are prompt tokens (billed at the prompt price).
    prompt_units: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cost_wei: Mapped[int | None] = mapped_column(WeiAmount, nullable=True)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    output_blobs: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    # Transcodes: requested renditions not produced, [{"name", "reason"}] (SkippedRendition).
    skipped_renditions: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    output_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    signature: Mapped[str | None] = mapped_column(String(132), nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    energy_j: Mapped[float | None] = mapped_column(Float, nullable=True)
    energy_source: Mapped[str | None] = mapped_column(String(16), nullable=True)
    co2_g: Mapped[float | None] = mapped_column(Float, nullable=True)
    # "job" (a client's) or "check" (a re-run of ``parent_id`` on another worker, to verify it).
    kind: Mapped[str] = mapped_column(String(8), default="job", server_default="job")
    parent_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    # The verification record (protocol.VerificationView as JSON) of a sampled job.
    verification: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # A result reported in a batch: the batch (its signature is ``signature``) and this job's
    # place in its list of result hashes (whose Merkle root, or for a "list" batch the list
    # itself, the signature covers).
    result_batch_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    result_batch_index: Mapped[int | None] = mapped_column(Integer, nullable=True)


class JobEvent(Base):
    """Append-only history of a job's state changes."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    worker_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    at: Mapped[float] = mapped_column(Float)


class Blob(Base):
    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)
    # What the orchestrator's media probe found (services/inputs.py), once asked; None before.
    probe: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class BlobGrant(Base):
    """Who may read a blob: ``client:<id>`` or ``worker:<id>``."""

    __tablename__ = "blob_grants"

    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), primary_key=True)
    principal: Mapped[str] = mapped_column(String(48), primary_key=True)


class RefusedInput(Base):
    """An input confirmed to fail for itself (services/blame.py): the same job (same input,
    model and request) is refused at submit from then on, before any worker is leased."""

    __tablename__ = "refused_inputs"

    input_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class LedgerEntry(Base):
    """Money owed for one paid attempt: payer -> payee, in wei. One row per (job, attempt)."""

    __tablename__ = "ledger_entries"
    __table_args__ = (UniqueConstraint("job_id", "attempt", name="uq_ledger_job_attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    payer: Mapped[str] = mapped_column(String(42), index=True)
    payee: Mapped[str] = mapped_column(String(42), index=True)
    amount_wei: Mapped[int] = mapped_column(WeiAmount)
    created_at: Mapped[float] = mapped_column(Float)


class VoucherRow(Base):
    """The latest signed cumulative voucher per (payer, payee): the ledger's running total."""

    __tablename__ = "vouchers"

    payer: Mapped[str] = mapped_column(String(42), primary_key=True)
    payee: Mapped[str] = mapped_column(String(42), primary_key=True)
    cumulative_wei: Mapped[int] = mapped_column(WeiAmount)
    expiry: Mapped[int] = mapped_column(BigInteger)
    signer: Mapped[str] = mapped_column(String(42))
    signature: Mapped[str] = mapped_column(String(132))
    entries: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[float] = mapped_column(Float)


class Redemption(Base):
    """A Redeemed event seen on chain; (tx hash, log index) makes reading it twice harmless.

    ``block_hash`` names the chain it was read from: when the chain no longer has that block
    (a rollback or reorg), the row is dropped and the block range read again. ``confirmed``:
    enough blocks were mined on top of it (``redemption_confirmations``) for it to count in
    budgets, ``/metrics``, the dashboard and ``/v1/settlement``.
    """

    __tablename__ = "redemptions"

    tx_hash: Mapped[str] = mapped_column(String(66), primary_key=True)
    log_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    payer: Mapped[str] = mapped_column(String(42), index=True)
    payee: Mapped[str] = mapped_column(String(42), index=True)
    cumulative_wei: Mapped[int] = mapped_column(WeiAmount)
    paid_wei: Mapped[int] = mapped_column(WeiAmount)
    fee_wei: Mapped[int] = mapped_column(WeiAmount)
    block_number: Mapped[int] = mapped_column(BigInteger, index=True)
    block_hash: Mapped[str] = mapped_column(String(66))
    confirmed: Mapped[bool] = mapped_column(Boolean)


class ChainCursor(Base):
    """How far an event scan has read, so a restart resumes instead of rescanning.
    ``block_hash`` is the hash of block ``next_block - 1`` when it was read: if the chain
    has another block there now (or none), it rolled back under the scan."""

    __tablename__ = "chain_cursors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    next_block: Mapped[int] = mapped_column(BigInteger)
    block_hash: Mapped[str | None] = mapped_column(String(66), nullable=True)


class Slash(Base):
    """A slash owed on chain for a lost tie-break. Written with the verdict, sent by the sweeper;
    the evidence hash makes sending it twice harmless (WorkerRegistry refuses used evidence)."""

    __tablename__ = "slashes"

    evidence_hash: Mapped[str] = mapped_column(String(66), primary_key=True)
    worker_address: Mapped[str] = mapped_column(String(42), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    amount_wei: Mapped[int] = mapped_column(WeiAmount)
    # pending | sent | skipped (no chain, or nothing left to slash)
    status: Mapped[str] = mapped_column(String(16))
    tx_hash: Mapped[str | None] = mapped_column(String(66), nullable=True)
    slashed_wei: Mapped[int | None] = mapped_column(WeiAmount, nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class Replica(Base):
    """An orchestrator process serving this database, and what it must share with the others.

    Each replica writes its row at start and refreshes ``seen_at`` every sweep; a row not seen
    for a while belongs to a replica that died and is ignored (and pruned). ``config`` holds
    fingerprints, never secrets: e.g. the admin token's sha256, the signer's address."""

    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    seen_at: Mapped[float] = mapped_column(Float, index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)


class ResultBatch(Base):
    """Results a worker reported together: one EIP-712 signature over the Merkle root of the
    ordered list of the jobs' ``Result`` struct hashes and their count (``scheme`` "merkle"),
    or, from workers that sign as before, over the list itself ("list"; protocol/signing.py);
    each job keeps its index into it."""

    __tablename__ = "result_batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    worker_id: Mapped[str] = mapped_column(String(32))
    signature: Mapped[str] = mapped_column(String(132))
    result_hashes: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    scheme: Mapped[str] = mapped_column(String(8), default="merkle", server_default="list")
