"""Generate jobs over the real app in-process: per-token billing from the result's usage, the
worker's token stream relayed to the client (SSE), and the OpenAI dialect's shapes and errors.
The worker here is the test speaking HTTP; tests/integration/test_openai_api.py runs the real
worker process with the real model."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest

from orchestrator.api.routes import openai as openai_routes
from orchestrator.config import Settings
from orchestrator.store import Store
from orchestrator.wiring import Services, build_services
from protocol.signing import output_sha256, recover_result_signer
from protocol.units import cost_wei
from tests.api.conftest import (
    Api,
    RunApi,
    assert_problem,
    bearer,
    call_until_hang_up,
    inference_spec,
    serve_with_app,
)
from tests.api.test_batches_api import batch_item, signed
from tests.api.test_metrics_api import scrape, value
from tests.conftest import FakeClock
from tests.support import completion, offer

LLM = "SmolLM2-135M-Instruct"
PRICE = 7  # wei per token


def _spec(**generation: Any) -> dict[str, Any]:
    return {
        "type": "generate",
        "model": LLM,
        "generation": {"prompt": "Hello", "max_tokens": 5, **generation},
        "max_price_wei_per_unit": str(PRICE),
    }


def _output(tokens: list[int], text: str = "hi there", prompt_tokens: int = 3) -> dict[str, Any]:
    return {
        "text": text,
        "token_ids": tokens,
        "finish_reason": "length",
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens)},
    }


async def _market(api: Api) -> tuple[dict[str, str], Any]:
    client = await api.new_client()
    worker = await api.register_worker(
        offers=[offer(LLM, price=PRICE, job_type="generate", context_tokens=8192)],
        max_concurrency=4,
    )
    return client, worker


def test_a_generate_job_bills_its_tokens_exactly(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, worker = await _market(api)
        resp = await api.http.post("/v1/jobs", json=_spec(), headers=client)
        assert resp.status_code == 201, resp.text
        job = resp.json()
        # The bound before it runs: prompt bytes + template overhead + max_tokens.
        assert job["max_units"] == len(b"Hello") + 64 + 5
        [leased] = await api.lease(worker)
        assert leased["input"]["prompt"] == "Hello"
        too_many = await api.complete(worker, job["id"], 1, _output([1] * 6), units=9)
        assert too_many.status_code == 422 and "max_tokens" in too_many.text
        miscounted = await api.complete(worker, job["id"], 1, _output([1, 2]), units=4)
        assert miscounted.status_code == 422 and "report and sign units=5" in miscounted.text

    run_api(body)


def test_billing_a_generate_job_per_token(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, worker = await _market(api)
        job = (await api.http.post("/v1/jobs", json=_spec(), headers=client)).json()
        await api.lease(worker)
        done = await api.complete(worker, job["id"], 1, _output([5, 6, 7, 8]), units=7)
        assert done.status_code == 200, done.text
        assert done.json()["cost_wei"] == str(7 * PRICE)

    run_api(body)


def test_the_workers_stream_reaches_the_client_once_in_order(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, worker = await _market(api)
        stranger = await api.register_worker(offers=[offer(LLM, price=PRICE, job_type="generate")])
        job = (await api.http.post("/v1/jobs", json=_spec(), headers=client)).json()
        await api.lease(worker)
        url = f"/v1/workers/jobs/{job['id']}/stream"
        for seq, text in ((0, "hi"), (0, "hi"), (1, " there")):  # a resent chunk counts once
            sent = await api.http.post(
                url,
                json={"attempt": 1, "seq": seq, "text": text, "tokens": 1},
                headers=worker.headers,
            )
            assert sent.status_code == 204, sent.text
        stale = await api.http.post(
            url, json={"attempt": 2, "seq": 0, "text": "x", "tokens": 1}, headers=worker.headers
        )
        assert stale.status_code == 409
        foreign = await api.http.post(
            url, json={"attempt": 1, "seq": 2, "text": "x", "tokens": 1}, headers=stranger.headers
        )
        assert foreign.status_code == 403
        done = await api.complete(worker, job["id"], 1, _output([5, 6]), units=5)
        assert done.status_code == 200, done.text
        events = []
        async with api.http.stream("GET", f"/v1/jobs/{job['id']}/stream", headers=client) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        assert [e["text"] for e in events if "text" in e] == ["hi there"]
        assert events[-1]["done"] and events[-1]["job"]["state"] == "succeeded"
        samples = await scrape(api)  # the first text was timed, the tokens counted
        assert value(samples, "gpumarket_generated_tokens_total") == 5
        assert value(samples, "gpumarket_time_to_first_token_seconds_count", type="generate") == 1

    run_api(body)


def test_a_workers_jobs_stream_in_one_request_each_part_answered_alone(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, worker = await _market(api)
        mine = [(await api.http.post("/v1/jobs", json=_spec(), headers=client)).json()]
        mine.append((await api.http.post("/v1/jobs", json=_spec(), headers=client)).json())
        assert len(await api.lease(worker, max_jobs=2)) == 2
        stranger = await api.register_worker(offers=[offer(LLM, price=PRICE, job_type="generate")])
        theirs = (await api.http.post("/v1/jobs", json=_spec(), headers=client)).json()
        assert len(await api.lease(stranger)) == 1

        def part(job: dict[str, Any], seq: int, text: str, attempt: int = 1) -> dict[str, Any]:
            return {"job_id": job["id"], "attempt": attempt, "seq": seq, "text": text, "tokens": 1}

        sent = await api.http.post(
            "/v1/workers/streams",
            json={"parts": [part(mine[0], 0, "one"), part(theirs, 0, "x"), part(mine[1], 0, "2")]},
            headers=worker.headers,
        )
        assert sent.status_code == 200, sent.text
        answers = sent.json()["parts"]
        assert [a["job_id"] for a in answers] == [mine[0]["id"], theirs["id"], mine[1]["id"]]
        assert answers[0]["error"] is None and answers[2]["error"] is None
        assert answers[1]["error"]["status"] == 403  # not this worker's job: refused alone
        again = await api.http.post(
            "/v1/workers/streams",
            json={"parts": [part(mine[0], 0, "one"), part(mine[1], 1, " two", attempt=2)]},
            headers=worker.headers,
        )
        [resent, stale] = again.json()["parts"]
        assert resent["error"] is None  # a resent part counts once
        assert stale["error"]["status"] == 409  # attempt 2 is not running: stop that job
        assert api.services.streams.read(mine[0]["id"], None, 0).chunks == ["one"]
        assert api.services.streams.read(mine[1]["id"], None, 0).chunks == ["2"]
        assert api.services.streams.read(theirs["id"], None, 0) is None
        twice = await api.http.post(
            "/v1/workers/streams",
            json={"parts": [part(mine[0], 1, "a"), part(mine[0], 2, "b")]},
            headers=worker.headers,
        )
        assert_problem(twice, 422, "invalid_input", "listed twice")

    run_api(body)


def test_openai_routes_speak_openais_error_shape(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, _ = await _market(api)
        chat = "/v1/chat/completions"
        cases = [
            ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
            ({"model": LLM, "messages": [{"role": "tool", "content": "x"}]}, 400),
            ({"model": LLM, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400),
            ({"model": LLM, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400),
            ({"model": LLM, "prompt": "x"}, 400),
        ]
        for request, status in cases:
            resp = await api.http.post(chat, json=request, headers=client)
            assert resp.status_code == status, (request, resp.text)
            error = resp.json()["error"]
            assert error["message"] and error["type"] and error["code"]
        unauthorised = await api.http.post(chat, json=cases[0][0], headers=bearer("nope"))
        assert unauthorised.status_code == 401 and "error" in unauthorised.json()
        bad_json = await api.http.post(chat, content=b"{", headers=client)
        assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
        models = (await api.http.get("/v1/models", headers=client)).json()
        [listed] = [m for m in models["data"] if m["id"] == LLM]
        assert listed["gpumarket"]["min_price_wei_per_unit"] == str(PRICE)
        assert listed["gpumarket"]["context_tokens"] == 8192

    run_api(body)


def test_a_retried_attempt_starts_the_stream_over(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, worker = await _market(api)
        job = (await api.http.post("/v1/jobs", json=_spec(), headers=client)).json()
        url = f"/v1/workers/jobs/{job['id']}/stream"
        await api.lease(worker)
        first = {"attempt": 1, "seq": 0, "text": "half an ans", "tokens": 3}
        assert (await api.http.post(url, json=first, headers=worker.headers)).status_code == 204
        assert api.services.streams.read(job["id"], None, 0).chunks == ["half an ans"]
        gave_up = await api.http.post(
            f"/v1/workers/jobs/{job['id']}/fail",
            json={"attempt": 1, "retryable": True, "reason": "out of memory", "fault": "none"},
            headers=worker.headers,
        )
        assert gave_up.status_code == 200, gave_up.text
        other = await api.register_worker(offers=[offer(LLM, price=PRICE, job_type="generate")])
        [again] = await api.lease(other)
        assert again["attempt"] == 2
        second = {"attempt": 2, "seq": 0, "text": "a whole answer", "tokens": 3}
        assert (await api.http.post(url, json=second, headers=other.headers)).status_code == 204
        late = await api.http.post(url, json={**first, "seq": 1}, headers=worker.headers)
        assert late.status_code == 409  # attempt 1 is over: told to stop, its text goes nowhere
        view = api.services.streams.read(job["id"], 1, 1)
        assert view is not None and view.attempt == 2 and view.chunks == ["a whole answer"]

    run_api(body)


def test_generate_results_reported_in_one_batch_bill_their_tokens(run_api: RunApi) -> None:
    """A batch of results (POST /v1/workers/results) counts a generation's tokens from each
    item's own output, as a single completion does."""

    async def body(api: Api) -> None:
        client, worker = await _market(api)
        for _ in range(2):
            assert (await api.http.post("/v1/jobs", json=_spec(), headers=client)).is_success
        leased = await api.lease(worker, max_jobs=2)
        assert len(leased) == 2
        outputs = [_output([5, 6, 7, 8]), _output([9, 10], text="hi")]
        items = []
        for job, output in zip(leased, outputs, strict=True):
            item = batch_item(
                job, units=output["usage"]["prompt_tokens"] + len(output["token_ids"])
            )
            item.update(
                output=output,
                output_sha256=output_sha256(output),
                prompt_units=output["usage"]["prompt_tokens"],
            )
            items.append(item)
        request = signed(items, worker.account)
        resp = await api.http.post("/v1/workers/results", json=request, headers=worker.headers)
        assert resp.status_code == 200, resp.text
        outcomes = resp.json()["results"]
        assert [o["error"] for o in outcomes] == [None, None], outcomes
        assert [o["cost_wei"] for o in outcomes] == [str(7 * PRICE), str(5 * PRICE)]

    run_api(body)


