"""Orchestrator settings: one pydantic-settings ``Settings``, from GPUMARKET_* env and CLI flags."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path(".gpumarket")
PLACEHOLDER_SECRETS = frozenset({"changeme", "change-me", "secret", "admin", "password", "test"})
MIN_PROD_TOKEN_CHARS = 32


class Settings(BaseSettings):
    """Everything the orchestrator process can be told. Times in seconds, sizes in bytes."""

    model_config = SettingsConfigDict(env_prefix="GPUMARKET_", extra="ignore")

    env: Literal["dev", "prod"] = "dev"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = DEFAULT_DATA_DIR
    db_url: str | None = None
    blob_dir: Path | None = None
    admin_token: SecretStr | None = None
    max_blob_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    lease_ttl_s: float = Field(default=30.0, gt=0, le=3600)
    heartbeat_interval_s: float = Field(default=10.0, gt=0, le=600)
    long_poll_max_s: float = Field(default=30.0, gt=0, le=120)
    sweep_interval_s: float = Field(default=1.0, gt=0, le=60)
    challenge_ttl_s: float = Field(default=300.0, gt=0, le=3600)
    dispatch_batch: int = Field(default=256, ge=1, le=10_000)
    auto_migrate: bool = True
    # Payments: on when a deployment file (from `gpumarket chain up`) is given.
    deployment_file: Path | None = None
    signer_key: SecretStr | None = None
    voucher_ttl_s: int = Field(default=30 * 24 * 3600, gt=0)
    reconcile_interval_s: float = Field(default=5.0, gt=0)
    # Blocks mined on top of a redemption's block before it counts as paid (a reorg shallower
    # than this cannot undo a counted payment). 0 suits anvil, which mines only on demand.
    redemption_confirmations: int = Field(default=0, ge=0, le=10_000)
    # Stakes: registry events are scanned every reconcile; every registered worker's standing
    # is also re-read (in JSON-RPC batches) once per this interval, as a safety net.
    stake_check_interval_s: float = Field(default=60.0, gt=0)
    # With payments, a registration never seen staked for this long ends (the worker may
    # register again once it has staked), so idle unstaked registrations cost nothing.
    unstaked_registration_ttl_s: float = Field(default=3600.0, gt=0)
    # Challenges and registrations per source address (in-process, per replica): a bucket of
    # registration_burst requests refilled at registration_rate_per_min; 0 turns it off.
    registration_rate_per_min: float = Field(default=30.0, ge=0)
    registration_burst: int = Field(default=30, ge=1, le=10_000)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"  # json: one object per line (gpumarket/logs.py)
    # Verification: the share of results re-run on a second worker and compared (docs/TRUST.md).
    verify_rate: float = Field(default=0.05, ge=0, le=1)
    # The share for workers that are new (fewer than verify_new_worker_jobs results) or whose
    # reputation is below verify_trusted_reputation.
    verify_rate_new: float = Field(default=0.25, ge=0, le=1)
    verify_new_worker_jobs: int = Field(default=20, ge=0)
    verify_trusted_reputation: float = Field(default=0.8, ge=0, le=1)
    # A check still unfinished after this long is given up: the first result stands, unverified.
    verify_timeout_s: float = Field(default=900.0, gt=0)
    # A check no worker has taken after this long (none free at the job's price, say) is
    # withdrawn, and the result is released, paid, marked inconclusive with the reason.
    verify_unplaced_timeout_s: float = Field(default=120.0, gt=0)
    # Who pays the workers that run checks (an on-chain payer that authorised this orchestrator's
    # signer); default: the signer's own address. Without budget there, checks run unpaid.
    verification_payer: str | None = None
    # Wei slashed from a worker that loses a tie-break; default (None): all its stake.
    slash_wei: int | None = Field(default=None, gt=0)
    # Reputation: evidence halves in weight every half-life; below the floor, no new work.
    reputation_half_life_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    reputation_floor: float = Field(default=0.25, ge=0, lt=1)
    # Throttling a client whose jobs keep failing for their input (refused at submit, or
    # confirmed bad on workers): a score that halves every half-life; at the limit, 429.
    client_input_failure_limit: float = Field(default=20.0, gt=0)
    client_input_failure_half_life_s: float = Field(default=300.0, gt=0)

    @field_validator("db_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite:", "postgresql", "postgres:")):
            raise ValueError("use sqlite:///path/to/file.db or postgresql://user@host:port/db")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.heartbeat_interval_s >= self.lease_ttl_s:
            raise ValueError(
                f"GPUMARKET_HEARTBEAT_INTERVAL_S ({self.heartbeat_interval_s:g} s) must be "
                f"shorter than GPUMARKET_LEASE_TTL_S ({self.lease_ttl_s:g} s), or every lease "
                "expires between heartbeats"
            )
        if self.env == "prod":
            token = self.admin_token.get_secret_value() if self.admin_token else ""
            if len(token) < MIN_PROD_TOKEN_CHARS or token.lower() in PLACEHOLDER_SECRETS:
                raise ValueError(
                    f"GPUMARKET_ADMIN_TOKEN must be set to a random value of at least "
                    f"{MIN_PROD_TOKEN_CHARS} characters when env=prod"
                )
        return self

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.data_dir / 'orchestrator.db').resolve()}"

    @property
    def blob_path(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"

    def resolve_admin_token(self) -> str:
        """The operator token; in dev, one is made once and kept in ``data_dir/admin-token``."""
        if self.admin_token is not None:
            return self.admin_token.get_secret_value()
        path = self.data_dir / "admin-token"
        if path.exists():
            kept = path.read_text().strip()
            if kept:  # an empty file would make "" the token and lock the operator out
                return kept
        self.data_dir.mkdir(parents=True, exist_ok=True)
        token = "gmo_" + secrets.token_urlsafe(32)
        # Written aside (0600 from the start), so no reader ever sees a half file, then linked
        # into place only if no file is there: replicas starting together on one data folder
        # all end up with the first one's token (an empty file left by a crash is replaced).
        fd, tmp = tempfile.mkstemp(dir=self.data_dir, prefix=".admin-token.")
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
        try:
            if path.exists() and not path.read_text().strip():
                os.replace(tmp, path)
                return token
            os.link(tmp, path)
        except FileExistsError:
            return path.read_text().strip()
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return token


def describe_validation_error(exc: ValidationError, env_prefix: str = "GPUMARKET_") -> str:
    """One line per bad setting, naming its environment variable."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"])
        where = f"setting {env_prefix}{loc.upper()}" if loc else "settings"
        lines.append(f"invalid {where}: {err['msg']}")
    return "\n".join(lines)
