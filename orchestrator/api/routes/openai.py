"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Thin translations onto the job service (``orchestrator.api.openai_dialect`` holds the shapes):
the client's API key is the bearer token, a request becomes one job, and the answer waits for
it (or streams its tokens as server-sent events while the worker produces them). Errors come in
OpenAI's shape. A streaming client that goes away cancels its job: it is charged nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, NoReturn

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from orchestrator.api.deps import ClientDep, ServicesDep
from orchestrator.api.hangup import HangUp
from orchestrator.api.openai_dialect import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    MaxPrices,
    OpenAIError,
    chunk_body,
    completion_body,
    completions_body,
    embedding_spec,
    embeddings_body,
    from_validation,
    generate_spec,
    generation_extras,
    market_fields,
    parse,
    sse,
    usage_of,
)
from orchestrator.api.routes.jobs import job_state, next_state
from orchestrator.exceptions import GpumarketError
from orchestrator.server import GRACEFUL_SHUTDOWN_S
from orchestrator.services.auth import Principal
from orchestrator.services.wakeups import JOB_KEY_PREFIX, WAKE_FALLBACK_S
from orchestrator.wiring import Services
from protocol import FINAL_STATES, JobSpec, JobState, JobType, JobView, ResultView
from protocol.generation import GenerationInput

log = logging.getLogger("gpumarket.orchestrator.openai")
# Not in /openapi.json: these follow OpenAI's published API (and its error shape), not this
# service's problem documents; the official openai client is their reference.
router = APIRouter(prefix="/v1", tags=["openai"], include_in_schema=False)

RESULT_WAIT_S = 600.0
"""The longest an OpenAI-style request waits for its job (its deadline is as long)."""
STOPPING_WAIT_S = GRACEFUL_SHUTDOWN_S - 2 * WAKE_FALLBACK_S
"""Once the orchestrator is stopping, how long a request waiting on its jobs still waits in
case they finish before it gives them up: inside uvicorn's grace period, with a wake-up's
second to spare."""
STREAM_OPEN_WAIT_S = 10.0
"""How long a streaming request waits for its job's first text before it answers 200 and
starts the stream: a job refused within it (a prompt too long for the worker's model, say)
is answered with its error status instead of an error inside a 200 stream."""

PriceHeader = Annotated[str | None, Header(alias="X-Max-Price-Wei")]
PromptPriceHeader = Annotated[str | None, Header(alias="X-Max-Prompt-Price-Wei")]
PreferenceHeader = Annotated[str | None, Header(alias="X-Preference")]


