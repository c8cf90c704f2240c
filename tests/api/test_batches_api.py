"""Batches over HTTP, on SQLite and PostgreSQL: submit many, wait on many, complete many
under one signature (exactly once per job), and a lease that marks its jobs running."""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import func, select

from orchestrator.services import result_batches
from orchestrator.store import engine
from orchestrator.store.models import Job, JobEvent, ResultBatch
from orchestrator.wiring import Services
from protocol.signing import (
    ResultTree,
    output_sha256,
    recover_job_result_signer,
    result_hash,
    root_from_path,
    sign_result_batch,
    sign_result_list,
)
from tests.api.conftest import Api, RunApi, assert_problem, serve
from tests.api.conftest import inference_spec as spec
from tests.conftest import FakeClock
from tests.support import offer

PRICE_WEI = 100  # per text, the worker's offer


def one_text(text: str, **overrides: Any) -> dict[str, Any]:
    return spec(input={"texts": [text]}, **overrides)


def batch_item(
    job: dict[str, Any], *, attempt: int | None = None, units: int = 1
) -> dict[str, Any]:
    output = {"embeddings": [[0.5, -0.25]] * units}
    return {
        "job_id": job["job_id"],
        "attempt": attempt or job["attempt"],
        "output": output,
        "output_sha256": output_sha256(output),
        "price_wei_per_unit": job["price_wei_per_unit"],
        "prompt_price_wei_per_unit": job.get("prompt_price_wei_per_unit", "0"),
        "duration_s": 0.1,
        "energy_j": 1.0,
        "energy_source": "estimate",
        "units": units,
    }


def signed(items: list[dict[str, Any]], account: LocalAccount) -> dict[str, Any]:
    hashes = [
        result_hash(
            i["job_id"],
            i["attempt"],
            i["output_sha256"],
            i["units"],
            int(i["price_wei_per_unit"]),
            prompt_units=int(i.get("prompt_units", 0)),
            prompt_price_wei_per_unit=int(i.get("prompt_price_wei_per_unit", 0)),
        )
        for i in items
    ]
    return {"results": items, "signature": sign_result_batch(account.key, hashes)}


async def post_batch(api: Api, client: dict[str, str], jobs: list[dict[str, Any]]) -> list[Any]:
    resp = await api.http.post("/v1/jobs/batch", json={"jobs": jobs}, headers=client)
    assert resp.status_code == 200, resp.text
    items: list[Any] = resp.json()["jobs"]
    assert len(items) == len(jobs)
    return items


