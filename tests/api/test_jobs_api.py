"""Client job routes over HTTP: submit, read, list, cancel, idempotency, auth, bad input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from orchestrator.services.wakeups import JOB_KEY_PREFIX, WakeHub
from orchestrator.wiring import Services
from tests.api.conftest import (
    TEXTS,
    Api,
    RunApi,
    assert_problem,
    bearer,
    call_until_hang_up,
    inference_spec,
    serve_with_app,
)
from tests.conftest import FakeClock
from tests.support import EMBED_MODEL, offer

BIG_WEI = "123456789012345678901234567890"  # past 2**64: must survive as an exact string


def test_submit_inference_job_returns_201_with_wei_as_decimal_strings(
    run_api: RunApi, clock: FakeClock
) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        resp = await api.http.post(
            "/v1/jobs",
            json=inference_spec(max_price_wei_per_unit=BIG_WEI, preference="green"),
            headers=client,
        )
        assert resp.status_code == 201, resp.text
        assert resp.headers["content-type"] == "application/json"
        job = resp.json()
        assert len(job["id"]) == 32
        assert job["type"] == "inference"
        assert job["model"] == EMBED_MODEL
        assert job["precision"] == "fp32"
        assert job["preference"] == "green"
        assert job["state"] == "queued"
        assert job["attempt"] == 1 and job["max_attempts"] == 3
        assert job["max_price_wei_per_unit"] == BIG_WEI
        assert job["price_wei_per_unit"] is None and job["cost_wei"] is None
        assert job["units"] == len(TEXTS)
        assert job["worker_address"] is None
        assert job["idempotency_key"] is None
        assert job["container"] == "mp4"
        assert job["renditions"] is None
        assert job["history"] == [
            {"at": job["created_at"], "attempt": 1, "state": "queued", "detail": "submitted"}
        ]
        # deadline defaults to an hour after submission
        assert job["created_at"] == "2027-01-15T08:00:00Z"
        assert job["deadline_at"] == "2027-01-15T09:00:00Z"

        # an integer price is accepted too, and still comes back as a string
        resp = await api.http.post(
            "/v1/jobs", json=inference_spec(max_price_wei_per_unit=250), headers=client
        )
        assert resp.status_code == 201, resp.text
        assert resp.json()["max_price_wei_per_unit"] == "250"

    run_api(body)


def test_get_job_and_result_409_while_not_ready(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        job = await api.submit(client)

        assert await api.job(client, job["id"]) == job

        resp = await api.http.get(f"/v1/jobs/{job['id']}/result", headers=client)
        problem = assert_problem(resp, 409, "conflict", "queued", "not ready", "Poll GET")
        assert problem["state"] == "queued"

        resp = await api.http.get("/v1/jobs/0123456789abcdef0123456789abcdef", headers=client)
        assert_problem(resp, 404, "not_found", "among your jobs")

    run_api(body)


def test_list_returns_own_jobs_newest_first_in_pages(run_api: RunApi, clock: FakeClock) -> None:
    async def body(api: Api) -> None:
        alice, bob = await api.new_client("alice"), await api.new_client("bob")
        mine = []
        for _ in range(5):
            mine.append((await api.submit(alice))["id"])
            clock.advance(1)
        # two jobs in the same second: the id breaks the tie, none is skipped or repeated
        mine.append((await api.submit(alice))["id"])
        mine.append((await api.submit(alice))["id"])
        theirs = (await api.submit(bob))["id"]

        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            resp = await api.http.get("/v1/jobs", params=params, headers=alice)
            assert resp.status_code == 200, resp.text
            page = resp.json()
            pages += 1
            assert 1 <= len(page["jobs"]) <= 2
            seen += [j["id"] for j in page["jobs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert isinstance(cursor, str)
        assert pages == 4
        assert len(seen) == len(set(seen)) == len(mine)
        assert set(seen) == set(mine)
        assert theirs not in seen
        assert seen[-5:] == list(reversed(mine[:5]))  # newest first

        resp = await api.http.get("/v1/jobs", headers=bob)
        assert [j["id"] for j in resp.json()["jobs"]] == [theirs]
        assert resp.json()["next_cursor"] is None

    run_api(body)


def test_list_filters_by_state(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        keep = await api.submit(client)
        drop = await api.submit(client)
        resp = await api.http.post(f"/v1/jobs/{drop['id']}/cancel", headers=client)
        assert resp.status_code == 200

        resp = await api.http.get("/v1/jobs", params={"state": "cancelled"}, headers=client)
        assert resp.status_code == 200
        assert [j["id"] for j in resp.json()["jobs"]] == [drop["id"]]
        resp = await api.http.get("/v1/jobs", params={"state": "queued"}, headers=client)
        assert [j["id"] for j in resp.json()["jobs"]] == [keep["id"]]
        resp = await api.http.get("/v1/jobs", params={"state": "succeeded"}, headers=client)
        assert resp.json() == {"jobs": [], "next_cursor": None}

    run_api(body)


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"state": "done"}, ["state", "'queued'", "'succeeded'"]),
        ({"limit": 0}, ["limit", "greater than or equal to 1"]),
        ({"limit": 201}, ["limit", "less than or equal to 200"]),
        ({"limit": "many"}, ["limit", "valid integer"]),
        ({"cursor": "not-a-cursor"}, ["cursor is malformed", "next_cursor"]),
    ],
)
def test_list_rejects_bad_query(run_api: RunApi, params: dict[str, Any], says: list[str]) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        resp = await api.http.get("/v1/jobs", params=params, headers=client)
        assert_problem(resp, 422, "invalid_input", *says)

    run_api(body)


def test_cancel_then_second_cancel_conflicts(run_api: RunApi, clock: FakeClock) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        job = await api.submit(client)
        clock.advance(2)

        resp = await api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=client)
        assert resp.status_code == 200, resp.text
        cancelled = resp.json()
        assert cancelled["id"] == job["id"]
        assert cancelled["state"] == "cancelled"
        assert cancelled["failure_reason"] == "cancelled by the client"
        assert cancelled["finished_at"] == "2027-01-15T08:00:02Z"
        assert [e["state"] for e in cancelled["history"]] == ["queued", "cancelled"]

        resp = await api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=client)
        assert_problem(resp, 409, "conflict", "already cancelled", "nothing to cancel")

        resp = await api.http.get(f"/v1/jobs/{job['id']}/result", headers=client)
        assert_problem(resp, 409, "conflict", "cancelled", "no result")

    run_api(body)


# -- idempotency ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["header", "body", "both"])
def test_same_idempotency_key_returns_the_same_job(run_api: RunApi, where: str) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        key = "order-42"
        spec = inference_spec(idempotency_key=key) if where != "header" else inference_spec()
        headers = {**client, "Idempotency-Key": key} if where != "body" else client

        first = await api.http.post("/v1/jobs", json=spec, headers=headers)
        assert first.status_code == 201, first.text
        assert first.json()["idempotency_key"] == key
        again = await api.http.post("/v1/jobs", json=spec, headers=headers)
        assert again.status_code == 200, again.text
        assert again.json() == first.json()

        listed = (await api.http.get("/v1/jobs", headers=client)).json()["jobs"]
        assert [j["id"] for j in listed] == [first.json()["id"]]

    run_api(body)


def test_idempotency_key_is_per_client(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        alice, bob = await api.new_client("alice"), await api.new_client("bob")
        a = await api.http.post("/v1/jobs", json=inference_spec(idempotency_key="k"), headers=alice)
        b = await api.http.post("/v1/jobs", json=inference_spec(idempotency_key="k"), headers=bob)
        assert (a.status_code, b.status_code) == (201, 201)
        assert a.json()["id"] != b.json()["id"]

    run_api(body)


def test_same_idempotency_key_with_another_body_conflicts(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        headers = {**client, "Idempotency-Key": "order-42"}
        first = await api.http.post("/v1/jobs", json=inference_spec(), headers=headers)
        assert first.status_code == 201
        other = inference_spec(input={"texts": ["something else"]})
        resp = await api.http.post("/v1/jobs", json=other, headers=headers)
        assert_problem(resp, 409, "conflict", "'order-42'", first.json()["id"], "use a new key")

    run_api(body)


def test_an_idempotency_key_with_a_control_character_is_refused(run_any_api: RunApi) -> None:
    """A NUL (PostgreSQL's text refuses it: a database error, a 500, before the key had a
    pattern) or another control character in a key is the client's typo: a 422 naming the
    field, on one job or a batch's."""

    async def body(api: Api) -> None:
        client = await api.new_client()
        for key in ["nul\x00key", "tab\tkey"]:
            resp = await api.http.post(
                "/v1/jobs", json=inference_spec(idempotency_key=key), headers=client
            )
            assert_problem(resp, 422, "invalid_input", "idempotency_key")
            resp = await api.http.post(
                "/v1/jobs/batch",
                json={"jobs": [inference_spec(idempotency_key=key), inference_spec()]},
                headers=client,
            )
            assert resp.status_code == 422, resp.text
            assert "idempotency_key" in resp.text

    run_any_api(body)


