"""Worker routes over HTTP: registration, the lease long-poll, heartbeats, job outcomes."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import httpx
import pytest
from eth_account import Account

from orchestrator.config import Settings
from orchestrator.services.leases import POLL_TTL_S
from orchestrator.store import Store
from orchestrator.wiring import Services, build_services
from protocol.signing import output_sha256, recover_result_signer, sign_registration, sign_result
from tests.api.conftest import (
    TEXTS,
    Api,
    HttpWorker,
    RunApi,
    assert_problem,
    bearer,
    call_until_hang_up,
    serve,
    serve_with_app,
)
from tests.conftest import FakeClock
from tests.support import EMBED_MODEL, completion, offer, register_request

OFFER_PRICE = 100  # wei per text, tests.support.offer()'s default
EMBEDDINGS = {"embeddings": [[0.5, -0.25], [0.125, 1.0]]}
GARBAGE_SIGNATURE = "0x" + "00" * 65


def ref(job_id: str, attempt: int = 1) -> dict[str, Any]:
    return {"job_id": job_id, "attempt": attempt}


async def leased_job(api: Api, worker: HttpWorker) -> tuple[dict[str, str], dict[str, Any]]:
    """A client with one job, leased to ``worker``."""
    client = await api.new_client()
    job = await api.submit(client)
    leased = await api.lease(worker)
    assert [j["job_id"] for j in leased] == [job["id"]]
    return client, leased[0]


# -- registration -----------------------------------------------------------------------------


def test_challenge_then_register_returns_a_session(run_api: RunApi, clock: FakeClock) -> None:
    async def body(api: Api) -> None:
        account = Account.create()
        challenge = await api.challenge(account)
        assert challenge["expires_at"] == "2027-01-15T08:05:00Z"  # challenge_ttl_s = 300
        assert account.address.lower() in challenge["message"]
        assert challenge["nonce"] in challenge["message"]

        req = register_request(account, challenge["nonce"], challenge["message"], gpu_vram_mb=8192)
        resp = await api.http.post("/v1/workers/register", json=req.model_dump(mode="json"))
        assert resp.status_code == 201, resp.text
        session = resp.json()
        assert session["session_token"].startswith("gmw_")
        assert len(session["worker_id"]) == 32
        assert session["lease_ttl_s"] == 30.0
        assert session["heartbeat_interval_s"] == 10.0
        assert session["long_poll_max_s"] == 5.0

        resp = await api.http.post(
            "/v1/workers/heartbeat", json={"jobs": []}, headers=bearer(session["session_token"])
        )
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"cancel": [], "lease_ttl_s": 30.0, "heartbeat_interval_s": 10.0}

        # registering again with the same key keeps the worker id and replaces the token
        again = await api.challenge(account)
        req = register_request(account, again["nonce"], again["message"])
        resp = await api.http.post("/v1/workers/register", json=req.model_dump(mode="json"))
        assert resp.status_code == 201, resp.text
        assert resp.json()["worker_id"] == session["worker_id"]
        resp = await api.http.post(
            "/v1/workers/heartbeat", json={"jobs": []}, headers=bearer(session["session_token"])
        )
        assert_problem(resp, 401, "unauthorized", "unknown or replaced session token")

    run_api(body)


def test_register_with_someone_elses_signature_is_bad_signature(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        account, impostor = Account.create(), Account.create()
        challenge = await api.challenge(account)
        req = register_request(account, challenge["nonce"], challenge["message"])
        req.signature = sign_registration(impostor.key, challenge["message"])
        resp = await api.http.post("/v1/workers/register", json=req.model_dump(mode="json"))
        assert_problem(
            resp,
            422,
            "bad_signature",
            f"made by {impostor.address}",
            f"not {account.address}",
            "sign the challenge message",
        )

    run_api(body)


@pytest.mark.parametrize(
    "signature",
    [
        GARBAGE_SIGNATURE,  # r = s = 0 recovers no key
        "0x" + "ff" * 65,  # r and s past the curve order
        "0x" + "11" * 64 + "05",  # v is neither 27/28 nor 0/1
    ],
)
def test_register_with_an_undecodable_signature_is_bad_signature(
    run_api: RunApi, signature: str
) -> None:
    async def body(api: Api) -> None:
        account = Account.create()
        challenge = await api.challenge(account)
        req = register_request(account, challenge["nonce"], challenge["message"])
        req.signature = signature
        resp = await api.http.post("/v1/workers/register", json=req.model_dump(mode="json"))
        assert_problem(resp, 422, "bad_signature", "signature could not be decoded")

    run_api(body)


def test_register_rejects_reused_expired_or_foreign_challenges(
    run_api: RunApi, clock: FakeClock
) -> None:
    async def body(api: Api) -> None:
        account = Account.create()
        challenge = await api.challenge(account)
        req = register_request(account, challenge["nonce"], challenge["message"])
        first = await api.http.post("/v1/workers/register", json=req.model_dump(mode="json"))
        assert first.status_code == 201, first.text
        reused = await api.http.post("/v1/workers/register", json=req.model_dump(mode="json"))
        assert_problem(reused, 401, "unauthorized", "unknown or used challenge", "/challenge")

        challenge = await api.challenge(account)
        clock.advance(301)
        req = register_request(account, challenge["nonce"], challenge["message"])
        expired = await api.http.post("/v1/workers/register", json=req.model_dump(mode="json"))
        assert_problem(expired, 401, "unauthorized", "challenge expired", "/challenge")

        # a challenge issued to one address cannot register another
        other = Account.create()
        challenge = await api.challenge(account)
        req = register_request(other, challenge["nonce"], challenge["message"])
        foreign = await api.http.post("/v1/workers/register", json=req.model_dump(mode="json"))
        assert_problem(foreign, 401, "unauthorized", "unknown or used challenge")

        req = register_request(other, "never-issued", challenge["message"])
        unknown = await api.http.post("/v1/workers/register", json=req.model_dump(mode="json"))
        assert_problem(unknown, 401, "unauthorized", "unknown or used challenge")

    run_api(body)


@pytest.mark.parametrize(
    ("change", "status", "code", "says"),
    [
        ({"offers": []}, 422, "invalid_input", ["offers", "at least 1 item"]),
        (
            {"offers": [offer("vp9", job_type="transcode").model_dump(mode="json")]},
            422,
            "invalid_input",
            ["offers[0]", "'h264'"],
        ),
        ({"offers": [{"job_type": "inference"}]}, 422, "invalid_input", ["offers.0.model"]),
        ({"max_concurrency": 0}, 422, "invalid_input", ["max_concurrency"]),
        ({"signature": "0x1234"}, 422, "invalid_input", ["signature", "pattern"]),
        ({"gpu": "H100"}, 422, "invalid_input", ["gpu", "Extra inputs are not permitted"]),
    ],
)
def test_register_rejects_bad_fields(
    run_api: RunApi, change: dict[str, Any], status: int, code: str, says: list[str]
) -> None:
    async def body(api: Api) -> None:
        account = Account.create()
        challenge = await api.challenge(account)
        req = register_request(account, challenge["nonce"], challenge["message"])
        resp = await api.http.post(
            "/v1/workers/register", json={**req.model_dump(mode="json"), **change}
        )
        assert_problem(resp, status, code, *says)

    run_api(body)


def test_challenge_needs_an_address(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        resp = await api.http.post("/v1/workers/challenge", json={"address": "0x1234"})
        assert_problem(resp, 422, "invalid_input", "address", "pattern")
        resp = await api.http.post("/v1/workers/challenge", json={})
        assert_problem(resp, 422, "invalid_input", "address: Field required")
        # parsed before any credentials are checked: must not take the process down
        nested = b'{"address": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        resp = await api.http.post(
            "/v1/workers/challenge",
            content=nested,
            headers={"Content-Type": "application/json"},
        )
        assert_problem(resp, 400, "malformed_json", "recursion limit")

    run_api(body)


def test_worker_routes_need_a_worker_session_token(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        job_id = (await api.submit(client))["id"]
        calls: list[tuple[str, dict[str, Any] | None]] = [
            ("/v1/workers/heartbeat", {"jobs": []}),
            ("/v1/workers/lease", {"wait_s": 0}),
            (f"/v1/workers/jobs/{job_id}/start", {"attempt": 1}),
            (f"/v1/workers/jobs/{job_id}/fail", {"attempt": 1, "retryable": True, "reason": "x"}),
            ("/v1/workers/drain", None),
            ("/v1/workers/deregister", None),
        ]
        for path, payload in calls:
            resp = await api.http.post(path, json=payload)
            assert_problem(resp, 401, "unauthorized", "missing credentials")
            resp = await api.http.post(path, json=payload, headers=client)
            assert_problem(resp, 401, "unauthorized", "expected a worker session token")
            resp = await api.http.post(path, json=payload, headers=api.operator)
            assert_problem(resp, 401, "unauthorized", "expected a worker session token")
            resp = await api.http.post(path, json=payload, headers=bearer("gmw_forged"))
            assert_problem(resp, 401, "unauthorized", "unknown or replaced session token")
        assert (await api.job(client, job_id))["state"] == "queued"

    run_api(body)


# -- the lease long-poll (wall clock) ----------------------------------------------------------


def test_lease_long_poll_returns_a_job_submitted_while_it_waits(run_live_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        worker = await api.register_worker()

        async def submit_once_the_worker_listens() -> dict[str, Any]:
            while True:  # the operator view shows free slots while a poll is open
                workers = (await api.http.get("/v1/workers", headers=api.operator)).json()
                if workers[0]["free_slots"] == 1:
                    return await api.submit(client)
                await asyncio.sleep(0.02)

        started = time.monotonic()
        leased, job = await asyncio.wait_for(
            asyncio.gather(api.lease(worker, wait_s=3), submit_once_the_worker_listens()),
            timeout=10,
        )
        assert time.monotonic() - started < 3, "the poll waited out wait_s despite the job"
        assert len(leased) == 1
        got = leased[0]
        assert got["job_id"] == job["id"]
        assert got["attempt"] == 1
        assert got["type"] == "inference" and got["model"] == EMBED_MODEL
        assert got["precision"] == "fp32"
        assert got["input"] == {"texts": TEXTS}
        assert got["input_blob"] is None and got["renditions"] is None
        assert got["price_wei_per_unit"] == str(OFFER_PRICE)
        assert got["deadline_at"] == job["deadline_at"]

        seen = await api.job(client, job["id"])
        assert seen["state"] == "running"
        assert seen["worker_address"] == worker.address
        assert seen["price_wei_per_unit"] == str(OFFER_PRICE)

        # once the poll is over the worker takes no more assignments
        workers = (await api.http.get("/v1/workers", headers=api.operator)).json()
        assert workers[0]["free_slots"] == 0 and workers[0]["running_jobs"] == 1

    run_live_api(body)


def test_lease_long_poll_returns_empty_after_wait_s(run_live_api: RunApi) -> None:
    async def body(api: Api) -> None:
        worker = await api.register_worker()
        started = time.monotonic()
        assert await api.lease(worker, wait_s=1) == []
        assert time.monotonic() - started >= 0.9, "the poll returned before wait_s"

    run_live_api(body)


async def _listening(api: Api, free_slots: int = 1) -> None:
    """Until the operator view shows the worker's open poll (its free slots)."""
    while (await api.http.get("/v1/workers", headers=api.operator)).json()[0][
        "free_slots"
    ] != free_slots:
        await asyncio.sleep(0.02)


