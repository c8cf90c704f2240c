"""Generate jobs over the real app in-process: per-token billing from the result's usage, the
worker's token stream relayed to the client (SSE), and the OpenAI dialect's shapes and errors.
The worker here is the test speaking HTTP; tests/integration/test_openai_api.py runs the real
worker process with the real model."""

from __future__ import annotations

import json
from typing import Any

from protocol.signing import output_sha256
from tests.api.conftest import Api, RunApi, bearer
from tests.api.test_batches_api import batch_item, signed
from tests.api.test_metrics_api import scrape, value
from tests.support import offer

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