# -- prompt and completion tokens priced apart ----------------------------------------------------

PROMPT_PRICE = 3  # wei per prompt token, below the completion token's PRICE


async def _two_price_market(api: Api) -> tuple[dict[str, str], Any]:
    client = await api.new_client()
    worker = await api.register_worker(
        offers=[
            offer(
                LLM,
                price=PRICE,
                job_type="generate",
                context_tokens=8192,
                prompt_price_wei_per_unit=PROMPT_PRICE,
            )
        ],
        max_concurrency=4,
    )
    return client, worker


def test_prompt_and_completion_tokens_are_billed_each_at_their_price(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, worker = await _two_price_market(api)
        job = (await api.http.post("/v1/jobs", json=_spec(), headers=client)).json()
        # Bounded before it runs: the prompt's bound at the prompt cap (here the one max price)
        # plus max_tokens at the max price.
        prompt_bound = len(b"Hello") + 64
        assert job["max_cost_wei"] == str(prompt_bound * PRICE + 5 * PRICE)
        [leased] = await api.lease(worker)
        assert (leased["price_wei_per_unit"], leased["prompt_price_wei_per_unit"]) == (
            str(PRICE),
            str(PROMPT_PRICE),
        )
        # 3 prompt tokens + 4 completion tokens: 3 x 3 + 4 x 7 wei.
        done = await api.complete(worker, job["id"], 1, _output([5, 6, 7, 8]), units=7)
        assert done.status_code == 200, done.text
        result = done.json()
        assert result["cost_wei"] == str(3 * PROMPT_PRICE + 4 * PRICE) == "37"
        assert (result["prompt_units"], result["prompt_price_wei_per_unit"]) == (3, "3")
        signer = recover_result_signer(
            job["id"],
            1,
            result["output_sha256"],
            7,
            PRICE,
            result["signature"],
            prompt_units=3,
            prompt_price_wei_per_unit=PROMPT_PRICE,
        )
        assert signer == worker.address
        assert cost_wei(7, PRICE, 3, PROMPT_PRICE) == int(result["cost_wei"])  # as a verifier
        view = await api.job(client, job["id"])
        assert (view["prompt_units"], view["prompt_price_wei_per_unit"], view["cost_wei"]) == (
            3,
            "3",
            "37",
        )

    run_api(body)


def test_a_result_signed_at_another_prompt_price_or_count_is_refused(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, worker = await _two_price_market(api)
        job = (await api.http.post("/v1/jobs", json=_spec(), headers=client)).json()
        await api.lease(worker)
        output = _output([5, 6, 7, 8])
        # Signed as if prompt tokens cost what completion tokens do: another signer recovers.
        wrong_price = completion(
            worker.signer(),
            job["id"],
            1,
            output,
            7,
            price_wei_per_unit=PRICE,
            prompt_price_wei_per_unit=PRICE,
        )
        resp = await api.http.post(
            f"/v1/workers/jobs/{job['id']}/complete",
            json=wrong_price.model_dump(mode="json"),
            headers=worker.headers,
        )
        assert resp.status_code == 422 and "prompt price (3)" in resp.text, resp.text
        # prompt_units other than the output's usage: a clear 422 saying what to sign.
        shifted = wrong_price.model_copy(update={"prompt_units": 1})
        resp = await api.http.post(
            f"/v1/workers/jobs/{job['id']}/complete",
            json=shifted.model_dump(mode="json"),
            headers=worker.headers,
        )
        assert resp.status_code == 422 and "report and sign prompt_units=3" in resp.text
        # More prompt tokens than the prompt's bound (its bytes + the template's 64): refused.
        padded = _output([5], prompt_tokens=len(b"Hello") + 65)
        resp = await api.complete(worker, job["id"], 1, padded, units=len(b"Hello") + 66)
        assert resp.status_code == 422 and "prompt tokens, above the job's bound" in resp.text
        assert (await api.complete(worker, job["id"], 1, output, units=7)).status_code == 200

    run_api(body)


def test_a_prompt_price_above_the_clients_cap_is_not_matched(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        dear_prompts = await api.register_worker(
            offers=[offer(LLM, price=2, job_type="generate", prompt_price_wei_per_unit=9)]
        )
        capped = {**_spec(), "max_prompt_price_wei_per_unit": "5"}
        job = (await api.http.post("/v1/jobs", json=capped, headers=client)).json()
        # The bound takes each cap: 69 prompt tokens at 5 + 5 completion tokens at 7.
        assert job["max_cost_wei"] == str((len(b"Hello") + 64) * 5 + 5 * PRICE)
        assert await api.lease(dear_prompts) == []
        waiting = (await api.job(client, job["id"]))["waiting_reason"]
        assert "asks 9 wei/prompt token, above the job's 5" in waiting, waiting
        cheap = await api.register_worker(
            offers=[offer(LLM, price=PRICE, job_type="generate", prompt_price_wei_per_unit=5)]
        )
        [leased] = await api.lease(cheap)
        assert leased["prompt_price_wei_per_unit"] == "5"
        inference = {**inference_spec(), "max_prompt_price_wei_per_unit": "5"}
        refused = await api.http.post("/v1/jobs", json=inference, headers=client)
        assert refused.status_code == 422 and "generate jobs only" in refused.text

    run_api(body)


def test_two_priced_generations_reported_in_one_batch(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, worker = await _two_price_market(api)
        for _ in range(2):
            assert (await api.http.post("/v1/jobs", json=_spec(), headers=client)).is_success
        leased = await api.lease(worker, max_jobs=2)
        outputs = [_output([5, 6, 7, 8]), _output([9, 10], text="hi", prompt_tokens=4)]
        items = []
        for job, output in zip(leased, outputs, strict=True):
            prompt = output["usage"]["prompt_tokens"]
            item = batch_item(job, units=prompt + len(output["token_ids"]))
            item.update(output=output, output_sha256=output_sha256(output), prompt_units=prompt)
            items.append(item)
        resp = await api.http.post(
            "/v1/workers/results", json=signed(items, worker.account), headers=worker.headers
        )
        assert resp.status_code == 200, resp.text
        costs = [o["cost_wei"] for o in resp.json()["results"]]
        assert costs == [str(3 * PROMPT_PRICE + 4 * PRICE), str(4 * PROMPT_PRICE + 2 * PRICE)]

    run_api(body)


def test_openai_answers_bill_and_show_prompt_and_completion_parts(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, worker = await _two_price_market(api)
        models = (await api.http.get("/v1/models", headers=client)).json()
        [listed] = [m for m in models["data"] if m["id"] == LLM]
        assert listed["gpumarket"]["min_prompt_price_wei_per_unit"] == str(PROMPT_PRICE)
        request = {
            "model": LLM,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 4,
            "temperature": 0,
        }
        answer = asyncio.create_task(
            api.http.post("/v1/chat/completions", json=request, headers=client)
        )
        leased = await _lease_soon(api, worker)
        # No max price named: the market's, i.e. the cheapest offer's two prices.
        assert leased[0]["prompt_price_wei_per_unit"] == str(PROMPT_PRICE)
        done = await api.complete(worker, leased[0]["job_id"], 1, _output([5, 6]), units=5)
        assert done.status_code == 200, done.text
        resp = await answer
        assert resp.status_code == 200, resp.text
        market = resp.json()["gpumarket"]
        assert market["prompt_cost_wei"] == str(3 * PROMPT_PRICE)
        assert market["completion_cost_wei"] == str(2 * PRICE)
        assert market["cost_wei"] == str(3 * PROMPT_PRICE + 2 * PRICE)
        too_low = await api.http.post(
            "/v1/chat/completions",
            json={
                **request,
                "max_price_wei_per_token": str(PRICE),
                "max_prompt_price_wei_per_token": "2",
            },
            headers=client,
        )
        assert too_low.status_code == 503, too_low.text
        assert "max_prompt_price_wei_per_token" in too_low.json()["error"]["message"]

    run_api(body)


# -- prompts longer than the model's context ---------------------------------------------------


def test_a_prompt_that_cannot_fit_the_context_is_refused_at_submit(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        small = offer(LLM, price=PRICE, job_type="generate", context_tokens=100, max_token_bytes=4)
        await api.register_worker(offers=[small])
        # 400 bytes: at least 100 tokens of at most 4 bytes, no room left in 100.
        resp = await api.http.post("/v1/jobs", json=_spec(prompt="abcd" * 100), headers=client)
        assert_problem(resp, 422, "invalid_input", "at least 100 tokens", "context of 100 tokens")
        assert "shorten the prompt" in resp.json()["detail"]
        chat = {"model": LLM, "messages": [{"role": "user", "content": "abcd" * 100}]}
        answer = await api.http.post("/v1/chat/completions", json=chat, headers=client)
        assert answer.status_code == 400, answer.text
        assert "context of 100 tokens" in answer.json()["error"]["message"]
        # 396 bytes may be 99 tokens: it may fit, so it is taken.
        fits = await api.http.post("/v1/jobs", json=_spec(prompt="abcd" * 99), headers=client)
        assert fits.status_code == 201, fits.text
        # A worker that does not say how long its tokens are may fit anything: not refused.
        await api.register_worker(offers=[offer(LLM, price=PRICE, job_type="generate")])
        resp = await api.http.post("/v1/jobs", json=_spec(prompt="abcd" * 100), headers=client)
        assert resp.status_code == 201, resp.text

    run_api(body)


TOO_LONG = (
    f"the prompt is 9000 tokens, longer than {LLM}'s context of 8192 tokens (prompt + "
    "completion): shorten it"
)


async def _lease_soon(api: Api, worker: Any) -> list[dict[str, Any]]:
    """The job a request in flight submitted, leased as soon as it is queued."""
    for _ in range(500):
        leased = await api.lease(worker)
        if leased:
            return leased
        await asyncio.sleep(0.01)
    raise AssertionError("no job was leased within 5 s")


async def _refuse(api: Api, worker: Any, job_id: str, attempt: int = 1) -> None:
    """The worker's answer to a prompt its tokenizer finds too long (worker/executors)."""
    resp = await api.http.post(
        f"/v1/workers/jobs/{job_id}/fail",
        json={"attempt": attempt, "retryable": False, "reason": TOO_LONG, "fault": "input"},
        headers=worker.headers,
    )
    assert resp.status_code == 200, resp.text


def test_a_worker_refusing_a_too_long_prompt_ends_the_job_as_the_inputs_fault(
    run_api: RunApi,
) -> None:
    """A prompt that slips past the submit check: the worker's refusal fails the job at once
    for its input (a lone worker: nobody else to ask), costs the worker nothing, charges
    nothing, and the OpenAI caller gets 400 with the worker's words, streaming or not."""

    async def body(api: Api) -> None:
        client, worker = await _market(api)
        for stream in (False, True):
            content = f"a long story ({'streamed' if stream else 'whole'})"
            chat = {"model": LLM, "messages": [{"role": "user", "content": content}]}
            answer = asyncio.create_task(
                api.http.post(
                    "/v1/chat/completions", json={**chat, "stream": stream}, headers=client
                )
            )
            leased = await _lease_soon(api, worker)
            await _refuse(api, worker, leased[0]["job_id"])
            resp = await asyncio.wait_for(answer, 5)
            assert resp.status_code == 400, resp.text
            error = resp.json()["error"]
            assert error["code"] == "invalid_input" and TOO_LONG in error["message"]
            view = await api.job(client, leased[0]["job_id"])
            assert (view["state"], view["fault"], view["cost_wei"]) == ("failed", "input", None)
        [seen] = (await api.http.get("/v1/workers", headers=api.operator)).json()
        assert seen["jobs_failed"] == 0 and seen["reputation"] >= 0.5
        # The same request again is refused at submit: no worker is asked twice.
        again = await api.http.post("/v1/chat/completions", json=chat, headers=client)
        assert again.status_code == 400 and TOO_LONG in again.json()["error"]["message"]

    run_api(body)


def test_with_two_workers_a_second_refusal_confirms_it_in_one_more_lease(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, first = await _market(api)
        second = await api.register_worker(
            offers=[offer(LLM, price=PRICE, job_type="generate", context_tokens=8192)]
        )
        job = (await api.http.post("/v1/jobs", json=_spec(), headers=client)).json()
        assert len(await api.lease(first) + await api.lease(second)) == 1
        view = await api.job(client, job["id"])
        holder = first if view["worker_address"] == first.address else second
        other = second if holder is first else first
        await _refuse(api, holder, job["id"])
        [again] = await api.lease(other)
        assert again["attempt"] == 2
        await _refuse(api, other, job["id"], attempt=2)
        view = await api.job(client, job["id"])
        assert (view["state"], view["fault"]) == ("failed", "input")
        assert "confirmed by a second worker" in view["failure_reason"]
        workers = (await api.http.get("/v1/workers", headers=api.operator)).json()
        assert [w["jobs_failed"] for w in workers] == [0, 0]

    run_api(body)


# -- several prompts in one /v1/completions request ---------------------------------------------


def test_a_list_of_prompts_is_one_batch_of_jobs_answered_in_order(run_api: RunApi) -> None:
    """OpenAI's list ``prompt``: one generate job per prompt, submitted together; the answer
    has a choice per prompt in the prompts' order, the usage summed, and each job's market
    fields with the total cost."""

    async def body(api: Api) -> None:
        client, worker = await _market(api)
        prompts = ["one", "two", "three"]
        request = {"model": LLM, "prompt": prompts, "max_tokens": 4, "temperature": 0}
        answer = asyncio.create_task(api.http.post("/v1/completions", json=request, headers=client))
        leased: list[dict[str, Any]] = []
        while len(leased) < len(prompts):
            leased += await _lease_soon(api, worker)
        # Answered out of order, each with its own prompt echoed and its own token count.
        for job in reversed(leased):
            prompt = job["input"]["prompt"]
            tokens = list(range(len(prompt)))[:4]
            output = _output(tokens, text=f"echo {prompt}", prompt_tokens=2)
            done = await api.complete(worker, job["job_id"], 1, output, units=2 + len(tokens))
            assert done.status_code == 200, done.text
        resp = await answer
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert [c["text"] for c in got["choices"]] == [f"echo {p}" for p in prompts]
        assert [c["index"] for c in got["choices"]] == [0, 1, 2]
        completion_tokens = sum(min(len(p), 4) for p in prompts)
        assert got["usage"] == {
            "prompt_tokens": 6,
            "completion_tokens": completion_tokens,
            "total_tokens": 6 + completion_tokens,
        }
        jobs = got["gpumarket"]["jobs"]
        assert sorted(j["job_id"] for j in jobs) == sorted(j["job_id"] for j in leased)
        assert got["gpumarket"]["cost_wei"] == str((6 + completion_tokens) * PRICE)
        assert sum(int(j["cost_wei"]) for j in jobs) == (6 + completion_tokens) * PRICE

    run_api(body)


def test_a_list_of_prompts_is_refused_whole_with_the_prompt_named(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, _ = await _market(api)
        base = {"model": LLM, "max_tokens": 4}
        streamed = await api.http.post(
            "/v1/completions", json={**base, "prompt": ["a", "b"], "stream": True}, headers=client
        )
        assert streamed.status_code == 400, streamed.text
        assert "stream one prompt per request" in streamed.json()["error"]["message"]
        too_many = await api.http.post(
            "/v1/completions", json={**base, "prompt": ["a"] * 65}, headers=client
        )
        assert too_many.status_code == 400, too_many.text
        assert "1 to 64 prompts" in too_many.json()["error"]["message"]
        bad = await api.http.post(
            "/v1/completions",
            json={**base, "prompt": ["fine", "x" * 2_000_000]},
            headers=client,
        )
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["message"].startswith("prompt[1]: "), bad.text
        assert (await api.http.get("/v1/jobs", headers=client)).json()["jobs"] == []

    run_api(body)


def test_a_prompt_refused_at_submit_cancels_the_jobs_of_its_list(run_api: RunApi) -> None:
    """The batch takes the prompts that fit and refuses the one that cannot: the request is
    refused as a whole (naming that prompt) and the jobs made for the others are cancelled,
    so nothing runs or is charged for an answer the client never gets."""

    async def body(api: Api) -> None:
        client = await api.new_client()
        small = offer(LLM, price=PRICE, job_type="generate", context_tokens=100, max_token_bytes=4)
        await api.register_worker(offers=[small])
        request = {"model": LLM, "prompt": ["fine", "abcd" * 100], "max_tokens": 4}
        resp = await api.http.post("/v1/completions", json=request, headers=client)
        assert resp.status_code == 400, resp.text
        message = resp.json()["error"]["message"]
        assert message.startswith("prompt[1]: ") and "context of 100 tokens" in message
        [made] = (await api.http.get("/v1/jobs", headers=client)).json()["jobs"]
        assert made["state"] == "cancelled" and made["cost_wei"] in (None, "0")

    run_api(body)


@pytest.mark.parametrize(
    ("path", "request_body", "jobs"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, 1),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "stream": True},
            1,
        ),
        ("/v1/completions", {"prompt": ["One", "Two"]}, 2),
    ],
    ids=["chat", "chat-stream-before-its-first-text", "completions-list"],
)
def test_a_client_that_hangs_up_while_waiting_cancels_its_jobs_and_pays_nothing(
    services: Services, path: str, request_body: dict[str, Any], jobs: int
) -> None:
    """An OpenAI request whose client closes the connection while its jobs run (a timeout, a
    dropped network; the ``openai`` client then sends it again) cancels them at once: no one
    will read the answer, so the client is charged nothing and the worker's lease ends."""

    async def body(app: Any, api: Api) -> None:
        client, worker = await _market(api)
        hang_up = asyncio.Event()
        request = {"model": LLM, "max_tokens": 4, **request_body}
        call = asyncio.create_task(call_until_hang_up(app, path, request, client, hang_up))
        leased: list[dict[str, Any]] = []
        while len(leased) < jobs:
            leased += await api.lease(worker, max_jobs=jobs)
            await asyncio.sleep(0.01)
        hang_up.set()
        answer = await asyncio.wait_for(call, timeout=5)  # not the result's wait of minutes
        assert answer[0]["status"] == 499
        for job in leased:
            seen = await api.job(client, job["job_id"])
            assert seen["state"] == "cancelled", seen
            assert seen["cost_wei"] in (None, "0")
            late = await api.complete(worker, job["job_id"], 1, _output([5, 6]), units=2)
            assert late.status_code == 409, late.text  # the worker's lease ended with it

    serve_with_app(services, body)


HELLO = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("path", "request_body", "jobs", "text_first"),
    [
        ("/v1/chat/completions", {"messages": HELLO}, 1, False),
        ("/v1/chat/completions", {"messages": HELLO, "stream": True}, 1, False),
        ("/v1/chat/completions", {"messages": HELLO, "stream": True}, 1, True),
        ("/v1/completions", {"prompt": ["One", "Two"]}, 2, False),
    ],
    ids=["chat", "stream-before-its-first-text", "stream-relaying", "completions-list"],
)
def test_a_stopping_orchestrator_ends_open_requests_cleanly_and_charges_nothing(
    run_api: RunApi,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    request_body: dict[str, Any],
    jobs: int,
    text_first: bool,
) -> None:
    """At shutdown a request still waiting on its jobs gets ``STOPPING_WAIT_S`` for them to
    finish, then ends inside the server's grace period instead of being cut by it: its jobs
    are cancelled (nothing charged, the worker's lease ends, the reason says why) and the
    client is told to send the request again (a 503, or that error as the stream's last
    event). Cut by the grace period, a stream was left with a traceback and a cancel blamed on
    the client, and a non-streamed answer was lost while its job went on to be charged."""
    monkeypatch.setattr(openai_routes, "STOPPING_WAIT_S", 0.2)

    async def body(api: Api) -> None:
        client, worker = await _market(api)
        request = {"model": LLM, "max_tokens": 4, **request_body}
        answer = asyncio.create_task(api.http.post(path, json=request, headers=client))
        leased: list[dict[str, Any]] = []
        while len(leased) < jobs:
            leased += await api.lease(worker, max_jobs=jobs)
            await asyncio.sleep(0.01)
        if text_first:
            sent = await api.http.post(
                f"/v1/workers/jobs/{leased[0]['job_id']}/stream",
                json={"attempt": 1, "seq": 0, "text": "Once", "tokens": 1},
                headers=worker.headers,
            )
            assert sent.status_code == 204, sent.text
            await asyncio.sleep(0.3)  # the stream has opened and relays
        api.services.hub.close()
        resp = await asyncio.wait_for(answer, timeout=4)  # inside the 5 s grace period
        if request_body.get("stream") and text_first:
            assert resp.status_code == 200
            events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "server_stopping"
        else:
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "server_stopping"
        for job in leased:
            seen = await api.job(client, job["job_id"])
            assert seen["state"] == "cancelled", seen
            assert seen["failure_reason"] == "cancelled: the orchestrator stopped"
            assert seen["cost_wei"] in (None, "0")
            late = await api.complete(worker, job["job_id"], 1, _output([5, 6]), units=2)
            assert late.status_code == 409, late.text

    run_api(body)


def test_a_stopping_orchestrator_names_a_job_that_finished_first_as_charged(
    settings: Settings,
    sqlite_store: Store,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job whose result is held for verification when the orchestrator stops cannot be
    cancelled: the answer says so (it is charged once verified, its result readable by id)
    instead of telling the client it was cancelled."""
    monkeypatch.setattr(openai_routes, "STOPPING_WAIT_S", 0.2)
    checked = settings.model_copy(update={"verify_rate": 1.0, "verify_rate_new": 1.0})
    services = build_services(checked, store=sqlite_store, clock=clock, rng=random.Random(7))

    async def body(app: Any, api: Api) -> None:
        client, worker = await _market(api)
        await _market(api)  # a second worker, to check the first one's result
        request = {"model": LLM, "max_tokens": 4, "messages": HELLO}
        answer = asyncio.create_task(
            api.http.post("/v1/chat/completions", json=request, headers=client)
        )
        leased: list[dict[str, Any]] = []
        while not leased:
            leased = await api.lease(worker)
            await asyncio.sleep(0.01)
        job_id = leased[0]["job_id"]
        done = await api.complete(worker, job_id, 1, _output([5, 6]), units=5)
        assert done.status_code == 200, done.text
        assert (await api.job(client, job_id))["state"] == "verifying"
        api.services.hub.close()
        resp = await asyncio.wait_for(answer, timeout=4)
        assert resp.status_code == 503, resp.text
        message = resp.json()["error"]["message"]
        assert job_id in message and "charged once their results are verified" in message
        assert (await api.job(client, job_id))["state"] == "verifying"

    serve_with_app(services, body)
