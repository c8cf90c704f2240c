"""Client job routes."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from orchestrator.api.deps import ClientDep, ServicesDep
from orchestrator.api.openapi import problems
from orchestrator.api.strict_json import StrictJSONRoute
from orchestrator.services.auth import Principal
from orchestrator.wiring import Services
from protocol import FINAL_STATES, JobSpec, JobState, JobView, ResultView
from protocol.jobs import JobList

MAX_JOB_WAIT_S = 60.0
log = logging.getLogger("gpumarket.orchestrator.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=StrictJSONRoute)


@router.post(
    "",
    status_code=201,
    responses={
        200: {"model": JobView, "description": "Same idempotency key: the existing job"},
        **problems(400, 401, 402, 409, 413, 422, 503),
    },
)
def submit_job(
    spec: JobSpec,
    client: ClientDep,
    services: ServicesDep,
    response: Response,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=128)
    ] = None,
) -> JobView:
    """Submit a job. Prices are wei per unit (input item for inference, output pixel for
    transcode); the job never costs more than ``max_price_wei_per_unit`` per unit. A job no
    available worker can take comes back ``queued`` with its ``waiting_reason``."""
    job, created = services.jobs.submit(client, spec, services.now(), idempotency_key)
    if not created:
        response.status_code = 200
        return job
    # The job is committed: whatever dispatch meets, the client gets its id (a failed round
    # leaves the job queued for the next one).
    try:
        assigned = services.leases.dispatch(services.now())
        if all(job_id != job.id for job_id, _ in assigned):
            # Not placed: read it back, so the answer carries why it waits.
            services.leases.explain_unplaced(job.id, services.now())
            job = services.jobs.get(client, job.id)
    except Exception:
        log.exception("dispatch after a submit failed; the next round places the job")
    return job


@router.get("", responses=problems(401, 422))
def list_jobs(
    client: ClientDep,
    services: ServicesDep,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=256)] = None,
) -> JobList:
    """Your jobs, newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    return services.jobs.list(client, state=state, limit=limit, cursor=cursor)


@router.get("/{job_id}", responses=problems(401, 404, 422))
async def get_job(
    job_id: str,
    client: ClientDep,
    services: ServicesDep,
    wait_s: Annotated[float, Query(ge=0, le=MAX_JOB_WAIT_S)] = 0.0,
    while_state: JobState | None = None,
) -> JobView:
    """The job. With ``wait_s``, a long-poll: the answer waits (up to ``wait_s`` seconds, and at
    most the server's long-poll limit) until the job leaves ``while_state``, or, without
    ``while_state``, until it is final; so a client waits for a result without polling."""
    view = await run_in_threadpool(services.jobs.get, client, job_id)
    deadline = time.monotonic() + min(wait_s, services.settings.long_poll_max_s)
    key = f"job:{view.id}"

    def waiting(state: JobState) -> bool:
        return state is while_state if while_state is not None else state not in FINAL_STATES

    while waiting(view.state) and (remaining := deadline - time.monotonic()) > 0:
        await services.hub.watch(key, remaining)
        view = await run_in_threadpool(services.jobs.get, client, job_id)
    return view


@router.get(
    "/{job_id}/stream",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "server-sent events"},
        **problems(401, 404, 422),
    },
)
async def stream_job(job_id: str, client: ClientDep, services: ServicesDep) -> StreamingResponse:
    """A generate job's text as server-sent events while its worker produces it: one
    ``{"text": ...}`` event per piece, then ``{"done": true, "job": {...}}`` once the job is
    final (its result, ``GET .../result``, is what is billed). Leaving early cancels nothing."""
    view = await run_in_threadpool(services.jobs.get, client, job_id)
    return StreamingResponse(_stream_events(services, client, view), media_type="text/event-stream")


async def _stream_events(
    services: Services, client: Principal, view: JobView
) -> AsyncIterator[bytes]:
    sent = 0
    deadline = time.monotonic() + services.settings.long_poll_max_s * 20
    while True:
        streamed = services.streams.read(view.id, None, 0)
        text = "".join(streamed.chunks) if streamed else ""
        if len(text) > sent:
            yield _event({"text": text[sent:]})
            sent = len(text)
        if view.state in FINAL_STATES or time.monotonic() > deadline:
            break
        await services.streams.wait(view.id, 1.0)
        if services.streams.read(view.id, None, 0) == streamed:  # no new text: read the job
            view = await run_in_threadpool(services.jobs.get, client, view.id)
    if view.state is JobState.SUCCEEDED:  # what the stream missed (a retried attempt, say)
        result = await run_in_threadpool(services.jobs.result, client, view.id)
        final = str((result.output or {}).get("text", ""))
        if len(final) > sent:
            yield _event({"text": final[sent:]})
    yield _event({"done": True, "job": view.model_dump(mode="json")})


def _event(data: dict[str, object]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@router.get("/{job_id}/result", responses=problems(401, 404, 409, 422))
def get_result(job_id: str, client: ClientDep, services: ServicesDep) -> ResultView:
    """The signed result of a succeeded job; 409 while it is not finished."""
    return services.jobs.result(client, job_id)


@router.post("/{job_id}/cancel", responses=problems(401, 404, 409, 422))
def cancel_job(job_id: str, client: ClientDep, services: ServicesDep) -> JobView:
    """Cancel a job that has not finished; a running worker is told at its next heartbeat."""
    return services.jobs.cancel(client, job_id, services.now())