def test_idempotency_header_and_body_key_must_agree(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        resp = await api.http.post(
            "/v1/jobs",
            json=inference_spec(idempotency_key="from-body"),
            headers={**client, "Idempotency-Key": "from-header"},
        )
        assert_problem(resp, 422, "invalid_input", "Idempotency-Key header", "differ")
        resp = await api.http.get("/v1/jobs", headers=client)
        assert resp.json()["jobs"] == []

    run_api(body)


# -- authentication and ownership --------------------------------------------------------------


def test_client_routes_need_a_client_api_key(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        job = await api.submit(client)
        worker = await api.register_worker()
        calls = [
            ("POST", "/v1/jobs", inference_spec()),
            ("GET", "/v1/jobs", None),
            ("GET", f"/v1/jobs/{job['id']}", None),
            ("GET", f"/v1/jobs/{job['id']}/result", None),
            ("POST", f"/v1/jobs/{job['id']}/cancel", None),
        ]
        for method, path, spec in calls:
            resp = await api.http.request(method, path, json=spec)
            assert_problem(resp, 401, "unauthorized", "missing credentials", "Bearer")

            resp = await api.http.request(
                method, path, json=spec, headers={"Authorization": "Basic dXNlcjpwYXNz"}
            )
            assert_problem(resp, 401, "unauthorized", "missing credentials")

            resp = await api.http.request(method, path, json=spec, headers=bearer("gmk_nope"))
            assert_problem(resp, 401, "unauthorized", "unknown API key")

            resp = await api.http.request(method, path, json=spec, headers=worker.headers)
            assert_problem(resp, 401, "unauthorized", "expected a client API key")

            resp = await api.http.request(method, path, json=spec, headers=api.operator)
            assert_problem(resp, 401, "unauthorized", "expected a client API key")

        # nothing above touched the job
        assert (await api.job(client, job["id"]))["state"] == "queued"

    run_api(body)


def test_a_client_cannot_see_or_touch_another_clients_job(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        alice, bob = await api.new_client("alice"), await api.new_client("bob")
        job = await api.submit(bob)
        for method, path in [
            ("GET", f"/v1/jobs/{job['id']}"),
            ("GET", f"/v1/jobs/{job['id']}/result"),
            ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ]:
            resp = await api.http.request(method, path, headers=alice)
            # the same answer as for a job that does not exist, so ids cannot be probed
            assert_problem(resp, 404, "not_found", f"no job {job['id']} among your jobs")
        assert (await api.job(bob, job["id"]))["state"] == "queued"

    run_api(body)


# -- bad input: always a 4xx problem a person can act on, never a 500 --------------------------


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"type": "training"}, ["type", "'inference', 'transcode' or 'generate'"]),
        ({"max_price_wei_per_unit": 0}, ["max_price_wei_per_unit", "greater than 0"]),
        ({"max_price_wei_per_unit": "0"}, ["max_price_wei_per_unit", "greater than 0"]),
        ({"max_price_wei_per_unit": -5}, ["max_price_wei_per_unit", "greater than 0"]),
        ({"max_price_wei_per_unit": "-5"}, ["max_price_wei_per_unit", "decimal string"]),
        ({"max_price_wei_per_unit": "ten"}, ["max_price_wei_per_unit", "whole number"]),
        ({"max_price_wei_per_unit": 1.5}, ["max_price_wei_per_unit", "whole number"]),
        ({"max_price_wei_per_unit": True}, ["max_price_wei_per_unit", "not a boolean"]),
        ({"max_price_wei_per_unit": "1" * 79}, ["max_price_wei_per_unit", "whole number"]),
        ({"max_price_wei_per_unit": " 1"}, ["max_price_wei_per_unit", "decimal string"]),
        ({"max_price_wei_per_unit": "1 "}, ["max_price_wei_per_unit", "decimal string"]),
        ({"max_price_wei_per_unit": "1\n"}, ["max_price_wei_per_unit", "decimal string"]),
        ({"max_price_wei_per_unit": "1_000"}, ["max_price_wei_per_unit", "decimal string"]),
        ({"max_price_wei_per_unit": "+1"}, ["max_price_wei_per_unit", "decimal string"]),
        ({"input": None}, ["exactly one of input or input_blob"]),
        ({"input": {"texts": []}}, ["input.texts", "at least 1 item"]),
        ({"input": {"texts": ["a"], "tensors": [[1]]}}, ["exactly one of input.texts"]),
        ({"model": None}, ["inference jobs need a model", EMBED_MODEL]),
        ({"renditions": [{"height": 720, "bitrate_kbps": 3000}]}, ["transcode jobs only"]),
        ({"deadline_s": 0}, ["deadline_s", "greater than 0"]),
        ({"max_attempts": 11}, ["max_attempts", "less than or equal to 10"]),
        ({"precision": "fp64"}, ["precision", "'fp32'", "'int8'"]),
        ({"priority": "high"}, ["priority", "Extra inputs are not permitted"]),
        ({"input_blob": "NOT-A-HASH"}, ["input_blob", "[0-9a-f]{64}"]),
    ],
)
def test_invalid_job_spec_is_422_naming_the_field(
    run_api: RunApi, overrides: dict[str, Any], says: list[str]
) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        resp = await api.http.post("/v1/jobs", json=inference_spec(**overrides), headers=client)
        problem = assert_problem(resp, 422, "invalid_input", *says)
        assert problem["errors"] and all({"field", "message"} <= set(e) for e in problem["errors"])
        assert (await api.http.get("/v1/jobs", headers=client)).json()["jobs"] == []

    run_api(body)


