"""Client job routes."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from orchestrator.api.deps import ClientDep, ServicesDep
from orchestrator.api.hangup import HangUp
from orchestrator.api.openapi import problems
from orchestrator.api.strict_json import StrictJSONRoute
from orchestrator.services.auth import Principal
from orchestrator.services.streams import stream_key
from orchestrator.services.wakeups import JOB_KEY_PREFIX
from orchestrator.wiring import Services
from protocol import FINAL_STATES, JobSpec, JobState, JobView, ResultView
from protocol.batches import (
    JobBatchRequest,
    JobBatchResponse,
    JobStateItem,
    JobWaitRequest,
    JobWaitResponse,
)
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


@router.post(
    "/batch",
    responses={200: {"model": JobBatchResponse}, **problems(400, 401, 413, 422, 429, 503)},
)
def submit_batch(
    req: JobBatchRequest, client: ClientDep, services: ServicesDep
) -> JobBatchResponse:
    """Submit many jobs in one request and one transaction (at most ``MAX_SUBMIT_BATCH``).
    Each job carries its own ``idempotency_key``; the answer lists, in order, each job (with
    ``created``) or its own error, so one bad job refuses only itself."""
    items = services.jobs.batch.submit(client, req.jobs, services.now())
    created = [item.job.id for item in items if item.created and item.job is not None]
    if not created:
        return JobBatchResponse(jobs=items)
    try:  # once for the batch; as for one submit, a failed round leaves the jobs queued
        placed = {job_id for job_id, _ in services.leases.dispatch(services.now())}
        unplaced = [job_id for job_id in created if job_id not in placed]
        if unplaced:
            models = {item.job.model for item in items if item.job is not None}
            services.leases.explain_unplaced_many(unplaced, models, services.now())
            # Still queued: the answer carries why each waits (a narrow read, not each whole).
            reasons = services.jobs.batch.waiting_reasons(unplaced)
            for item in items:
                if item.created and item.job is not None and item.job.id in reasons:
                    item.job.waiting_reason = reasons[item.job.id]
    except Exception:
        log.exception("dispatch after a batch submit failed; the next round places the jobs")
    return JobBatchResponse(jobs=items)


@router.post("/wait", responses=problems(400, 401, 404, 413, 422))
async def wait_jobs(
    req: JobWaitRequest, client: ClientDep, services: ServicesDep, request: Request
) -> JobWaitResponse:
    """Many jobs at once, and a long-poll over them: the answer waits (up to ``wait_s``, at
    most the server's long-poll limit) until ``any`` of them is final, or ``all`` are. It
    lists every job's state, and each final job whole: its signed result if it succeeded,
    else its view."""
    batch = services.jobs.batch
    states = await run_in_threadpool(batch.states, client, req.job_ids)
    deadline = time.monotonic() + min(req.wait_s, services.settings.long_poll_max_s)

    def waiting(states: list[JobStateItem]) -> bool:
        final = [item.state in FINAL_STATES for item in states]
        return not any(final) if req.return_when == "any" else not all(final)

    keys = [f"{JOB_KEY_PREFIX}{job_id}" for job_id in dict.fromkeys(req.job_ids)]
    long_poll = waiting(states) and req.wait_s > 0
    async with _client_line(request, services, keys[0], long_poll) as line:
        while waiting(states) and (remaining := deadline - time.monotonic()) > 0:
            if services.hub.closing or line.gone:  # stopping (answer the states so far),
                break  # or no one is left to answer
            states = await _next_states(services, client, req.job_ids, keys, states, remaining)
        if line.gone:  # no one reads this answer: its results are not read either
            return JobWaitResponse(states=states, jobs=[], results=[])
    final = {item.id: item.state for item in states if item.state in FINAL_STATES}
    succeeded = [i for i, state in final.items() if state is JobState.SUCCEEDED]
    results: list[ResultView] = []
    if req.results and succeeded:
        results = await run_in_threadpool(batch.results, client, succeeded)
    whole = [i for i in final if i not in {r.job_id for r in results}]
    jobs = await run_in_threadpool(batch.get, client, whole) if whole else []
    return JobWaitResponse(states=states, jobs=jobs, results=results)


def _client_line(
    request: Request, services: Services, key: str, waits: bool
) -> contextlib.AbstractAsyncContextManager[HangUp]:
    """The client's connection, watched while its long-poll waits (``waits``; else never
    ``gone``): a client that hangs up (a timeout, a retry, a closed program) ends the poll,
    which would otherwise read the store every second for no one until ``wait_s`` (``key``:
    the wait to wake then)."""
    line = HangUp.waking(request, services.hub, key)
    return line if waits else contextlib.nullcontext(line)


async def _next_states(
    services: Services,
    client: Principal,
    job_ids: list[str],
    keys: list[str],
    states: list[JobStateItem],
    remaining: float,
) -> list[JobStateItem]:
    """The jobs' states after the next wake-up (or a quiet second)."""
    batch = services.jobs.batch
    fired = await services.hub.watch_any(keys, remaining)
    # Woken by this replica's commits: they say each job's new state, nothing to read.
    # Only what they cannot say is read: the jobs another replica changed (no state),
    # or, after a quiet second, every job.
    told = {k.removeprefix(JOB_KEY_PREFIX): st for k, st in fired.items() if st is not None}
    unknown = [k.removeprefix(JOB_KEY_PREFIX) for k, st in fired.items() if st is None]
    if unknown or not fired:
        fresh = await run_in_threadpool(batch.states, client, unknown or job_ids)
        told.update({item.id: item.state.value for item in fresh})
    return [_newer(item, told.get(item.id)) for item in states]


