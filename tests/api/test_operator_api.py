"""Operator routes, health probes and the API's own description."""

from __future__ import annotations

import pytest

from tests.api.conftest import TEXTS, Api, RunApi, assert_problem, bearer
from tests.conftest import FakeClock
from tests.support import EMBED_MODEL, offer

OPERATOR_ROUTES = [("GET", "/v1/workers"), ("GET", "/v1/stats"), ("POST", "/v1/clients")]


def test_operator_routes_need_the_operator_token(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        worker = await api.register_worker()
        for method, path in OPERATOR_ROUTES:
            payload = {"name": "mallory"} if method == "POST" else None
            for headers in [{}, client, worker.headers, bearer("operator-token-guess")]:
                resp = await api.http.request(method, path, json=payload, headers=headers)
                says = (
                    "missing credentials"
                    if not headers
                    else "need the operator token (GPUMARKET_ADMIN_TOKEN)"
                )
                assert_problem(resp, 401, "unauthorized", says)

    run_api(body)


def test_create_client_returns_a_working_key_once(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        resp = await api.http.post("/v1/clients", json={"name": "acme"}, headers=api.operator)
        assert resp.status_code == 201, resp.text
        created = resp.json()
        assert set(created) == {"client_id", "api_key"}
        assert created["api_key"].startswith("gmk_") and len(created["api_key"]) > 40
        assert len(created["client_id"]) == 32

        resp = await api.http.get("/v1/jobs", headers=bearer(created["api_key"]))
        assert resp.status_code == 200 and resp.json() == {"jobs": [], "next_cursor": None}

        other = await api.http.post("/v1/clients", json={"name": "acme"}, headers=api.operator)
        assert other.json()["api_key"] != created["api_key"]

        for payload, says in [({}, "name: Field required"), ({"name": ""}, "name")]:
            resp = await api.http.post("/v1/clients", json=payload, headers=api.operator)
            assert_problem(resp, 422, "invalid_input", says)

    run_api(body)


def test_list_workers_shows_hardware_offers_and_reputation(
    run_api: RunApi, clock: FakeClock
) -> None:
    async def body(api: Api) -> None:
        resp = await api.http.get("/v1/workers", headers=api.operator)
        assert resp.status_code == 200 and resp.json() == []

        gpu = await api.register_worker(
            offers=[offer(price=7), offer(precision="fp16", price=5)],
            max_concurrency=4,
            gpu_vram_mb=24_576,
        )
        clock.advance(1)
        cpu = await api.register_worker()

        resp = await api.http.get("/v1/workers", headers=api.operator)
        assert resp.status_code == 200
        listed = resp.json()
        assert [w["address"] for w in listed] == [gpu.address, cpu.address]  # oldest first
        first = listed[0]
        assert first["id"] == gpu.worker_id
        assert first["status"] == "registered"
        assert first["max_concurrency"] == 4
        assert first["running_jobs"] == 0 and first["free_slots"] == 0
        assert first["hardware"]["cpu_model"] == "test cpu"
        assert first["hardware"]["gpus"][0]["name"] == "Test GPU"
        assert first["hardware"]["gpus"][0]["vram_mb"] == 24_576
        assert [(o["model"], o["precision"], o["price_wei_per_unit"]) for o in first["offers"]] == [
            (EMBED_MODEL, "fp32", "7"),
            (EMBED_MODEL, "fp16", "5"),
        ]
        assert (first["jobs_succeeded"], first["jobs_failed"], first["leases_expired"]) == (0, 0, 0)
        assert 0.0 < first["reputation"] <= 1.0
        assert first["registered_at"] == "2027-01-15T08:00:00Z"
        assert listed[1]["hardware"]["gpus"] == []

        # a worker not heard from for longer than a lease shows as offline
        clock.advance(31)
        statuses = [
            w["status"] for w in (await api.http.get("/v1/workers", headers=api.operator)).json()
        ]
        assert statuses == ["offline", "offline"]

    run_api(body)


def test_stats_count_jobs_workers_and_wei_earned(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        resp = await api.http.get("/v1/stats", headers=api.operator)
        assert resp.status_code == 200
        empty = resp.json()
        assert empty["queue_depth"] == 0
        assert empty["wei_earned_total"] == "0" and empty["energy_j_total"] == 0.0
        assert set(empty["jobs_by_state"].values()) == {0}

        client = await api.new_client()
        worker = await api.register_worker()
        done = await api.submit(client)
        leased = await api.lease(worker)
        assert [j["job_id"] for j in leased] == [done["id"]]
        resp = await api.complete(worker, done["id"], 1)
        assert resp.status_code == 200, resp.text
        await api.submit(client)  # waits in the queue: the only worker is not polling
        cancelled = await api.submit(client)
        await api.http.post(f"/v1/jobs/{cancelled['id']}/cancel", headers=client)

        resp = await api.http.get("/v1/stats", headers=api.operator)
        assert resp.status_code == 200
        stats = resp.json()
        assert stats["jobs_by_state"] == {
            "queued": 1,
            "assigned": 0,
            "running": 0,
            "verifying": 0,
            "succeeded": 1,
            "failed": 0,
            "cancelled": 1,
            "expired": 0,
        }
        assert stats["queue_depth"] == 1
        assert stats["workers_registered"] == 1 and stats["workers_online"] == 1
        assert stats["wei_earned_total"] == str(len(TEXTS) * 100)  # 2 texts at 100 wei
        assert stats["energy_j_total"] == 2.0

    run_api(body)


def test_health_probes_answer_without_credentials(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        resp = await api.http.get("/healthz")
        assert resp.status_code == 200 and resp.json() == {"status": "ok"}
        resp = await api.http.get("/readyz")
        assert resp.status_code == 200
        assert resp.json() == {"status": "ready", "database": "sqlite"}

    run_api(body)


def test_openapi_lists_the_routes_and_docs_serve_html(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        resp = await api.http.get("/openapi.json")
        assert resp.status_code == 200
        schema = resp.json()
        assert schema["info"]["title"] == "gpumarket orchestrator"
        routes = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
        assert {
            ("POST", "/v1/jobs"),
            ("GET", "/v1/jobs"),
            ("GET", "/v1/jobs/{job_id}"),
            ("GET", "/v1/jobs/{job_id}/result"),
            ("POST", "/v1/jobs/{job_id}/cancel"),
            ("POST", "/v1/blobs"),
            ("GET", "/v1/blobs/{sha256}"),
            ("POST", "/v1/workers/challenge"),
            ("POST", "/v1/workers/register"),
            ("POST", "/v1/workers/heartbeat"),
            ("POST", "/v1/workers/lease"),
            ("POST", "/v1/workers/jobs/{job_id}/start"),
            ("POST", "/v1/workers/jobs/{job_id}/complete"),
            ("POST", "/v1/workers/jobs/{job_id}/fail"),
            ("POST", "/v1/workers/drain"),
            ("POST", "/v1/workers/deregister"),
            ("GET", "/v1/workers"),
            ("GET", "/v1/stats"),
            ("POST", "/v1/clients"),
            ("GET", "/healthz"),
            ("GET", "/readyz"),
        } <= routes
        # money is documented as decimal strings, and bearer auth is declared
        job_view = schema["components"]["schemas"]["JobView"]["properties"]
        assert job_view["max_price_wei_per_unit"]["type"] == "string"
        assert "HTTPBearer" in schema["components"]["securitySchemes"]
        upload = schema["paths"]["/v1/blobs"]["post"]["requestBody"]["content"]
        assert "application/octet-stream" in upload

        resp = await api.http.get("/docs")
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/html")
        assert "/openapi.json" in resp.text and "swagger" in resp.text.lower()

    run_api(body)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json", "/docs"])
def test_public_pages_reject_writes_with_a_problem(run_api: RunApi, path: str) -> None:
    async def body(api: Api) -> None:
        resp = await api.http.post(path)
        assert_problem(resp, 405, "method_not_allowed", f"POST {path}", "GET")
        assert "GET" in resp.headers["allow"]

    run_api(body)