def test_a_lease_poll_ends_when_its_worker_hangs_up(live_services: Services) -> None:
    """A worker that closes its connection mid-poll (stopped, killed, its network gone) is no
    longer offered work: its poll ends then, not at ``wait_s``, and a job submitted afterwards
    waits for another worker instead of being handed to a closed connection."""

    async def body(app: Any, api: Api) -> None:
        worker, client = await api.register_worker(), await api.new_client()
        hang_up = asyncio.Event()
        poll = asyncio.create_task(
            call_until_hang_up(
                app, "/v1/workers/lease", {"wait_s": 5, "max_jobs": 1}, worker.headers, hang_up
            )
        )
        await asyncio.wait_for(_listening(api), timeout=5)
        hang_up.set()
        answer = await asyncio.wait_for(poll, timeout=3)  # not the 5 s wait_s
        assert answer[0]["status"] == 200
        workers = (await api.http.get("/v1/workers", headers=api.operator)).json()
        assert workers[0]["free_slots"] == 0
        job = await api.submit(client)
        assert (await api.job(client, job["id"]))["state"] == "queued"

    serve_with_app(live_services, body)


def test_a_stopping_server_answers_its_open_long_polls_at_once(run_live_api: RunApi) -> None:
    """At shutdown (``WakeHub.close``, as ``gpumarket orchestrator serve`` does on SIGTERM) the
    long-polls answer what they have instead of holding the server until its grace period ends:
    a worker's lease (no jobs), a client's wait on one job and on many (still queued)."""

    async def body(api: Api) -> None:
        worker = await api.register_worker(offers=[offer(price=10**6)])  # above the jobs' max
        client = await api.new_client()
        job = await api.submit(client)
        polls = asyncio.gather(
            api.lease(worker, wait_s=5),
            api.http.get(f"/v1/jobs/{job['id']}", params={"wait_s": 5}, headers=client),
            api.http.post(
                "/v1/jobs/wait", json={"job_ids": [job["id"]], "wait_s": 5}, headers=client
            ),
        )
        await asyncio.wait_for(_listening(api), timeout=5)
        await asyncio.sleep(0.1)  # the two client polls are waiting too
        api.services.hub.close()
        leased, one, many = await asyncio.wait_for(polls, timeout=3)  # not the 5 s wait_s
        assert leased == []
        assert one.status_code == 200 and one.json()["state"] == "queued"
        assert many.status_code == 200
        assert [s["state"] for s in many.json()["states"]] == ["queued"]

    run_live_api(body)