def _newer(item: JobStateItem, told: str | None) -> JobStateItem:
    """The job's state after a wake-up. A final state is never replaced: two commits' wake-ups
    may reach the event loop out of order, and a final job does not change again."""
    if told is None or item.state in FINAL_STATES or told == item.state:
        return item
    return JobStateItem(id=item.id, state=JobState(told))


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
    request: Request,
    wait_s: Annotated[float, Query(ge=0, le=MAX_JOB_WAIT_S)] = 0.0,
    while_state: JobState | None = None,
) -> JobView:
    """The job. With ``wait_s``, a long-poll: the answer waits (up to ``wait_s`` seconds, and at
    most the server's long-poll limit) until the job leaves ``while_state``, or, without
    ``while_state``, until it is final; so a client waits for a result without polling."""
    view = await run_in_threadpool(services.jobs.get, client, job_id)
    deadline = time.monotonic() + min(wait_s, services.settings.long_poll_max_s)
    key = f"{JOB_KEY_PREFIX}{view.id}"

    def waiting(state: JobState) -> bool:
        return state is while_state if while_state is not None else state not in FINAL_STATES

    async with _client_line(request, services, key, waiting(view.state) and wait_s > 0) as line:
        while waiting(view.state) and (remaining := deadline - time.monotonic()) > 0:
            if services.hub.closing or line.gone:  # stopping: answer the job as it is;
                break  # or no one is left to answer
            await services.hub.watch(key, remaining)
            if line.gone:
                break
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
    state = view.state
    while True:
        streamed = services.streams.read(view.id, None, 0)
        text = "".join(streamed.chunks) if streamed else ""
        if len(text) > sent:
            yield _event({"text": text[sent:]})
            sent = len(text)
        if state in FINAL_STATES or time.monotonic() > deadline:
            break
        state = await next_state(services, client, view.id, state, deadline - time.monotonic())
    if state is not view.state:
        view = await run_in_threadpool(services.jobs.get, client, view.id)
    if view.state is JobState.SUCCEEDED:  # what the stream missed (a retried attempt, say)
        result = await run_in_threadpool(services.jobs.result, client, view.id)
        final = str((result.output or {}).get("text", ""))
        if len(final) > sent:
            yield _event({"text": final[sent:]})
    yield _event({"done": True, "job": view.model_dump(mode="json")})


async def job_state(services: Services, client: Principal, job_id: str) -> JobState:
    """The job's state (one narrow read)."""
    [item] = await run_in_threadpool(services.jobs.batch.states, client, [job_id])
    return item.state


async def next_state(
    services: Services, client: Principal, job_id: str, state: JobState, timeout_s: float
) -> JobState:
    """Wait (up to ``timeout_s``) for a job not yet final to get new text or change state; its
    state then. This replica's commits say the new state, and new text changes none: the store
    is read only for another replica's change, or after a quiet while (``WAKE_FALLBACK_S``)."""
    job_key, text_key = f"{JOB_KEY_PREFIX}{job_id}", stream_key(job_id)
    fired = await services.hub.watch_any([job_key, text_key], timeout_s)
    told = fired.get(job_key)
    if told is not None:
        return JobState(told)
    if job_key not in fired and text_key in fired:
        return state  # new text only
    return await job_state(services, client, job_id)


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