@pytest.mark.parametrize(
    ("field", "says"),
    [
        (b'"input": {"tensors": [[1.0, 1e999]]}', ["input.tensors holds inf", "finite"]),
        (b'"input": {"texts": ["a"]}, "deadline_s": -1e999', ["deadline_s", "finite number"]),
    ],
)
def test_numbers_too_big_for_a_float_are_422(
    run_api: RunApi, field: bytes, says: list[str]
) -> None:
    # 1e999 is valid JSON but parses to infinity, which no JSON response could carry back.
    content = b'{"type": "inference", "model": "%s", "max_price_wei_per_unit": "9", %s}' % (
        EMBED_MODEL.encode(),
        field,
    )

    async def body(api: Api) -> None:
        client = await api.new_client()
        headers = {**client, "Content-Type": "application/json"}
        resp = await api.http.post("/v1/jobs", content=content, headers=headers)
        assert_problem(resp, 422, "invalid_input", *says)

    run_api(body)


def test_missing_fields_are_named(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        resp = await api.http.post("/v1/jobs", json={}, headers=client)
        problem = assert_problem(resp, 422, "invalid_input", "type: Field required")
        fields = {e["field"] for e in problem["errors"]}
        assert fields == {"type", "max_price_wei_per_unit"}

        spec = inference_spec()
        del spec["max_price_wei_per_unit"]
        resp = await api.http.post("/v1/jobs", json=spec, headers=client)
        assert_problem(resp, 422, "invalid_input", "max_price_wei_per_unit: Field required")

    run_api(body)


def test_unknown_model_lists_the_available_ones(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        resp = await api.http.post("/v1/jobs", json=inference_spec(model="gpt-17"), headers=client)
        assert_problem(resp, 422, "invalid_input", "'gpt-17'", f"available: {EMBED_MODEL}")

        # a model a registered worker offers becomes available
        await api.register_worker(offers=[offer(), offer(model="resnet-ts")])
        resp = await api.http.post("/v1/jobs", json=inference_spec(model="gpt-17"), headers=client)
        assert_problem(resp, 422, "invalid_input", f"available: {EMBED_MODEL}, resnet-ts")
        resp = await api.http.post(
            "/v1/jobs",
            json=inference_spec(model="resnet-ts", input={"tensors": [[1.0, 2.0]]}),
            headers=client,
        )
        assert resp.status_code == 201, resp.text
        assert resp.json()["units"] == 1

    run_api(body)


def test_transcode_without_input_blob_is_422(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        spec: dict[str, Any] = {"type": "transcode", "max_price_wei_per_unit": "1"}
        resp = await api.http.post("/v1/jobs", json=spec, headers=client)
        assert_problem(resp, 422, "invalid_input", "transcode jobs need input_blob", "/v1/blobs")

        spec = {**spec, "input": {"texts": ["x"]}, "input_blob": "ab" * 32}
        resp = await api.http.post("/v1/jobs", json=spec, headers=client)
        assert_problem(resp, 422, "invalid_input", "not input")

    run_api(body)


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code", "says"),
    [
        (b'{"type": "inference",', "application/json", 400, "malformed_json", ["not valid JSON"]),
        (b"type=inference", "application/json", 400, "malformed_json", ["not valid JSON"]),
        (b'{"a": 1} trailing', "application/json", 400, "malformed_json", ["trailing"]),
        (b"\xff\xfe\x00", "application/json", 400, "malformed_json", ["not valid JSON"]),
        # NaN and Infinity are not JSON; Python's own parser would let them through
        (
            b'{"type": "inference", "input": {"tensors": [NaN]}}',
            "application/json",
            400,
            "malformed_json",
            ["not valid JSON"],
        ),
        # deep nesting used to overflow the C stack and kill the process
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "malformed_json", ["limit"]),
        (b"[1, 2]", "application/json", 422, "invalid_input", ["valid dictionary"]),
        (b'"inference"', "application/json", 422, "invalid_input", ["valid dictionary"]),
        (b'{"type": "inference"}', "text/plain", 422, "invalid_input", ["valid dictionary"]),
    ],
    ids=[
        "truncated",
        "form-encoded",
        "trailing-garbage",
        "not-utf8",
        "nan",
        "deeply-nested",
        "array",
        "string",
        "text-plain",
    ],
)
def test_unparseable_body_is_a_problem_not_a_crash(
    run_api: RunApi, content: bytes, content_type: str, status: int, code: str, says: list[str]
) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        resp = await api.http.post(
            "/v1/jobs", content=content, headers={**client, "Content-Type": content_type}
        )
        assert_problem(resp, status, code, *says)

    run_api(body)


def test_unknown_route_and_wrong_method_are_problems(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        resp = await api.http.get("/v1/jobz", headers=client)
        assert_problem(resp, 404, "not_found", "GET /v1/jobz", "/docs")

        resp = await api.http.delete("/v1/jobs", headers=client)
        assert_problem(resp, 405, "method_not_allowed", "DELETE /v1/jobs", "GET", "POST")
        assert set(resp.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}

        resp = await api.http.get("/v1/jobs/abc/cancel", headers=client)
        assert_problem(resp, 405, "method_not_allowed", "takes POST")
        assert resp.headers["allow"] == "POST"

    run_api(body)


def test_an_oversized_json_body_is_refused_with_413(run_api: RunApi) -> None:
    from orchestrator.api.strict_json import MAX_JSON_BODY_BYTES

    async def body(api: Api) -> None:
        client = await api.new_client()

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: streamed
            yield b'{"type": "inference", "input": {"texts": ["'
            for _ in range(MAX_JSON_BODY_BYTES // (1 << 20) + 1):
                yield b"x" * (1 << 20)
            yield b'"]}}'

        resp = await api.http.post(
            "/v1/jobs", content=chunks(), headers={**client, "Content-Type": "application/json"}
        )
        assert_problem(resp, 413, "payload_too_large", "/v1/blobs")

    run_api(body)


def test_amounts_past_uint256_are_422_not_500(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        resp = await api.http.post(
            "/v1/jobs",
            json={**inference_spec(), "max_price_wei_per_unit": 10**80},
            headers=client,
        )
        assert_problem(resp, 422, "invalid_input", "max_price_wei_per_unit", "2**256")

    run_api(body)


# --- waiting on a job (long-poll) ------------------------------------------------------------


def test_a_job_long_poll_answers_when_the_state_changes(run_live_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        worker = await api.register_worker()
        job = await api.submit(client)
        url = f"/v1/jobs/{job['id']}"
        waiter = asyncio.create_task(
            api.http.get(url, params={"wait_s": 20, "while_state": "queued"}, headers=client)
        )
        await asyncio.sleep(0.3)
        assert not waiter.done()  # held: nothing has happened to the job yet
        [leased] = await api.lease(worker, wait_s=2)
        resp = await asyncio.wait_for(waiter, 10)  # far inside the 20 s asked for
        assert resp.status_code == 200, resp.text
        # matched, and (the lease marks it running) perhaps already in the worker's hands
        assert resp.json()["state"] in ("assigned", "running")

        # Without while_state it waits for a final state, through "running".
        waiter = asyncio.create_task(api.http.get(url, params={"wait_s": 20}, headers=client))
        resp = await api.http.post(
            f"{url.replace('/v1/jobs', '/v1/workers/jobs')}/start",
            json={"attempt": 1},
            headers=worker.headers,
        )
        assert resp.status_code == 204, resp.text
        await asyncio.sleep(0.3)
        assert not waiter.done()
        resp = await api.complete(worker, leased["job_id"], 1)
        assert resp.status_code == 200, resp.text
        final = await asyncio.wait_for(waiter, 10)
        assert final.json()["state"] == "succeeded"

    run_live_api(body)


def test_a_job_long_poll_times_out_with_the_state_unchanged(run_live_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        job = await api.submit(client)
        resp = await api.http.get(f"/v1/jobs/{job['id']}", params={"wait_s": 0.5}, headers=client)
        assert resp.status_code == 200 and resp.json()["state"] == "queued"
        resp = await api.http.get(f"/v1/jobs/{job['id']}", params={"wait_s": -1}, headers=client)
        assert_problem(resp, 422, "invalid_input", "wait_s")
        resp = await api.http.get(
            f"/v1/jobs/{job['id']}", params={"wait_s": 1, "while_state": "done"}, headers=client
        )
        assert resp.status_code == 422

    run_live_api(body)


def test_a_clients_long_polls_end_when_it_hangs_up(live_services: Services) -> None:
    """A client that closes its connection mid-wait (a timeout, a retry, a program that quit)
    ends its long-poll then, on one job and on many: not ``wait_s`` later, after reading the
    jobs' states every second for no one."""

    async def body(app: Any, api: Api) -> None:
        client = await api.new_client()
        job = await api.submit(client)  # no worker: it stays queued
        key = f"{JOB_KEY_PREFIX}{job['id']}"
        hub = api.services.hub
        for path, body, query in (
            (f"/v1/jobs/{job['id']}", None, "wait_s=5"),
            ("/v1/jobs/wait", {"job_ids": [job["id"]], "wait_s": 5}, ""),
        ):
            hang_up = asyncio.Event()
            poll = asyncio.create_task(
                call_until_hang_up(app, path, body, client, hang_up, query=query)
            )
            await asyncio.wait_for(_until_watched(hub, key), timeout=5)
            hang_up.set()
            answer = await asyncio.wait_for(poll, timeout=3)  # not the 5 s wait_s
            assert answer[0]["status"] == 200, (path, answer)
            assert not hub.watched(key)

    serve_with_app(live_services, body)


async def _until_watched(hub: WakeHub, key: str) -> None:
    while not hub.watched(key):
        await asyncio.sleep(0.01)