def test_lease_rejects_bad_requests(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        worker = await api.register_worker()
        for payload, says in [
            ({"wait_s": 61}, "wait_s"),
            ({"wait_s": -1}, "wait_s"),
            ({"max_jobs": 0}, "max_jobs"),
            ({"max_jobs": 65}, "max_jobs"),
        ]:
            resp = await api.http.post("/v1/workers/lease", json=payload, headers=worker.headers)
            assert_problem(resp, 422, "invalid_input", says)

    run_api(body)


def test_lease_hands_out_only_what_fits_the_worker(run_api: RunApi, clock: FakeClock) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        worker = await api.register_worker(max_concurrency=2)
        jobs = []
        for _ in range(3):
            jobs.append((await api.submit(client))["id"])
            clock.advance(1)
        # the cheapest acceptable price is the offer's; a job capped below it is never matched
        too_cheap = await api.submit(client, max_price_wei_per_unit=str(OFFER_PRICE - 1))

        leased = await api.lease(worker, max_jobs=5)
        assert [j["job_id"] for j in leased] == jobs[:2]  # max_concurrency 2, oldest first
        assert await api.lease(worker, max_jobs=5) == []  # both slots are taken
        assert (await api.job(client, jobs[2]))["state"] == "queued"
        assert (await api.job(client, too_cheap["id"]))["state"] == "queued"

    run_api(body)


# -- heartbeats --------------------------------------------------------------------------------


def test_heartbeat_tells_the_worker_about_a_cancelled_job(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        worker = await api.register_worker()
        client, job = await leased_job(api, worker)
        payload = {"jobs": [ref(job["job_id"])]}

        resp = await api.http.post("/v1/workers/heartbeat", json=payload, headers=worker.headers)
        assert resp.status_code == 200
        assert resp.json()["cancel"] == []

        resp = await api.http.post(f"/v1/jobs/{job['job_id']}/cancel", headers=client)
        assert resp.status_code == 200 and resp.json()["state"] == "cancelled"

        resp = await api.http.post("/v1/workers/heartbeat", json=payload, headers=worker.headers)
        assert resp.status_code == 200
        assert resp.json()["cancel"] == [ref(job["job_id"])]

        # and a result for it is refused
        resp = await api.complete(worker, job["job_id"], 1)
        assert_problem(resp, 409, "conflict", "cancelled", "stop working on it")

        # a job the worker never held is dropped too
        stranger = {"jobs": [ref("0123456789abcdef0123456789abcdef")]}
        resp = await api.http.post("/v1/workers/heartbeat", json=stranger, headers=worker.headers)
        assert resp.json()["cancel"] == stranger["jobs"]

    run_api(body)


def test_heartbeats_keep_a_lease_alive(run_api: RunApi, clock: FakeClock) -> None:
    async def body(api: Api) -> None:
        worker = await api.register_worker()
        client, job = await leased_job(api, worker)
        payload = {"jobs": [ref(job["job_id"])]}
        for _ in range(4):  # 80 s in all, well past one 30 s lease
            clock.advance(20)
            resp = await api.http.post(
                "/v1/workers/heartbeat", json=payload, headers=worker.headers
            )
            assert resp.json()["cancel"] == []
            api.services.leases.sweep(clock())
        assert (await api.job(client, job["job_id"]))["state"] == "running"

        clock.advance(31)  # silence: the sweeper takes the job back
        api.services.leases.sweep(clock())
        seen = await api.job(client, job["job_id"])
        assert (seen["state"], seen["attempt"]) == ("queued", 2)
        assert "lease expired" in seen["history"][-1]["detail"]
        resp = await api.http.post("/v1/workers/heartbeat", json=payload, headers=worker.headers)
        assert resp.json()["cancel"] == [ref(job["job_id"])]

    run_api(body)


# -- start, complete, fail ---------------------------------------------------------------------


def test_start_complete_then_the_client_reads_the_signed_result(
    run_api: RunApi, clock: FakeClock
) -> None:
    async def body(api: Api) -> None:
        worker = await api.register_worker()
        client, job = await leased_job(api, worker)
        job_id = job["job_id"]

        resp = await api.http.post(
            f"/v1/workers/jobs/{job_id}/start", json={"attempt": 1}, headers=worker.headers
        )
        assert resp.status_code == 204 and resp.content == b""
        seen = await api.job(client, job_id)
        assert seen["state"] == "running"
        assert seen["started_at"] == "2027-01-15T08:00:00Z"

        clock.advance(1)
        resp = await api.complete(worker, job_id, 1, EMBEDDINGS)
        assert resp.status_code == 200, resp.text
        result = resp.json()
        digest = output_sha256(EMBEDDINGS)
        assert result == {
            "job_id": job_id,
            "attempt": 1,
            "state": "succeeded",
            "output": EMBEDDINGS,
            "output_blobs": None,
            "output_sha256": digest,
            "signature": result["signature"],
            "worker_address": worker.address,
            "units": len(TEXTS),
            "price_wei_per_unit": str(OFFER_PRICE),
            "prompt_units": 0,
            "prompt_price_wei_per_unit": "0",
            "cost_wei": str(len(TEXTS) * OFFER_PRICE),
            "duration_s": 0.5,
            "energy_j": 2.0,
            "energy_source": "estimate",
            # 2 J at the world-average 475 gCO2/kWh (the worker set no intensity)
            "co2_g": pytest.approx(2.0 / 3_600_000 * 475),
            "verification": None,
            "skipped_renditions": None,
            "batch": None,
        }
        signed = (job_id, 1, digest, len(TEXTS), OFFER_PRICE, result["signature"])
        assert recover_result_signer(*signed) == worker.address

        resp = await api.http.get(f"/v1/jobs/{job_id}/result", headers=client)
        assert resp.status_code == 200, resp.text
        assert resp.json() == result

        seen = await api.job(client, job_id)
        assert seen["state"] == "succeeded"
        assert seen["cost_wei"] == "200" and seen["price_wei_per_unit"] == "100"
        assert seen["finished_at"] == "2027-01-15T08:00:01Z"
        assert [e["state"] for e in seen["history"]] == [
            "queued",
            "assigned",
            "running",
            "succeeded",
        ]

        # a retried completion is answered with the same result; another output is refused
        again = await api.complete(worker, job_id, 1, EMBEDDINGS)
        assert again.status_code == 200 and again.json() == result
        other = await api.complete(worker, job_id, 1, {"embeddings": [[0.0], [0.0]]})
        assert_problem(other, 409, "conflict", "already completed with another output")

        resp = await api.http.post(
            f"/v1/workers/jobs/{job_id}/start", json={"attempt": 1}, headers=worker.headers
        )
        assert_problem(resp, 409, "conflict", "succeeded", "stop working on it")

    run_api(body)


def test_a_worker_cannot_act_on_a_job_leased_to_another(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        holder = await api.register_worker()
        client, job = await leased_job(api, holder)
        job_id = job["job_id"]
        intruder = await api.register_worker()

        resp = await api.http.post(
            f"/v1/workers/jobs/{job_id}/start", json={"attempt": 1}, headers=intruder.headers
        )
        assert_problem(resp, 403, "forbidden", f"job {job_id} is not leased to you")
        resp = await api.complete(intruder, job_id, 1)
        assert_problem(resp, 403, "forbidden", "not leased to you")
        resp = await api.http.post(
            f"/v1/workers/jobs/{job_id}/fail",
            json={"attempt": 1, "retryable": False, "reason": "sabotage"},
            headers=intruder.headers,
        )
        assert_problem(resp, 403, "forbidden", "not leased to you")

        seen = await api.job(client, job_id)
        assert (seen["state"], seen["worker_address"]) == ("running", holder.address)

        resp = await api.http.post(
            "/v1/workers/jobs/0123456789abcdef0123456789abcdef/start",
            json={"attempt": 1},
            headers=intruder.headers,
        )
        assert_problem(resp, 404, "not_found", "no job 0123456789abcdef0123456789abcdef")

    run_api(body)


def _result_body(worker: HttpWorker, job_id: str, **change: Any) -> dict[str, Any]:
    body = completion(
        worker.signer(), job_id, 1, EMBEDDINGS, len(TEXTS), price_wei_per_unit=OFFER_PRICE
    ).model_dump(mode="json")
    return {**body, **change}


@pytest.mark.parametrize(
    ("change", "code", "says"),
    [
        (
            {"signature": sign_result(Account.create().key, "x", 1, "ab" * 32, 2, 1)},
            "bad_signature",
            ["not by this worker's address"],
        ),
        ({"signature": GARBAGE_SIGNATURE}, "bad_signature", ["could not be decoded"]),
        ({"output_sha256": "ab" * 32}, "invalid_input", ["does not match the output"]),
        # Units are signed: a changed figure no longer recovers the worker's address.
        ({"units": 5}, "bad_signature", ["not by this worker's address", "units"]),
        ({"output": None}, "invalid_input", ["exactly one of output or output_blobs"]),
        ({"energy_source": "guess"}, "invalid_input", ["energy_source", "'nvml'"]),
        ({"duration_s": -1}, "invalid_input", ["duration_s"]),
        ({"attempt": 0}, "invalid_input", ["attempt"]),
    ],
)
def test_bad_results_are_refused_and_the_job_stays_leased(
    run_api: RunApi, change: dict[str, Any], code: str, says: list[str]
) -> None:
    async def body(api: Api) -> None:
        worker = await api.register_worker()
        client, job = await leased_job(api, worker)
        resp = await api.http.post(
            f"/v1/workers/jobs/{job['job_id']}/complete",
            json=_result_body(worker, job["job_id"], **change),
            headers=worker.headers,
        )
        assert_problem(resp, 422, code, *says)
        assert (await api.job(client, job["job_id"]))["state"] == "running"

        resp = await api.complete(worker, job["job_id"], 1, EMBEDDINGS)
        assert resp.status_code == 200, resp.text

    run_api(body)


def test_non_finite_numbers_in_a_result_are_refused(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        worker = await api.register_worker()
        client, job = await leased_job(api, worker)
        url = f"/v1/workers/jobs/{job['job_id']}/complete"
        headers = {**worker.headers, "Content-Type": "application/json"}
        valid = _result_body(worker, job["job_id"])
        template = json.dumps({**valid, "output": {"embeddings": [["OUT"]]}, "energy_j": "J"})
        for literal, status, code, says in [
            ("NaN", 400, "malformed_json", "not valid JSON"),  # not JSON at all
            ("1e999", 422, "invalid_input", "finite"),  # JSON, but a float infinity
        ]:
            in_output = template.replace('"OUT"', literal).replace('"J"', "2.0")
            resp = await api.http.post(url, content=in_output, headers=headers)
            assert_problem(resp, status, code, says)

            in_energy = template.replace('"OUT"', "0.5").replace('"J"', literal)
            resp = await api.http.post(url, content=in_energy, headers=headers)
            assert_problem(resp, status, code, says)
        assert (await api.job(client, job["job_id"]))["state"] == "running"

    run_api(body)


def test_a_stale_attempt_cannot_complete(run_api: RunApi, clock: FakeClock) -> None:
    async def body(api: Api) -> None:
        slow = await api.register_worker()
        client, job = await leased_job(api, slow)
        job_id = job["job_id"]

        clock.advance(31)  # the slow worker's lease runs out
        api.services.leases.sweep(clock())
        fast = await api.register_worker()
        retry = await api.lease(fast)
        assert [(j["job_id"], j["attempt"]) for j in retry] == [(job_id, 2)]

        resp = await api.complete(slow, job_id, 1)
        problem = assert_problem(
            resp, 409, "conflict", f"your lease on job {job_id} (attempt 1) is gone", "attempt 2"
        )
        assert problem["current_attempt"] == 2

        resp = await api.complete(fast, job_id, 1)
        problem = assert_problem(
            resp, 409, "conflict", "attempt 1", "stale", "current attempt is 2"
        )
        assert problem["current_attempt"] == 2

        resp = await api.complete(fast, job_id, 2)
        assert resp.status_code == 200, resp.text
        assert resp.json()["attempt"] == 2 and resp.json()["worker_address"] == fast.address
        result = (await api.http.get(f"/v1/jobs/{job_id}/result", headers=client)).json()
        assert (result["attempt"], result["worker_address"]) == (2, fast.address)

    run_api(body)


def test_a_failure_reason_with_a_nul_character_is_refused(run_any_api: RunApi) -> None:
    """A NUL in a worker's failure reason is a 422 naming the field (stored, it was a database
    error on PostgreSQL: a 500); the job stays the worker's to report again."""

    async def body(api: Api) -> None:
        worker = await api.register_worker()
        client, job = await leased_job(api, worker)

        async def give_up(reason: str) -> httpx.Response:
            fail = {"attempt": 1, "retryable": True, "reason": reason}
            path = f"/v1/workers/jobs/{job['job_id']}/fail"
            return await api.http.post(path, json=fail, headers=worker.headers)

        assert_problem(await give_up("CUDA\x00 out of memory"), 422, "invalid_input", "reason")
        resp = await give_up("Traceback:\n  line 1\tCUDA")
        assert resp.status_code == 200, resp.text
        assert (await api.job(client, job["job_id"]))["state"] == "queued"

    run_any_api(body)


def test_fail_retryable_requeues_and_final_fails(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        worker = await api.register_worker()
        client, job = await leased_job(api, worker)
        job_id = job["job_id"]

        resp = await api.http.post(
            f"/v1/workers/jobs/{job_id}/fail",
            json={"attempt": 1, "retryable": True, "reason": "CUDA out of memory"},
            headers=worker.headers,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"job_id": job_id, "state": "queued"}
        seen = await api.job(client, job_id)
        assert (seen["state"], seen["attempt"]) == ("queued", 2)
        assert "CUDA out of memory" in seen["history"][-1]["detail"]
        # the worker that gave it up is not handed the same job again
        assert await api.lease(worker) == []

        other = await api.register_worker()
        assert [j["attempt"] for j in await api.lease(other)] == [2]
        resp = await api.http.post(
            f"/v1/workers/jobs/{job_id}/fail",
            json={"attempt": 2, "retryable": False, "reason": "input is not text"},
            headers=other.headers,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"job_id": job_id, "state": "failed"}
        resp = await api.http.get(f"/v1/jobs/{job_id}/result", headers=client)
        assert_problem(resp, 409, "conflict", "failed", "input is not text", "no result")

        resp = await api.http.post(
            f"/v1/workers/jobs/{job_id}/fail",
            json={"attempt": 2, "retryable": False, "reason": ""},
            headers=other.headers,
        )
        assert_problem(resp, 422, "invalid_input", "reason")

    run_api(body)


# -- leaving -----------------------------------------------------------------------------------


def test_a_draining_worker_gets_no_new_jobs_but_finishes_its_own(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        worker = await api.register_worker(max_concurrency=2)
        client, job = await leased_job(api, worker)

        resp = await api.http.post("/v1/workers/drain", headers=worker.headers)
        assert resp.status_code == 204 and resp.content == b""
        later = await api.submit(client)
        assert await api.lease(worker, max_jobs=2) == []
        assert (await api.job(client, later["id"]))["state"] == "queued"
        listed = (await api.http.get("/v1/workers", headers=api.operator)).json()
        assert listed[0]["status"] == "draining"

        resp = await api.complete(worker, job["job_id"], 1)
        assert resp.status_code == 200, resp.text
        assert (await api.job(client, job["job_id"]))["state"] == "succeeded"

    run_api(body)


def test_deregister_ends_the_session_and_requeues_held_jobs(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        worker = await api.register_worker()
        client, job = await leased_job(api, worker)

        resp = await api.http.post("/v1/workers/deregister", headers=worker.headers)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"requeued_jobs": 1}

        for path, payload in [
            ("/v1/workers/heartbeat", {"jobs": [ref(job["job_id"])]}),
            ("/v1/workers/lease", {"wait_s": 0}),
            ("/v1/workers/deregister", None),
        ]:
            resp = await api.http.post(path, json=payload, headers=worker.headers)
            assert_problem(resp, 401, "unauthorized", "register again")

        seen = await api.job(client, job["job_id"])
        assert (seen["state"], seen["attempt"], seen["worker_address"]) == ("queued", 2, None)
        assert "deregistered" in seen["history"][-1]["detail"]

        successor = await api.register_worker()
        assert [(j["job_id"], j["attempt"]) for j in await api.lease(successor)] == [
            (job["job_id"], 2)
        ]

        listed = (await api.http.get("/v1/workers", headers=api.operator)).json()
        assert [w["address"] for w in listed] == [successor.address]
        resp = await api.http.get(
            "/v1/workers", params={"include_deregistered": "true"}, headers=api.operator
        )
        gone = {w["address"]: w["status"] for w in resp.json()}
        assert gone == {worker.address: "deregistered", successor.address: "registered"}

    run_api(body)


def test_a_lease_poll_longer_than_its_advertisement_is_still_offered_work(
    settings: Settings, sqlite_store: Store
) -> None:
    """A poll renews its worker's advertisement (``POLL_TTL_S`` at a time) while it waits, so
    a job submitted once the first ``POLL_TTL_S`` is over still goes to it, in the same poll."""
    wait_s = POLL_TTL_S + 3
    longer = settings.model_copy(update={"long_poll_max_s": wait_s})
    services = build_services(longer, store=sqlite_store, clock=time.time, rng=random.Random(7))

    async def body(api: Api) -> None:
        worker, client = await api.register_worker(), await api.new_client()
        poll = asyncio.create_task(api.lease(worker, wait_s=wait_s))
        await asyncio.sleep(POLL_TTL_S + 1)
        job = await api.submit(client)
        [leased] = await asyncio.wait_for(poll, timeout=wait_s)
        assert leased["job_id"] == job["id"]

    asyncio.run(serve(services, body))
