"""The operator dashboard: GET /v1/dashboard's figures against jobs run through the API, and
the page at / with its assets."""

from __future__ import annotations

from typing import Any

from orchestrator.services.dashboard import hardware_summary
from orchestrator.store.models import LedgerEntry, Redemption
from orchestrator.wiring import Services
from tests.api.conftest import TEXTS, Api, RunApi, assert_problem, bearer
from tests.conftest import FakeClock
from tests.support import hardware, offer

PRICE = 100  # wei per text, tests.support.offer()'s default
BUCKET_S = 60


async def _dashboard(api: Api, **params: Any) -> dict[str, Any]:
    resp = await api.http.get("/v1/dashboard", params=params, headers=api.operator)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def test_dashboard_needs_the_operator_token(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        worker = await api.register_worker()
        resp = await api.http.get("/v1/dashboard")
        assert_problem(resp, 401, "unauthorized", "missing credentials")
        for headers in [client, worker.headers, bearer("operator-token-guess")]:
            resp = await api.http.get("/v1/dashboard", headers=headers)
            assert_problem(resp, 401, "unauthorized", "operator token")

    run_api(body)


def test_empty_market_has_empty_tables_and_zero_series(run_api: RunApi, clock: FakeClock) -> None:
    async def body(api: Api) -> None:
        board = await _dashboard(api)
        assert board["workers"] == [] and board["jobs"] == []
        assert board["payments"] is False
        totals = board["totals"]
        assert totals["workers_registered"] == 0 and totals["workers_online"] == 0
        assert set(totals["jobs_by_state"].values()) == {0}
        for key in ("wei_billed_total", "wei_settled_total", "wei_redeemed_total"):
            assert totals[key] == "0"
        series = board["series"]
        assert series["bucket_s"] == BUCKET_S and len(series["buckets"]) == 30  # 30 min default
        assert all(b["jobs_succeeded"] == 0 and b["wei_settled"] == "0" for b in series["buckets"])
        # buckets are aligned to the minute, the last one holds now
        last = series["buckets"][-1]["start"]
        assert board["generated_at"] == "2027-01-15T08:00:00Z" == last
        # no generation yet: zeros and nulls (never NaN), over the series' window
        assert board["generation"] == {
            "since": series["buckets"][0]["start"],
            "jobs": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "completion_tokens_per_s": None,
            "first_token_jobs": 0,
            "first_token_p50_s": None,
            "first_token_p99_s": None,
        }

    run_api(body)


def test_figures_match_the_jobs_run_through_the_api(run_api: RunApi, clock: FakeClock) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        gpu = await api.register_worker(max_concurrency=4, gpu_vram_mb=24_576)
        cpu = await api.register_worker(offers=[offer(price=7)])
        # two jobs on the GPU worker, 3 s and 5 s after submission, in the first minute
        done = []
        for wait_s in (3, 5):
            job = await api.submit(client)
            assert [j["job_id"] for j in await api.lease(gpu)] == [job["id"]]
            clock.advance(wait_s)
            assert (await api.complete(gpu, job["id"], 1)).status_code == 200
            done.append(await api.job(client, job["id"]))
        # a minute later: one on the CPU worker, and one it fails for good
        clock.advance(BUCKET_S)
        job = await api.submit(client)
        assert [j["job_id"] for j in await api.lease(cpu)] == [job["id"]]
        assert (await api.complete(cpu, job["id"], 1)).status_code == 200
        done.append(await api.job(client, job["id"]))
        failing = await api.submit(client)
        assert [j["job_id"] for j in await api.lease(cpu)] == [failing["id"]]
        resp = await api.http.post(
            f"/v1/workers/jobs/{failing['id']}/fail",
            json={"attempt": 1, "retryable": False, "reason": "input is not text"},
            headers=cpu.headers,
        )
        assert resp.status_code == 200, resp.text
        clock.advance(1)
        queued = await api.submit(client)  # nobody is polling: it waits

        board = await _dashboard(api)
        stats = (await api.http.get("/v1/stats", headers=api.operator)).json()
        costs = [int(j["cost_wei"]) for j in done]
        assert costs == [len(TEXTS) * PRICE] * 2 + [len(TEXTS) * 7]

        totals = board["totals"]
        assert totals["jobs_by_state"] == stats["jobs_by_state"]
        assert totals["jobs_by_state"]["succeeded"] == 3
        assert totals["jobs_by_state"]["failed"] == 1 and totals["queue_depth"] == 1
        # the GPU worker was last heard from over a lease (30 s) ago
        assert totals["workers_registered"] == 2 and totals["workers_online"] == 1
        assert totals["workers_online"] == stats["workers_online"]
        assert totals["wei_billed_total"] == str(sum(costs)) == stats["wei_earned_total"]
        assert totals["energy_j_total"] == stats["energy_j_total"] == 3 * 2.0
        assert totals["wei_settled_total"] == "0" and totals["ledger_entries"] == 0

        by_id = {w["id"]: w for w in board["workers"]}
        g, c = by_id[gpu.worker_id], by_id[cpu.worker_id]
        assert [w["id"] for w in board["workers"]] == [gpu.worker_id, cpu.worker_id]
        assert g["hardware_summary"] == "Test GPU (24 GiB)"
        assert (g["gpu_name"], g["gpu_count"], g["vram_mb"]) == ("Test GPU", 1, 24_576)
        assert c["hardware_summary"] == "test cpu (2 cores)" and c["gpu_name"] is None
        assert (g["jobs_succeeded"], g["jobs_failed"]) == (2, 0)
        assert (c["jobs_succeeded"], c["jobs_failed"]) == (1, 1)
        assert g["billed_wei"] == str(costs[0] + costs[1]) and c["billed_wei"] == str(costs[2])
        assert (g["running_jobs"], g["max_concurrency"], g["load"]) == (0, 4, 0.0)
        assert (g["online"], g["status"]) == (False, "offline")
        assert (c["online"], c["status"]) == (True, "registered")
        views = {
            w["id"]: w for w in (await api.http.get("/v1/workers", headers=api.operator)).json()
        }
        assert g["reputation"] == views[gpu.worker_id]["reputation"]
        assert c["reputation"] == views[cpu.worker_id]["reputation"]

        jobs = {j["id"]: j for j in board["jobs"]}
        assert len(jobs) == 5
        assert board["jobs"][0]["id"] == queued["id"]  # most recently changed first
        first, second = jobs[done[0]["id"]], jobs[done[1]["id"]]
        assert first["state"] == "succeeded" and first["worker_id"] == gpu.worker_id
        assert first["worker_address"] == gpu.address
        assert (first["latency_s"], second["latency_s"]) == (3.0, 5.0)
        assert first["cost_wei"] == str(costs[0]) and first["units"] == len(TEXTS)
        assert (first["energy_j"], first["energy_source"]) == (2.0, "estimate")
        assert jobs[failing["id"]]["state"] == "failed"
        assert jobs[failing["id"]]["cost_wei"] is None
        assert jobs[queued["id"]]["latency_s"] is None and jobs[queued["id"]]["worker_id"] is None

        # the series: two in the first minute, one success and one failure in the next
        active = [b for b in board["series"]["buckets"] if b["jobs_succeeded"] or b["jobs_failed"]]
        assert [(b["jobs_succeeded"], b["jobs_failed"], b["wei_billed"]) for b in active] == [
            (2, 0, str(costs[0] + costs[1])),
            (1, 1, str(costs[2])),
        ]
        assert board["series"]["buckets"][-1] == active[-1]

        # a narrower window leaves the first minute out; the recent list can be capped
        board = await _dashboard(api, minutes=1, bucket_s=30, jobs=2)
        assert len(board["series"]["buckets"]) == 2 and len(board["jobs"]) == 2
        assert sum(b["jobs_succeeded"] for b in board["series"]["buckets"]) == 1

    run_api(body)


def test_ledger_and_redemptions_are_summed_exactly(
    run_api: RunApi, services: Services, clock: FakeClock
) -> None:
    """Wei past 2**64 (text on SQLite) add up exactly, per worker and per bucket."""
    big = 2**70 + 1

    async def body(api: Api) -> None:
        client = await api.new_client()
        worker = await api.register_worker()
        job = await api.submit(client)
        await api.lease(worker)
        assert (await api.complete(worker, job["id"], 1)).status_code == 200
        payer = "0x" + "ab" * 20
        now = services.now()
        with services.store.transaction() as s:
            s.add(
                LedgerEntry(
                    job_id=job["id"],
                    attempt=1,
                    payer=payer,
                    payee=worker.address,
                    amount_wei=big,
                    created_at=now,
                )
            )
            s.add(
                LedgerEntry(
                    job_id=job["id"],
                    attempt=2,
                    payer=payer,
                    payee=worker.address,
                    amount_wei=big,
                    created_at=now - 2 * BUCKET_S,
                )
            )
            for log_index, confirmed in [(0, True), (1, False)]:  # unconfirmed: not counted
                s.add(
                    Redemption(
                        tx_hash="0x" + "01" * 32,
                        log_index=log_index,
                        payer=payer,
                        payee=worker.address,
                        cumulative_wei=big * (1 + log_index),
                        paid_wei=big - 5,
                        fee_wei=5,
                        block_number=1 + log_index,
                        block_hash="0x" + f"{log_index:02x}" * 32,
                        confirmed=confirmed,
                    )
                )

        board = await _dashboard(api)
        [w] = board["workers"]
        assert w["settled_wei"] == str(2 * big) == board["totals"]["wei_settled_total"]
        assert w["redeemed_wei"] == str(big - 5) == board["totals"]["wei_redeemed_total"]
        assert board["totals"]["ledger_entries"] == 2
        settled = [b["wei_settled"] for b in board["series"]["buckets"]]
        assert settled[-1] == str(big) and settled[-3] == str(big)
        assert sum(int(v) for v in settled) == 2 * big

    run_api(body)


def test_window_and_bucket_limits_are_checked(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        resp = await api.http.get("/v1/dashboard?minutes=0", headers=api.operator)
        assert_problem(resp, 422, "invalid_input", "minutes")
        resp = await api.http.get("/v1/dashboard?minutes=1440&bucket_s=1", headers=api.operator)
        assert_problem(resp, 422, "invalid_input", "86400 buckets", "widen bucket_s")

    run_api(body)


def test_page_and_assets_are_served_without_credentials(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        resp = await api.http.get("/")
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/html")
        assert '<script src="/dashboard/app.js"' in resp.text
        assert 'href="/dashboard/app.css"' in resp.text
        assert 'id="token-form"' in resp.text and 'id="error"' in resp.text
        csp = resp.headers["content-security-policy"]
        assert "connect-src 'self'" in csp and "script-src 'self'" in csp  # no CDN, no inline

        script = await api.http.get("/dashboard/app.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert "/v1/dashboard" in script.text and "sessionStorage" in script.text
        style = await api.http.get("/dashboard/app.css")
        assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")

        for name in ("nope.js", "..%2Fapp.py", "index.html"):
            resp = await api.http.get(f"/dashboard/{name}")
            assert_problem(resp, 404, "not_found")

        schema = (await api.http.get("/openapi.json")).json()
        assert "/" not in schema["paths"] and "/dashboard/{name}" not in schema["paths"]
        assert "get" in schema["paths"]["/v1/dashboard"]
        wei = schema["components"]["schemas"]["DashboardTotals"]["properties"]["wei_settled_total"]
        assert wei["type"] == "string"

    run_api(body)


def test_hardware_summary_reads_like_a_spec_sheet() -> None:
    assert hardware_summary(hardware()) == "test cpu (2 cores)"
    assert hardware_summary(hardware(81_920)) == "Test GPU (80 GiB)"
    assert hardware_summary(hardware(81_559)) == "Test GPU (79.6 GiB)"  # an H100 as NVML has it
    two = hardware(16_384).model_copy(
        update={"gpus": [*hardware(16_384).gpus, *hardware(8_192).gpus]}
    )
    assert hardware_summary(two) == "2x Test GPU (16 GiB)"
