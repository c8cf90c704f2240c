"""Worker routes: registration, heartbeats, the lease long-poll, and job outcomes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from orchestrator.api.deps import ChallengeLimitDep, RegistrationLimitDep, ServicesDep, WorkerDep
from orchestrator.api.hangup import HangUp
from orchestrator.api.openapi import problems
from orchestrator.api.strict_json import StrictJSONRoute
from orchestrator.exceptions import GpumarketError
from orchestrator.services.auth import Principal
from orchestrator.services.jobs import item_error
from orchestrator.services.leases import POLL_TTL_S
from orchestrator.services.wakeups import WAKE_FALLBACK_S
from orchestrator.wiring import Services
from protocol import (
    ChallengeRequest,
    ChallengeResponse,
    CompleteRequest,
    FailRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    LeaseRequest,
    LeaseResponse,
    RegisterRequest,
    RegisterResponse,
    ResultView,
)
from protocol.batches import (
    BatchCompleteRequest,
    BatchCompleteResponse,
    StreamBatchRequest,
    StreamBatchResponse,
    StreamPart,
    StreamPartItem,
)
from protocol.generation import StreamChunk
from protocol.workers import (
    DeregisterResponse,
    FailResponse,
    SignedVoucherView,
    StartRequest,
    VoucherList,
)

router = APIRouter(prefix="/v1/workers", tags=["workers"], route_class=StrictJSONRoute)


@router.post("/challenge", dependencies=[ChallengeLimitDep], responses=problems(400, 413, 422, 429))
def challenge(req: ChallengeRequest, services: ServicesDep) -> ChallengeResponse:
    """Step 1 of registration: a one-time message to sign with the worker's key (EIP-191)."""
    return services.workers.challenge(req.address, services.now())


@router.post(
    "/register",
    status_code=201,
    dependencies=[RegistrationLimitDep],
    responses=problems(400, 401, 413, 422, 429, 503),
)
def register(req: RegisterRequest, services: ServicesDep) -> RegisterResponse:
    """Step 2: the signed challenge, hardware and offers; returns a session token."""
    return services.workers.register(req, services.now())


@router.post("/heartbeat", responses=problems(400, 401, 413, 422))
async def heartbeat(
    req: HeartbeatRequest, worker: WorkerDep, services: ServicesDep
) -> HeartbeatResponse:
    """Extend the leases of the listed jobs; the answer lists jobs to stop (cancelled or lost)."""
    if not req.jobs:  # liveness only: noted in memory, no I/O, so no thread hop either
        return services.workers.heartbeat(worker, req.jobs, services.now())
    return await run_in_threadpool(services.workers.heartbeat, worker, req.jobs, services.now())


@router.post("/lease", responses=problems(400, 401, 413, 422))
async def lease(
    req: LeaseRequest, worker: WorkerDep, services: ServicesDep, request: Request
) -> LeaseResponse:
    """Long-poll for work: returns as soon as jobs are assigned, or empty after ``wait_s``
    (at once when the server is stopping)."""
    now = services.now()
    deadline = now + min(req.wait_s, services.settings.long_poll_max_s)
    leases, hub = services.leases, services.hub
    listening = True  # until a claim that hands over jobs closes the poll itself
    line: HangUp | None = None  # the worker's connection, watched while the poll waits
    renewed = now  # start_poll advertises the free slots for POLL_TTL_S
    try:
        jobs = await run_in_threadpool(leases.start_poll, worker, req.max_jobs, deadline, now)
        listening = not jobs
        if listening:
            # A worker that hangs up (stopped, killed, its network gone) ends its poll: it is
            # no longer offered work that would be handed to a closed connection.
            line = HangUp(request, on_gone=lambda: hub.notify(worker.id)).start()

        def over() -> bool:  # the server is stopping, or the worker hung up: answer now
            return hub.closing or (line is not None and line.gone)

        while listening and (remaining := deadline - services.now()) > 0 and not over():
            # Woken by an assignment to us, or after a second to look again (jobs assigned by
            # another replica); dispatch itself runs on submit, on poll start and in the sweeper.
            await hub.wait(worker.id, remaining)
            if over():
                break
            # The advertisement (POLL_TTL_S from its last renewal) is renewed when the next
            # look might come too late for it, not at every look: the renewal writes the
            # worker's row, which waits while its results are recorded. Looks come a wait
            # (at most WAKE_FALLBACK_S) after the last one ended; a claim stuck for more than
            # the margin left (2 s) lets the slots lapse until the next look renews them.
            now = services.now()
            renew = (
                now - renewed >= POLL_TTL_S / 2 - WAKE_FALLBACK_S
                and renewed + POLL_TTL_S < deadline  # not already advertised to its end
            )
            jobs = await run_in_threadpool(
                leases.claim,
                worker,
                req.max_jobs,
                now,
                deadline if renew else None,
                close_when_leased=True,
            )
            renewed = now if renew else renewed
            listening = not jobs
        return LeaseResponse(jobs=jobs)
    finally:
        if line is not None:
            line.stop()
        if listening:
            await run_in_threadpool(leases.close_poll, worker, services.now())


