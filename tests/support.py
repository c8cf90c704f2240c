"""Builders shared by the tests: workers with real keys, offers, signed completions."""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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


def agreed_prompt_price(services: Services, job_id: str) -> int:
    """The prompt token price a generate job was matched at (0 for other jobs): signed too."""
    from orchestrator.services.billing import signed_prompt_price
    from orchestrator.store.models import Job

    with services.store.read() as s:
        job = s.get(Job, job_id)
        assert job is not None, job_id
        return signed_prompt_price(job)


def prompt_tokens(output: dict[str, Any]) -> int:
    """The prompt tokens a generation output's usage holds (0 for other outputs)."""
    usage = output.get("usage")
    return int(usage.get("prompt_tokens", 0)) if isinstance(usage, dict) else 0


class Signer(Protocol):
    """Anything holding a worker's key: a TestWorker, or worker.client.OrchestratorClient."""

    account: LocalAccount


def completion(
    worker: Signer,
    job_id: str,
    attempt: int,
    output: dict[str, Any],
    units: int,
    duration_s: float = 0.5,
    energy_j: float = 2.0,
    *,
    price_wei_per_unit: int,
    prompt_price_wei_per_unit: int = 0,
) -> CompleteRequest:
    """A result as an honest worker reports it: signed over its output, units and prices
    (generate results: their prompt tokens at ``prompt_price_wei_per_unit``)."""
    digest = output_sha256(output)
    prompt_units = prompt_tokens(output)
    return CompleteRequest(
        attempt=attempt,
        output=output,
        output_sha256=digest,
        signature=sign_result(
            worker.account.key,
            job_id,
            attempt,
            digest,
            units,
            price_wei_per_unit,
            prompt_units=prompt_units,
            prompt_price_wei_per_unit=prompt_price_wei_per_unit,
        ),
        duration_s=duration_s,
        energy_j=energy_j,
        energy_source="estimate",
        units=units,
        prompt_units=prompt_units,
    )


def new_client(services: Services, name: str = "client") -> tuple[Principal, str]:
    client_id, key = services.auth.create_client(name, services.now())
    return Principal("client", client_id), key


@functools.cache
def video_clip(width: int = 64, height: int = 36, frames: int = 3) -> bytes:
    """A real (tiny) H.264 MP4, for jobs whose input the orchestrator probes at submit."""
    from worker.executors.transcode import make_test_clip

    with tempfile.TemporaryDirectory(prefix="gpumarket-clip-") as folder:
        path = make_test_clip(Path(folder) / "clip.mp4", width, height, frames=frames, fps=24)
        return path.read_bytes()


@functools.cache
def faststart_clip(width: int = 160, height: int = 90, frames: int = 250, fps: int = 25) -> bytes:
    """An MP4 with its index at the front (``-movflags +faststart``), as streaming sites serve
    them: a cut copy still opens, and still declares every frame."""
    import av

    from worker.executors.transcode import make_test_clip

    with tempfile.TemporaryDirectory(prefix="gpumarket-clip-") as folder:
        plain = make_test_clip(Path(folder) / "plain.mp4", width, height, frames=frames, fps=fps)
        moved = Path(folder) / "faststart.mp4"
        options = {"movflags": "+faststart"}
        with (
            av.open(str(plain)) as source,
            av.open(str(moved), "w", format="mp4", container_options=options) as out,
        ):
            video = out.add_stream_from_template(source.streams.video[0])
            for packet in source.demux(source.streams.video[0]):
                if packet.dts is None:
                    continue  # the demuxer's end-of-stream marker
                packet.stream = video
                out.mux(packet)
        return moved.read_bytes()


def cut_between_packets(data: bytes, share: float) -> bytes:
    """``data`` cut at the start of the first video packet at or after ``share`` of its bytes:
    a clean cut, so every frame left decodes and only the count and duration give it away."""
    import io

    import av

    with av.open(io.BytesIO(data)) as source:
        starts = [p.pos for p in source.demux(source.streams.video[0]) if p.pos is not None]
    cut = next(pos for pos in sorted(starts) if pos >= share * len(data))
    return data[:cut]


def damaged_clip(seed: int) -> bytes:
    """A small ``+faststart`` MP4 whose index is sound (it passes the orchestrator's probe at
    submit) but whose picture data from half-way to 70 % is overwritten: the worker's decoder
    finds it damaged. ``seed`` makes each one different bytes, deterministically."""
    import random

    data = bytearray(faststart_clip(160, 90, frames=48, fps=24))
    rng = random.Random(seed)
    for i in range(len(data) // 2, len(data) * 7 // 10):
        data[i] = rng.randrange(256)
    return bytes(data)
