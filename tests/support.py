"""Builders shared by the tests: workers with real keys, offers, signed completions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount

from orchestrator.services.auth import Principal
from orchestrator.wiring import Services
from protocol import CompleteRequest, HardwareDescriptor, Offer, RegisterRequest
from protocol.signing import output_sha256, sign_registration, sign_result

EMBED_MODEL = "all-MiniLM-L6-v2"


def offer(
    model: str = EMBED_MODEL,
    price: int = 100,
    job_type: str = "inference",
    precision: str = "fp32",
    **extra: Any,
) -> Offer:
    return Offer.model_validate(
        {
            "job_type": job_type,
            "model": model,
            "precision": precision,
            "price_wei_per_unit": price,
            **extra,
        }
    )


def hardware(gpu_vram_mb: int | None = None) -> HardwareDescriptor:
    gpus = []
    if gpu_vram_mb is not None:
        gpus = [
            {"index": 0, "name": "Test GPU", "vram_mb": gpu_vram_mb, "compute_capability": "9.0"}
        ]
    return HardwareDescriptor.model_validate(
        {"cpu_model": "test cpu", "cpu_cores": 2, "ram_mb": 4096, "gpus": gpus}
    )


@dataclass
class TestWorker:
    __test__ = False  # not a test class

    principal: Principal
    account: LocalAccount
    token: str

    @property
    def id(self) -> str:
        return self.principal.id

    @property
    def address(self) -> str:
        return str(self.account.address)


def register_request(
    account: LocalAccount,
    nonce: str,
    message: str,
    offers: list[Offer] | None = None,
    max_concurrency: int = 1,
    gpu_vram_mb: int | None = None,
    carbon_intensity: float | None = None,
) -> RegisterRequest:
    return RegisterRequest(
        address=account.address,
        nonce=nonce,
        signature=sign_registration(account.key, message),
        hardware=hardware(gpu_vram_mb),
        offers=offers or [offer()],
        max_concurrency=max_concurrency,
        carbon_intensity_g_per_kwh=carbon_intensity,
    )


def register(services: Services, **kwargs: Any) -> TestWorker:
    """A worker registered through the service layer with a fresh key."""
    account = Account.create()
    now = services.now()
    challenge = services.workers.challenge(account.address, now)
    req = register_request(account, challenge.nonce, challenge.message, **kwargs)
    resp = services.workers.register(req, now)
    return TestWorker(Principal("worker", resp.worker_id), account, resp.session_token)


def agreed_price(services: Services, job_id: str) -> int:
    """The price (wei per unit) the job was matched at: what its worker signs with a result."""
    from orchestrator.store.models import Job

    with services.store.read() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.price_wei_per_unit is not None, f"{job_id} is not matched"
        return job.price_wei_per_unit


def completion(
    worker: TestWorker,
    job_id: str,
    attempt: int,
    output: dict[str, Any],
    units: int,
    duration_s: float = 0.5,
    energy_j: float = 2.0,
    *,
    price_wei_per_unit: int,
) -> CompleteRequest:
    """A result as an honest worker reports it: signed over its output, units and price."""
    digest = output_sha256(output)
    return CompleteRequest(
        attempt=attempt,
        output=output,
        output_sha256=digest,
        signature=sign_result(
            worker.account.key, job_id, attempt, digest, units, price_wei_per_unit
        ),
        duration_s=duration_s,
        energy_j=energy_j,
        energy_source="estimate",
        units=units,
    )


def new_client(services: Services, name: str = "client") -> tuple[Principal, str]:
    client_id, key = services.auth.create_client(name, services.now())
    return Principal("client", client_id), key