def _error(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise OpenAIError(400, "invalid_encoding", "the request body is not UTF-8") from None
    except ValueError as exc:
        raise OpenAIError(400, "invalid_json", f"the request body is not JSON: {exc}") from None


def _price(
    services: Services,
    model: str,
    job_type: JobType,
    asked: MaxPrices,
    generation: GenerationInput | None = None,
) -> MaxPrices:
    """The max prices to submit with (wei per token, and per prompt token apart or None): the
    client's own, else those of the live offer that bills this request least."""
    offered = services.catalog.offered(services.now()).get(model)
    if offered is None or offered.job_type is not job_type:
        raise OpenAIError(
            404,
            "model_not_found",
            f"no live worker offers {job_type.value} model {model!r}; GET /v1/models lists "
            "the models on offer now",
            "model",
        )
    tokens = (0, 0)
    if generation is not None:
        tokens = (generation.prompt_token_bound(), generation.max_tokens)
    price, prompt = offered.cheapest_for(*tokens)
    if job_type is not JobType.GENERATE:
        if asked.price is None:
            return MaxPrices(offered.min_price_wei_per_unit)
        if asked.price < offered.min_price_wei_per_unit:
            raise OpenAIError(
                503,
                "no_worker_under_max_price",
                f"the cheapest live worker for {model!r} asks {offered.min_price_wei_per_unit} "
                f"wei per unit, above your max price {asked.price}; raise max_price_wei_per_token",
            )
        return asked
    if asked.price is None and asked.prompt_price is None:
        return MaxPrices(price, prompt if prompt != price else None)
    # A max price of the client's caps both prices unless the prompt's is capped apart.
    cap = asked.price or price
    prompt_cap = asked.prompt_price or asked.price or prompt
    if not any(p <= cap and pp <= prompt_cap for p, pp in offered.prices):
        raise OpenAIError(
            503,
            "no_worker_under_max_price",
            f"the cheapest live worker for {model!r} asks {price} wei per completion token and "
            f"{prompt} per prompt token, above your max prices ({cap} per token, {prompt_cap} "
            "per prompt token); raise max_price_wei_per_token (or max_prompt_price_wei_per_token)",
        )
    return MaxPrices(cap, None if prompt_cap == cap else prompt_cap)


def _submit(services: Services, client: Principal, spec: JobSpec) -> JobView:
    try:
        job, _ = services.jobs.submit(client, spec, services.now())
    except GpumarketError as exc:
        status = 400 if exc.status == 422 else exc.status
        raise OpenAIError(status, exc.code, exc.detail) from None
    try:
        services.leases.dispatch(services.now())
    except Exception:
        log.exception("dispatch after a submit failed; the next round places the job")
    return job


def _result(services: Services, client: Principal, view: JobView) -> ResultView:
    """The job's result, or the OpenAI error that says why it has none."""
    if view.state is JobState.SUCCEEDED:
        return services.jobs.result(client, view.id)
    reason = view.failure_reason or str(view.state)
    if view.state is JobState.FAILED and view.fault == "input":
        raise OpenAIError(400, "invalid_input", f"job {view.id} failed on its input: {reason}")
    if view.state is JobState.EXPIRED or view.state not in FINAL_STATES:
        raise OpenAIError(504, "timeout", f"job {view.id} did not finish in time ({reason})")
    if view.state is JobState.CANCELLED:
        raise OpenAIError(409, "cancelled", f"job {view.id} was cancelled")
    raise OpenAIError(502, "worker_failed", f"job {view.id} failed: {reason}")


HUNG_UP = "its client hung up"
STOPPED = "the orchestrator stopped"


class _GiveUp:
    """When a request waiting on its jobs should give them up: its client hung up (no one
    will read the answer, and OpenAI clients send the request again after a timeout or a
    dropped connection), or the orchestrator is stopping and ``STOPPING_WAIT_S`` passed (the
    grace period would cut the request anyway). Either way the jobs still running are
    cancelled and charged nothing; one that finished first is paid as any finished job.
    ``line``: the request's connection, where it is watched (a stream watches its own)."""

    def __init__(self, services: Services, line: HangUp | None) -> None:
        self._hub = services.hub
        self._line = line
        self._stop_at: float | None = None

    def why(self) -> str | None:
        """``HUNG_UP``, ``STOPPED``, or None to wait on."""
        if self._line is not None and self._line.gone:
            return HUNG_UP
        if not self._hub.closing:
            return None
        now = time.monotonic()
        if self._stop_at is None:
            self._stop_at = now + STOPPING_WAIT_S
        return STOPPED if now >= self._stop_at else None


async def _give_up(services: Services, client: Principal, job_ids: list[str], why: str) -> NoReturn:
    """Cancel the jobs still running (``why``: ``_GiveUp.why``) and raise the answer."""
    kept = [
        job_id
        for job_id in job_ids
        if not await run_in_threadpool(_cancel_quietly, services, client, job_id, why)
    ]
    if why == HUNG_UP:
        raise OpenAIError(499, "client_closed_request", "the client closed the connection")
    raise _stopped(kept)


async def _wait(services: Services, client: Principal, job_id: str, request: Request) -> JobView:
    """The job once final (or ``RESULT_WAIT_S`` passed), unless given up (``_GiveUp``)."""
    key = f"{JOB_KEY_PREFIX}{job_id}"
    deadline = time.monotonic() + RESULT_WAIT_S
    view = await run_in_threadpool(services.jobs.get, client, job_id)
    async with HangUp.waking(request, services.hub, key) as line:
        give_up = _GiveUp(services, line)
        while view.state not in FINAL_STATES and (remaining := deadline - time.monotonic()) > 0:
            if (why := give_up.why()) is not None:
                await _give_up(services, client, [job_id], why)
            await services.hub.watch(key, remaining)
            view = await run_in_threadpool(services.jobs.get, client, job_id)
    return view


async def _before_first_text(
    services: Services, client: Principal, job_id: str, request: Request
) -> JobState:
    """The job's state once its first text has come, it has ended, or ``STREAM_OPEN_WAIT_S``
    passed, unless given up (``_GiveUp``)."""
    deadline = time.monotonic() + STREAM_OPEN_WAIT_S
    state = await job_state(services, client, job_id)
    key = f"{JOB_KEY_PREFIX}{job_id}"
    async with HangUp.waking(request, services.hub, key) as line:
        give_up = _GiveUp(services, line)
        while True:
            streamed = services.streams.read(job_id, None, 0)
            remaining = deadline - time.monotonic()
            if state in FINAL_STATES or (streamed and streamed.chunks) or remaining <= 0:
                return state
            if (why := give_up.why()) is not None:
                await _give_up(services, client, [job_id], why)
            state = await next_state(services, client, job_id, state, remaining)


def _cancel_quietly(
    services: Services, client: Principal, job_id: str, why: str = "its stream's client left"
) -> bool:
    """Cancel the job; False if it could not be (final already, or its result is being
    verified: it is paid as any finished job)."""
    try:
        services.jobs.cancel(client, job_id, services.now(), reason=f"cancelled: {why}")
    except GpumarketError:
        return False
    log.info("job %s: %s; cancelled", job_id, why)
    return True


def _stopped(kept: list[str]) -> OpenAIError:
    """The answer of a request given up because the orchestrator is stopping; ``kept``: its
    jobs that could not be cancelled (done, their results being verified)."""
    if not kept:
        message = (
            "the orchestrator is stopping: the request's jobs were cancelled and nothing is "
            "charged for them; send the request again"
        )
    else:
        message = (
            f"the orchestrator is stopping; job(s) {', '.join(kept)} finished first and are "
            "charged once their results are verified: read them with GET /v1/jobs/{id}/result"
        )
    return OpenAIError(503, "server_stopping", message)


async def _relay(
    services: Services,
    client: Principal,
    request: Request,
    job_id: str,
    model: str,
    *,
    chat: bool,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """SSE chunks: the worker's tokens as they arrive, then the finish, usage and [DONE]."""
    finished = False
    sent = 0
    give_up = _GiveUp(services, None)  # a client leaving is seen by is_disconnected
    try:
        if chat:
            yield sse(chunk_body(job_id, model, chat=True, role=True, text=""))
        deadline = time.monotonic() + RESULT_WAIT_S
        state = await job_state(services, client, job_id)
        while True:
            streamed = services.streams.read(job_id, None, 0)
            text = "".join(streamed.chunks) if streamed else ""
            if len(text) > sent:
                yield sse(chunk_body(job_id, model, chat=chat, text=text[sent:]))
                sent = len(text)
            if state in FINAL_STATES or time.monotonic() > deadline:
                break
            if await request.is_disconnected():
                return
            if give_up.why() == STOPPED:  # the grace period would cut the stream: end it first
                finished = True
                cancelled = await run_in_threadpool(
                    _cancel_quietly, services, client, job_id, STOPPED
                )
                yield sse(_stopped([] if cancelled else [job_id]).body())
                yield sse("[DONE]")
                return
            state = await next_state(services, client, job_id, state, RESULT_WAIT_S)
        finished = True
        try:
            view = await run_in_threadpool(services.jobs.get, client, job_id)
            result = await run_in_threadpool(_result, services, client, view)
        except OpenAIError as exc:
            yield sse(exc.body())
            yield sse("[DONE]")
            return
        output = result.output or {}
        final = str(output.get("text", ""))
        # The signed result is what the client pays for: what the stream missed comes now.
        rest = final[sent:] if final.startswith(text[:sent]) else final[min(sent, len(final)) :]
        if rest:
            yield sse(chunk_body(job_id, model, chat=chat, text=rest))
        finish = str(output.get("finish_reason", "stop"))
        yield sse(
            chunk_body(
                job_id,
                model,
                chat=chat,
                text=None if chat else "",
                finish=finish,
                extras=generation_extras(result),
            )
        )
        if include_usage:
            yield sse(chunk_body(job_id, model, chat=chat, usage=usage_of(result), no_choices=True))
        yield sse("[DONE]")
    finally:
        if not finished:
            _cancel_quietly(services, client, job_id)


async def _generate(
    request: Request,
    client: Principal,
    services: Services,
    price_header: str | None,
    preference_header: str | None,
    *,
    chat: bool,
    prompt_price_header: str | None = None,
) -> Any:
    try:
        body = await _json(request)
        req: ChatCompletionRequest | CompletionRequest
        if chat:
            req = parse(ChatCompletionRequest, body)
            prompt: dict[str, Any] = {"messages": req.chat()}
        else:
            req = parse(CompletionRequest, body)
            prompts = req.texts()
            if len(prompts) > 1:
                return await _complete_many(
                    services,
                    client,
                    request,
                    req,
                    prompts,
                    price_header,
                    preference_header,
                    prompt_price_header,
                )
            prompt = {"prompt": prompts[0]}
        try:
            generation = req.generation(**prompt)
        except ValueError as exc:
            raise _invalid(exc) from None
        asked, preference = market_fields(req, price_header, preference_header, prompt_price_header)
        prices = await run_in_threadpool(
            _price, services, req.model, JobType.GENERATE, asked, generation
        )
        spec = _spec(req, generation, prices, preference)
        job = await run_in_threadpool(_submit, services, client, spec)
        if req.stream:
            early = await _before_first_text(services, client, job.id, request)
            if early in FINAL_STATES and early is not JobState.SUCCEEDED:
                view = await run_in_threadpool(services.jobs.get, client, job.id)
                await run_in_threadpool(_result, services, client, view)  # raises its error
            relay = _relay(
                services,
                client,
                request,
                job.id,
                req.model,
                chat=chat,
                include_usage=req.include_usage,
            )
            headers = {"X-Gpumarket-Job-Id": job.id, "Cache-Control": "no-cache"}
            return StreamingResponse(relay, media_type="text/event-stream", headers=headers)
        view = await _wait(services, client, job.id, request)
        result = await run_in_threadpool(_result, services, client, view)
    except OpenAIError as exc:
        return _error(exc)
    return JSONResponse(
        completion_body(result, req.model, chat=chat), headers={"X-Gpumarket-Job-Id": job.id}
    )


async def _complete_many(
    services: Services,
    client: Principal,
    request: Request,
    req: CompletionRequest,
    prompts: list[str],
    price_header: str | None,
    preference_header: str | None,
    prompt_price_header: str | None,
) -> Any:
    """Several prompts in one /v1/completions request: one generate job each, submitted as one
    batch (one transaction, one dispatch round) and awaited together; the answer has a choice
    per prompt, in order. All or nothing: a prompt refused at submit cancels the others."""
    asked, preference = market_fields(req, price_header, preference_header, prompt_price_header)
    specs = []
    for index, text in enumerate(prompts):
        try:
            generation = req.generation(prompt=text)
        except ValueError as exc:
            error = _invalid(exc)
            raise OpenAIError(
                error.status, error.code, f"prompt[{index}]: {error.message}"
            ) from None
        prices = await run_in_threadpool(
            _price, services, req.model, JobType.GENERATE, asked, generation
        )
        specs.append(_spec(req, generation, prices, preference))
    job_ids = await run_in_threadpool(_submit_many, services, client, specs)
    views = await _wait_all(services, client, job_ids, request)
    results = [await run_in_threadpool(_result, services, client, view) for view in views]
    return JSONResponse(completions_body(results, req.model))


def _submit_many(services: Services, client: Principal, specs: list[JobSpec]) -> list[str]:
    """The jobs' ids, submitted as one batch; the first refused prompt's error otherwise, with
    the jobs made for the others cancelled."""
    items = services.jobs.batch.submit(client, specs, services.now())
    made = [item.job.id for item in items if item.job is not None]
    refused = [(i, item.error) for i, item in enumerate(items) if item.error is not None]
    if refused:
        for job_id in made:
            _cancel_quietly(services, client, job_id)
        index, error = refused[0]
        status = 400 if error.status == 422 else error.status
        raise OpenAIError(status, error.code, f"prompt[{index}]: {error.detail}")
    try:
        services.leases.dispatch(services.now())
    except Exception:
        log.exception("dispatch after a submit failed; the next round places the jobs")
    return made


async def _wait_all(
    services: Services, client: Principal, job_ids: list[str], request: Request
) -> list[JobView]:
    """The jobs once all are final (or ``RESULT_WAIT_S`` passed), woken as each changes; a
    request given up meanwhile (``_GiveUp``) cancels those still running."""
    batch = services.jobs.batch
    deadline = time.monotonic() + RESULT_WAIT_S
    keys = [f"{JOB_KEY_PREFIX}{job_id}" for job_id in job_ids]
    states = await run_in_threadpool(batch.states, client, job_ids)
    async with HangUp.waking(request, services.hub, keys[0]) as line:
        give_up = _GiveUp(services, line)
        while any(s.state not in FINAL_STATES for s in states):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if (why := give_up.why()) is not None:
                running = [s.id for s in states if s.state not in FINAL_STATES]
                await _give_up(services, client, running, why)
            await services.hub.watch_any(keys, remaining)
            states = await run_in_threadpool(batch.states, client, job_ids)
    return await run_in_threadpool(batch.get, client, job_ids)


def _spec(
    req: ChatCompletionRequest | CompletionRequest,
    generation: GenerationInput,
    prices: MaxPrices,
    preference: Any,
) -> JobSpec:
    try:
        return generate_spec(req, generation, prices, preference)
    except ValueError as exc:
        raise _invalid(exc) from None


def _invalid(exc: ValueError) -> OpenAIError:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return from_validation(exc)
    return OpenAIError(400, "invalid_request", str(exc))


@router.post("/chat/completions")
async def chat_completions(
    request: Request,
    client: ClientDep,
    services: ServicesDep,
    max_price: PriceHeader = None,
    preference: PreferenceHeader = None,
    max_prompt_price: PromptPriceHeader = None,
) -> Any:
    """OpenAI chat completions (``stream`` for server-sent events). Extras: body fields
    ``max_price_wei_per_token`` (caps completion tokens, and prompt tokens unless
    ``max_prompt_price_wei_per_token`` does) and ``preference``, or headers
    ``X-Max-Price-Wei``, ``X-Max-Prompt-Price-Wei`` and ``X-Preference``; the answer's
    ``gpumarket`` object has the job id, cost (and its prompt and completion parts), energy,
    worker."""
    return await _generate(
        request,
        client,
        services,
        max_price,
        preference,
        chat=True,
        prompt_price_header=max_prompt_price,
    )


@router.post("/completions")
async def completions(
    request: Request,
    client: ClientDep,
    services: ServicesDep,
    max_price: PriceHeader = None,
    preference: PreferenceHeader = None,
    max_prompt_price: PromptPriceHeader = None,
) -> Any:
    """OpenAI (legacy) text completions from a raw prompt; as chat completions otherwise."""
    return await _generate(
        request,
        client,
        services,
        max_price,
        preference,
        chat=False,
        prompt_price_header=max_prompt_price,
    )


@router.post("/embeddings")
async def embeddings(
    request: Request,
    client: ClientDep,
    services: ServicesDep,
    max_price: PriceHeader = None,
    preference: PreferenceHeader = None,
) -> Any:
    """OpenAI embeddings, served by the market's embedding workers (string or list input)."""
    try:
        req = parse(EmbeddingRequest, await _json(request))
        texts = req.texts()
        if any(not t.strip() for t in texts):
            raise OpenAIError(400, "invalid_input", "input texts must not be empty", "input")
        asked, pref = market_fields(req, max_price, preference)
        prices = await run_in_threadpool(_price, services, req.model, JobType.INFERENCE, asked)
        try:
            spec = embedding_spec(req, prices.price or 0, pref)
        except ValueError as exc:
            raise _invalid(exc) from None
        job = await run_in_threadpool(_submit, services, client, spec)
        view = await _wait(services, client, job.id, request)
        result = await run_in_threadpool(_result, services, client, view)
    except OpenAIError as exc:
        return _error(exc)
    return JSONResponse(embeddings_body(result, req.model, req.encoding_format))


@router.get("/models")
async def list_models(client: ClientDep, services: ServicesDep) -> Any:
    """The models live workers offer now, each with its cheapest price and context length."""
    offered = await run_in_threadpool(services.catalog.offered, services.now())
    data = [
        {
            "id": m.model,
            "object": "model",
            "created": 0,
            "owned_by": "gpumarket",
            "gpumarket": {
                "job_type": m.job_type.value,
                "min_price_wei_per_unit": str(m.min_price_wei_per_unit),
                "min_prompt_price_wei_per_unit": None
                if m.min_prompt_price_wei_per_unit is None
                else str(m.min_prompt_price_wei_per_unit),
                "workers": m.workers,
                "context_tokens": m.context_tokens,
                "units_per_s": m.units_per_s,
            },
        }
        for m in sorted(offered.values(), key=lambda m: m.model)
    ]
    return {"object": "list", "data": data}