def test_batch_submit_answers_each_job_or_its_own_error(run_any_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        jobs = [
            one_text("one", idempotency_key="k1"),
            one_text("two", model="no-such-model"),
            one_text("three", idempotency_key="k1"),  # the key again, another request
            one_text("one", idempotency_key="k1"),  # the key again, the same request
            one_text("four"),
        ]
        items = await post_batch(api, client, jobs)
        first, unknown, clash, same, fourth = items
        assert first["created"] and first["job"]["state"] == "queued" and first["error"] is None
        assert first["job"]["idempotency_key"] == "k1"
        assert "no worker that offers inference/all-MiniLM-L6-v2" in first["job"]["waiting_reason"]
        assert unknown["job"] is None and unknown["error"]["status"] == 422
        assert "unknown inference model 'no-such-model'" in unknown["error"]["detail"]
        assert clash["job"] is None and clash["error"]["status"] == 409
        assert "idempotency key 'k1' was already used" in clash["error"]["detail"]
        assert same["created"] is False and same["job"]["id"] == first["job"]["id"]
        assert fourth["created"] and fourth["job"]["id"] != first["job"]["id"]
        # Each answer shows the job as the store has it (read back, nothing changed since).
        for made in (first, fourth):
            assert made["job"] == await api.job(client, made["job"]["id"])

        # The same batch again: nothing new; each key names the job it made.
        again = await post_batch(api, client, jobs)
        assert again[0]["created"] is False and again[0]["job"]["id"] == first["job"]["id"]
        assert again[2]["error"]["status"] == 409
        assert again[4]["created"] is True  # no key: a new job, as a single submit makes
        listed = (await api.http.get("/v1/jobs", headers=client)).json()["jobs"]
        assert len(listed) == 3

        # Refused whole: no jobs, too many, a bad field (the index says which).
        resp = await api.http.post("/v1/jobs/batch", json={"jobs": []}, headers=client)
        assert_problem(resp, 422, "invalid_input", "jobs")
        resp = await api.http.post(
            "/v1/jobs/batch", json={"jobs": [one_text("x"), {"type": "inference"}]}, headers=client
        )
        body_ = assert_problem(resp, 422, "invalid_input", "jobs.1")
        assert body_["status"] == 422
        resp = await api.http.post("/v1/jobs/batch", json={"jobs": [one_text("x")]})
        assert_problem(resp, 401, "unauthorized")

    run_any_api(body)


def test_wait_returns_many_jobs_and_their_results_in_one_answer(
    run_any_api: RunApi, clock: FakeClock
) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        worker = await api.register_worker([offer(price=PRICE_WEI)], max_concurrency=8)
        items = await post_batch(api, client, [one_text(f"t{i}") for i in range(3)])
        ids = [i["job"]["id"] for i in items]

        resp = await api.http.post("/v1/jobs/wait", json={"job_ids": ids}, headers=client)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {
            "states": [{"id": i, "state": "queued"} for i in ids],
            "jobs": [],
            "results": [],
        }

        leased = await api.lease(worker, max_jobs=8)
        assert sorted(j["job_id"] for j in leased) == sorted(ids)
        # The lease is the start: running without a /start call, visible to the client.
        resp = await api.http.post("/v1/jobs/wait", json={"job_ids": ids}, headers=client)
        assert {j["state"] for j in resp.json()["states"]} == {"running"}
        for job_id in ids:
            assert (await api.job(client, job_id))["started_at"] is not None
        await api.http.post(f"/v1/jobs/{ids[2]}/cancel", headers=client)
        leased = [j for j in leased if j["job_id"] != ids[2]]

        done = signed([batch_item(j) for j in leased[:2]], worker.account)
        resp = await api.http.post("/v1/workers/results", json=done, headers=worker.headers)
        assert resp.status_code == 200, resp.text

        resp = await api.http.post(
            "/v1/jobs/wait", json={"job_ids": ids, "wait_s": 5}, headers=client
        )
        answer = resp.json()
        states = {j["id"]: j["state"] for j in answer["states"]}
        assert [states[i] for i in ids].count("succeeded") == 2
        assert states[ids[2]] == "cancelled"
        # each final job once: a result if it succeeded, else its view (why it ended)
        assert {r["job_id"] for r in answer["results"]} == {j["job_id"] for j in leased[:2]}
        assert [(j["id"], j["state"]) for j in answer["jobs"]] == [(ids[2], "cancelled")]
        # without results, succeeded jobs come as views too
        resp = await api.http.post(
            "/v1/jobs/wait", json={"job_ids": ids, "results": False}, headers=client
        )
        assert resp.json()["results"] == [] and len(resp.json()["jobs"]) == 3

        # Someone else's job is not found, and neither is a made-up one.
        other = await api.new_client("other")
        resp = await api.http.post("/v1/jobs/wait", json={"job_ids": ids}, headers=other)
        assert_problem(resp, 404, "not_found", "3 of the job_ids", ids[0])
        resp = await api.http.post(
            "/v1/jobs/wait", json={"job_ids": ["../etc/passwd"]}, headers=client
        )
        assert_problem(resp, 422, "invalid_input", "not a job id")

    run_any_api(body)


def test_batch_completion_is_exactly_once_per_job_and_proves_each_result(
    run_any_api: RunApi, clock: FakeClock
) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        worker = await api.register_worker([offer(price=PRICE_WEI)], max_concurrency=8)
        stale_job = (await post_batch(api, client, [one_text("slow")]))[0]["job"]
        (stale,) = await api.lease(worker, max_jobs=8)
        clock.advance(31)  # the lease runs out: the job goes back to the queue, attempt 2
        api.services.leases.sweep(clock())
        ids = [
            i["job"]["id"] for i in await post_batch(api, client, [one_text("a"), one_text("b")])
        ]
        live = await api.lease(worker, max_jobs=8)
        # the two new ones (the stale job waits a lease's time before it comes back to us)
        assert sorted(j["job_id"] for j in live) == sorted(ids)
        fresh = live

        items = [batch_item(j) for j in fresh] + [batch_item(stale)]
        request = signed(items, worker.account)
        resp = await api.http.post("/v1/workers/results", json=request, headers=worker.headers)
        assert resp.status_code == 200, resp.text
        outcomes = resp.json()["results"]
        assert [o["job_id"] for o in outcomes] == [i["job_id"] for i in items]
        assert all(o["error"] is None for o in outcomes[:2])
        assert outcomes[0] == {
            "job_id": items[0]["job_id"],
            "state": "succeeded",
            "cost_wei": str(PRICE_WEI),
            "error": None,
        }
        assert outcomes[2]["state"] is None and outcomes[2]["error"]["status"] == 409
        assert "attempt 1" in outcomes[2]["error"]["detail"]
        assert outcomes[2]["job_id"] == stale_job["id"]

        # Each result proves itself: its hash leads along its path to the signed root.
        result = (await api.http.get(f"/v1/jobs/{ids[0]}/result", headers=client)).json()
        proof = result["batch"]
        assert result["signature"] == proof["signature"] == request["signature"]
        assert proof["index"] == [i["job_id"] for i in items].index(ids[0])
        assert proof["scheme"] == "merkle" and proof["result_hashes"] is None
        assert proof["count"] == 3 and len(proof["path"]) == 2  # of 3: two hashes
        signer = recover_job_result_signer(
            ids[0],
            1,
            result["output_sha256"],
            result["units"],
            int(result["price_wei_per_unit"]),
            proof["signature"],
            index=proof["index"],
            batch_count=proof["count"],
            batch_path=proof["path"],
        )
        assert signer == worker.address
        assert result["cost_wei"] == str(PRICE_WEI)

        def snapshot() -> tuple[int, int, int]:
            with api.services.store.read() as s:
                return (
                    s.scalar(select(func.count()).select_from(JobEvent)) or 0,
                    s.scalar(select(func.count()).select_from(ResultBatch)) or 0,
                    s.scalar(select(func.count()).where(Job.state == "succeeded")) or 0,
                )

        before = snapshot()
        assert before[1:] == (1, 2)
        # Replaying the batch, or one job of it alone, changes nothing and answers the same.
        resp = await api.http.post("/v1/workers/results", json=request, headers=worker.headers)
        assert resp.json()["results"][0] == outcomes[0]
        assert resp.json()["results"][2]["error"]["status"] == 409
        alone = signed([items[1]], worker.account)
        resp = await api.http.post("/v1/workers/results", json=alone, headers=worker.headers)
        assert resp.json()["results"][0] == outcomes[1]
        proof = (await api.http.get(f"/v1/jobs/{ids[1]}/result", headers=client)).json()["batch"]
        assert proof["signature"] == request["signature"]  # still the first report's
        assert snapshot() == before
        # The same job with another output: refused, the first stays.
        other = {**items[0], "output": {"embeddings": [[1.0]]}}
        other["output_sha256"] = output_sha256(other["output"])
        resp = await api.http.post(
            "/v1/workers/results", json=signed([other], worker.account), headers=worker.headers
        )
        assert resp.json()["results"][0]["error"]["status"] == 409
        assert snapshot() == before

    run_any_api(body)


def test_a_batch_records_each_result_as_a_lone_completion_does(
    run_any_api: RunApi, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's plain results are recorded set-based (one UPDATE of the batch's jobs); what
    they leave in the store is what ``complete`` leaves for the same result, column by
    column, with the same history."""
    updated: list[list[str]] = []

    def update_rows(connection: Any, model: Any, rows: list[dict[str, Any]]) -> None:
        updated.append([row["id"] for row in rows])
        engine.update_rows(connection, model, rows)

    monkeypatch.setattr(result_batches, "update_rows", update_rows)

    async def body(api: Api) -> None:
        client = await api.new_client()
        worker = await api.register_worker([offer(price=PRICE_WEI)], max_concurrency=8)
        jobs = [one_text(t) for t in ("alone", "in a batch", "beside it")]
        await post_batch(api, client, jobs)
        leased = {j["job_id"]: j for j in await api.lease(worker, max_jobs=8)}
        alone, *batched = sorted(leased)
        clock.advance(2.5)
        resp = await api.complete(worker, alone, 1, units=1)
        assert resp.status_code == 200, resp.text
        items = [
            {**batch_item(leased[job_id]), "duration_s": 0.5, "energy_j": 2.0} for job_id in batched
        ]
        resp = await api.http.post(
            "/v1/workers/results", json=signed(items, worker.account), headers=worker.headers
        )
        assert [r["state"] for r in resp.json()["results"]] == ["succeeded"] * 2, resp.text
        assert updated == [batched]  # both set-based, in one UPDATE

        differ = {"id", "request_hash", "spec", "signature", "result_batch_id"}
        differ |= {"result_batch_index"}
        with api.services.store.read() as s:
            rows = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(leased)))}
            history = {
                job_id: [
                    (e.attempt, e.state, e.worker_id, e.at)
                    for e in s.scalars(
                        select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
                    )
                ]
                for job_id in leased
            }
        columns = [c.key for c in Job.__table__.columns if c.key not in differ]
        expected = {c: getattr(rows[alone], c) for c in columns}
        assert expected["state"] == "succeeded" and expected["cost_wei"] == PRICE_WEI
        for job_id in batched:
            assert {c: getattr(rows[job_id], c) for c in columns} == expected
            assert history[job_id] == history[alone]
            assert rows[job_id].result_batch_index == batched.index(job_id)
        assert rows[batched[0]].result_batch_id == rows[batched[1]].result_batch_id
        assert rows[alone].result_batch_id is None

    run_any_api(body)


def test_a_worker_that_signs_a_batchs_list_is_still_taken_and_proven(
    run_any_api: RunApi,
) -> None:
    """A worker from before the Merkle root signs its batch over the list of result hashes:
    the batch is taken, kept as a "list" batch, and each result's proof is that list (its
    hash at its index), as results stored before the change are proven."""

    async def body(api: Api) -> None:
        client = await api.new_client()
        worker = await api.register_worker([offer(price=PRICE_WEI)], max_concurrency=8)
        await post_batch(api, client, [one_text("a"), one_text("b")])
        items = [batch_item(j) for j in await api.lease(worker, max_jobs=8)]
        merkle = signed(items, worker.account)
        request = {
            "results": items,
            "signature": sign_result_list(
                worker.account.key,
                [result_hash(i["job_id"], 1, i["output_sha256"], 1, PRICE_WEI) for i in items],
            ),
        }
        assert request["signature"] != merkle["signature"]
        resp = await api.http.post("/v1/workers/results", json=request, headers=worker.headers)
        assert [r["state"] for r in resp.json()["results"]] == ["succeeded"] * 2, resp.text
        for index, item in enumerate(items):
            result = (
                await api.http.get(f"/v1/jobs/{item['job_id']}/result", headers=client)
            ).json()
            proof = result["batch"]
            assert proof["scheme"] == "list" and proof["path"] is None
            assert proof["index"] == index and proof["count"] == 2
            signer = recover_job_result_signer(
                item["job_id"],
                1,
                result["output_sha256"],
                1,
                PRICE_WEI,
                proof["signature"],
                proof["result_hashes"],
                proof["index"],
            )
            assert signer == worker.address
        with api.services.store.read() as s:
            assert s.scalars(select(ResultBatch.scheme)).all() == ["list"]

    run_any_api(body)


def test_batch_completion_refuses_a_bad_signature_whole_and_bad_items_alone(
    run_any_api: RunApi,
) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        worker = await api.register_worker([offer(price=PRICE_WEI)], max_concurrency=8)
        await post_batch(api, client, [one_text("a"), one_text("bb"), one_text("c")])
        leased = await api.lease(worker, max_jobs=8)
        items = [batch_item(j) for j in leased]

        forged = signed(items, Account.create())
        resp = await api.http.post("/v1/workers/results", json=forged, headers=worker.headers)
        assert_problem(resp, 422, "bad_signature", "not by this worker's address")
        reordered = {**signed(items, worker.account), "results": items[::-1]}
        resp = await api.http.post("/v1/workers/results", json=reordered, headers=worker.headers)
        assert_problem(resp, 422, "bad_signature")
        resp = await api.http.post(
            "/v1/workers/results",
            json=signed([items[0], items[0]], worker.account),
            headers=worker.headers,
        )
        assert_problem(resp, 422, "invalid_input", "listed twice")

        cheap = {**items[0], "price_wei_per_unit": "1"}  # signed, but not the leased price
        greedy = {**items[1], "units": 5, "output": {"embeddings": [[0.5]] * 5}}
        greedy["output_sha256"] = output_sha256(greedy["output"])
        resp = await api.http.post(
            "/v1/workers/results",
            json=signed([cheap, greedy, items[2]], worker.account),
            headers=worker.headers,
        )
        first, second, third = resp.json()["results"]
        assert first["error"]["status"] == 422 and "leased at 100" in first["error"]["detail"]
        assert (
            second["error"]["status"] == 422
            and "report and sign units=1" in (second["error"]["detail"])
        )
        assert third["state"] == "succeeded" and third["error"] is None
        states = {}
        for j in leased:
            states[j["job_id"]] = (await api.job(client, j["job_id"]))["state"]
        # the mispriced one is still the worker's to report; the misbilled one went back
        assert states[items[0]["job_id"]] == "running"
        assert states[items[1]["job_id"]] == "queued"

    run_any_api(body)


@pytest.fixture
def verifying_services(tmp_path: Any, sqlite_store: Any, clock: FakeClock) -> Services:
    from orchestrator.config import Settings
    from orchestrator.wiring import build_services

    settings = Settings(
        data_dir=tmp_path / "data",
        admin_token="operator-token-for-tests-0123456789abcdef",
        long_poll_max_s=5.0,
        verify_rate=1.0,  # every result is checked
        verify_timeout_s=120.0,
    )
    return build_services(settings, store=sqlite_store, clock=clock, rng=random.Random(7))


class CountingRandom(random.Random):
    """Counts the draws made of it."""

    draws = 0

    def random(self) -> float:
        self.draws += 1
        return super().random()


def test_each_job_of_a_batch_is_sampled_and_checked_on_its_own(
    verifying_services: Services,
) -> None:
    rng = CountingRandom(7)
    verifying_services.verification._rng = rng

    async def body(api: Api) -> None:
        client = await api.new_client()
        first = await api.register_worker([offer(price=PRICE_WEI)], max_concurrency=8)
        items = await post_batch(api, client, [one_text("a"), one_text("b")])
        ids = [i["job"]["id"] for i in items]
        leased = await api.lease(first, max_jobs=8)
        # Another worker is there to check: each job is sampled (rate 1.0) on its own.
        second = await api.register_worker([offer(price=PRICE_WEI)], max_concurrency=8)
        resp = await api.http.post(
            "/v1/workers/results",
            json=signed([batch_item(j) for j in leased], first.account),
            headers=first.headers,
        )
        assert [r["state"] for r in resp.json()["results"]] == ["verifying"] * 2
        assert rng.draws == 2  # one draw per result (the set-based path's, not again)

        # The other worker runs the two checks and reports them in one batch too: they agree.
        checks = await api.lease(second, max_jobs=8)
        assert len(checks) == 2 and not {c["job_id"] for c in checks} & set(ids)
        resp = await api.http.post(
            "/v1/workers/results",
            json=signed([batch_item(c) for c in checks], second.account),
            headers=second.headers,
        )
        assert all(r["error"] is None for r in resp.json()["results"]), resp.text
        for job_id in ids:
            job = await api.job(client, job_id)
            assert job["state"] == "succeeded"
            assert job["verification"]["status"] == "passed", job["verification"]
            assert job["cost_wei"] == str(PRICE_WEI)

    asyncio.run(serve(verifying_services, body))


def test_a_jobs_result_is_proven_alone_or_by_its_place_in_a_batch() -> None:
    from protocol.signing import recover_job_result_signer, sign_result

    account = Account.create()
    digest = output_sha256({"embeddings": [[1.0]]})
    alone = sign_result(account.key, "j1", 1, digest, 1, PRICE_WEI)
    assert recover_job_result_signer("j1", 1, digest, 1, PRICE_WEI, alone) == account.address
    hashes = [result_hash(j, 1, digest, 1, PRICE_WEI) for j in ("j0", "j1", "j2")]
    together = sign_result_batch(account.key, hashes)
    tree = ResultTree(hashes)

    def signer(job_id: str, index: int, price: int = PRICE_WEI, **proof: Any) -> str:
        given = {"index": index, "batch_count": 3, "batch_path": tree.path(index)}
        return recover_job_result_signer(
            job_id, 1, digest, 1, price, together, **{**given, **proof}
        )

    assert all(signer(f"j{i}", i) == account.address for i in range(3))
    assert signer("j1", 0) != account.address  # another place, another root
    assert signer("j1", 1, PRICE_WEI + 1) != account.address  # another price, another hash
    assert signer("j1", 1, batch_count=4) != account.address  # the count is signed too
    with pytest.raises(ValueError, match="too long"):
        signer("j2", 2, batch_path=tree.path(1))  # j2 goes up alone: one hash on its path
    with pytest.raises(ValueError, match="too short"):
        signer("j1", 1, batch_path=[])
    with pytest.raises(ValueError, match="outside"):
        signer("j1", 3)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 13, 256])
def test_a_batch_tree_proves_each_of_its_results_in_log2_hashes(count: int) -> None:
    """Every result of a batch of any size leads to the root along its path, of at most
    ceil(log2(count)) hashes; a path never proves another result or another place."""
    hashes = [result_hash(f"job{i}", 1, "ab" * 32, 1, PRICE_WEI) for i in range(count)]
    tree = ResultTree(hashes)
    assert len(set(tree.levels[0])) == count
    for index, mine in enumerate(hashes):
        path = tree.path(index)
        assert len(path) <= math.ceil(math.log2(count))
        assert root_from_path(mine, index, count, path) == tree.root
        other = hashes[(index + 1) % count]
        if count > 1:
            assert root_from_path(other, index, count, path) != tree.root
    assert ResultTree(hashes[:1]).root == hashes[0]
