"""Worker settings: one pydantic-settings ``WorkerSettings`` from GPUMARKET_WORKER_* and flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from eth_account import Account
from eth_account.signers.local import LocalAccount
from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol import JobType

DEFAULT_PRICES_WEI: dict[str, int] = {
    # per input item (one sentence) and per output pixel
    JobType.INFERENCE.value: 1_000_000_000,
    JobType.TRANSCODE.value: 1_000,
    JobType.GENERATE.value: 100_000_000,  # per token (a prompt token too, unless priced apart)
}
DEFAULT_REDEEM_THRESHOLD_WEI = 10**16
"""Redeem a payer's voucher once it owes this much (0.01 ETH): gas stays a small share."""
DEFAULT_REDEEM_INTERVAL_S = 3600.0
"""Redeem whatever is owed at least this often, however small."""


class WorkerSettings(BaseSettings):
    """Everything a worker process can be told. Times in seconds, prices in wei per unit."""

    model_config = SettingsConfigDict(env_prefix="GPUMARKET_WORKER_", extra="ignore")

    orchestrator_url: str = "http://127.0.0.1:8000"
    key_file: Path = Path(".gpumarket/worker.key")
    models_dir: Path | None = None
    work_dir: Path = Path(".gpumarket/work")
    max_concurrency: int = Field(default=4, ge=1, le=256)
    # Generation is opted into (--job-type generate): its model takes memory and ~5-20 s to load.
    job_types: list[JobType] = Field(default_factory=lambda: [JobType.INFERENCE, JobType.TRANSCODE])
    # Keys are a job type or a model name; a model's own price wins over its type's.
    prices_wei: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_PRICES_WEI))
    # Generate offers: the price of a prompt token, keyed "generate" or a model name (a model's
    # own wins); none set: a prompt token costs what a completion token does.
    prompt_prices_wei: dict[str, int] = Field(default_factory=dict)
    carbon_intensity_g_per_kwh: float | None = Field(default=None, ge=0, le=2000)
    assumed_watts: float | None = Field(default=None, gt=0)
    lease_wait_s: float = Field(default=20.0, gt=0, le=60)
    max_batch: int = Field(default=32, ge=1, le=4096)
    batch_wait_s: float = Field(default=0.005, ge=0, le=1)
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=15.0, gt=0)
    # Payments (used only when the orchestrator serves GET /v1/chain).
    redeem_threshold_wei: int = Field(default=DEFAULT_REDEEM_THRESHOLD_WEI, ge=1)
    redeem_interval_s: float = Field(default=DEFAULT_REDEEM_INTERVAL_S, ge=0)  # 0: by threshold
    chain_rpc_url: str | None = None  # None: the rpc_url the orchestrator announces
    stake_wei: int | None = Field(default=None, ge=1)  # below the minimum: stake up to this total
    # How often the redeemer looks at its vouchers (seconds).
    redeem_poll_s: float = Field(default=60.0, gt=0, le=3600)
    log_level: str = "info"
    # text or json lines; GPUMARKET_LOG_FORMAT (shared with the orchestrator) is read too.
    log_format: Literal["text", "json"] = Field(
        default="text",
        validation_alias=AliasChoices(
            "log_format", "gpumarket_worker_log_format", "gpumarket_log_format"
        ),
    )
    # Prometheus metrics (worker/metrics.py): off unless a port is given; loopback by default.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    @field_validator("orchestrator_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        """One URL, or several replicas' URLs separated by commas."""
        urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
        if not urls:
            raise ValueError("give the orchestrator as http://host:port or https://host")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(
                    f"{url!r}: give the orchestrator as http://host:port or https://host "
                    "(several replicas: comma-separated)"
                )
        return ",".join(urls)

    @property
    def orchestrator_urls(self) -> list[str]:
        """Every orchestrator replica this worker may talk to."""
        return self.orchestrator_url.split(",")

    @field_validator("chain_rpc_url")
    @classmethod
    def _rpc_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("give the chain's JSON-RPC endpoint as http://host:port or https://")
        return value

    @field_validator("prices_wei", "prompt_prices_wei")
    @classmethod
    def _positive_prices(cls, value: dict[str, int]) -> dict[str, int]:
        for key, price in value.items():
            if price <= 0:
                raise ValueError(f"price for {key!r} must be a positive number of wei")
        return value

    def price_for(self, job_type: JobType, model: str) -> int:
        return self.prices_wei.get(model) or self.prices_wei.get(
            job_type.value, DEFAULT_PRICES_WEI[job_type.value]
        )

    def prompt_price_for(self, job_type: JobType, model: str) -> int | None:
        """Wei per prompt token for a generate offer; None (the completion price) if unset."""
        if job_type is not JobType.GENERATE:
            return None
        return self.prompt_prices_wei.get(model) or self.prompt_prices_wei.get(job_type.value)


def load_or_create_key(path: Path) -> tuple[LocalAccount, bool]:
    """The worker's signing key; made (0600) on first run. Returns (account, created)."""
    if path.exists():
        raw = path.read_text().strip()
        try:
            return Account.from_key(raw), False
        except ValueError as exc:
            raise ValueError(f"{path} does not hold a hex private key: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    account = Account.create()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(account.key.hex() + "\n")
    return account, True