@router.post(
    "/jobs/{job_id}/start", status_code=204, responses=problems(400, 401, 403, 404, 409, 413, 422)
)
def start_job(job_id: str, req: StartRequest, worker: WorkerDep, services: ServicesDep) -> None:
    """The worker began executing this attempt (ASSIGNED -> RUNNING)."""
    services.leases.start(worker, job_id, req.attempt, services.now())


@router.post(
    "/jobs/{job_id}/stream", status_code=204, responses=problems(400, 401, 403, 404, 409, 422)
)
def stream_job(job_id: str, chunk: StreamChunk, worker: WorkerDep, services: ServicesDep) -> None:
    """Text a generate job produced so far, relayed live to its client (a preview: the signed
    result is what is billed). 409 when the attempt's lease is gone: stop generating."""
    services.streams.append(worker, job_id, chunk, services.now())


@router.post("/streams", responses=problems(400, 401, 413, 422))
def stream_jobs(
    req: StreamBatchRequest, worker: WorkerDep, services: ServicesDep
) -> StreamBatchResponse:
    """The text several generate jobs produced since their last part, in one request (as
    ``/jobs/{id}/stream`` each). A part that cannot be taken carries its own error (409: the
    attempt's lease is gone, stop generating that job); the others are relayed."""
    now = services.now()
    return StreamBatchResponse(
        parts=[_stream_part(services, worker, part, now) for part in req.parts]
    )


def _stream_part(
    services: Services, worker: Principal, part: StreamPart, now: float
) -> StreamPartItem:
    try:
        services.streams.append(worker, part.job_id, part, now)
    except GpumarketError as exc:
        return StreamPartItem(job_id=part.job_id, error=item_error(exc))
    return StreamPartItem(job_id=part.job_id)


@router.post("/jobs/{job_id}/complete", responses=problems(400, 401, 403, 404, 409, 413, 422, 503))
def complete_job(
    job_id: str, req: CompleteRequest, worker: WorkerDep, services: ServicesDep
) -> ResultView:
    """Report a signed result. Idempotent for the same attempt and output; 409 if stale."""
    return services.leases.complete(worker, job_id, req, services.now())


@router.post("/results", responses=problems(400, 401, 413, 422, 503))
def complete_batch(
    req: BatchCompleteRequest, worker: WorkerDep, services: ServicesDep
) -> BatchCompleteResponse:
    """Report many signed results at once, under one signature over their result hashes
    (protocol/signing.py). Each job is recorded once, as ``/jobs/{id}/complete`` would; an
    item that cannot be taken (e.g. 409: its attempt is stale) carries its own error."""
    return BatchCompleteResponse(
        results=services.leases.complete_batch(worker, req, services.now())
    )


@router.post("/jobs/{job_id}/fail", responses=problems(400, 401, 403, 404, 409, 413, 422))
def fail_job(
    job_id: str, req: FailRequest, worker: WorkerDep, services: ServicesDep
) -> FailResponse:
    """Give a job up: ``retryable`` sends it to another worker, otherwise it FAILS."""
    state = services.leases.fail(worker, job_id, req, services.now())
    return FailResponse(job_id=job_id, state=state)


@router.post("/drain", status_code=204, responses=problems(401))
def drain(worker: WorkerDep, services: ServicesDep) -> None:
    """Take no new jobs; jobs in hand may still complete."""
    services.workers.drain(worker, services.now())


@router.post("/deregister", responses=problems(401))
def deregister(worker: WorkerDep, services: ServicesDep) -> DeregisterResponse:
    """Leave: the session ends and any jobs still held go back to the queue."""
    return DeregisterResponse(requeued_jobs=services.workers.deregister(worker, services.now()))


@router.get("/vouchers", responses=problems(401, 503))
def vouchers(worker: WorkerDep, services: ServicesDep) -> VoucherList:
    """Your latest cumulative voucher from each payer, ready to redeem on PaymentBroker."""
    deployment = services.payments.deployment
    if deployment is None:
        return VoucherList(vouchers=[])
    signed = services.workers.vouchers(worker, services.now())
    return VoucherList(
        vouchers=[
            SignedVoucherView(
                voucher=v.voucher.model_dump(mode="json"),
                signature=v.signature,
                chain_id=deployment.chain_id,
                payment_broker=deployment.payment_broker,
            )
            for v in signed
        ]
    )
