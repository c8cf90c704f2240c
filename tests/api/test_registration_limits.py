"""Registration and its challenge are rate limited per source address (429 + Retry-After)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
from eth_account import Account

from orchestrator.app import create_app
from orchestrator.config import Settings
from orchestrator.store import Store
from orchestrator.wiring import Services, build_services
from tests.api.conftest import BASE_URL, Api, assert_problem
from tests.conftest import FakeClock
from tests.support import register_request

BURST = 4
PER_MIN = 6.0  # one request back every 10 s


def _services(tmp_path: Path, store: Store, clock: FakeClock) -> Services:
    settings = Settings(
        data_dir=tmp_path / "data",
        admin_token="operator-token-for-tests-0123456789abcdef",
        registration_rate_per_min=PER_MIN,
        registration_burst=BURST,
    )
    return build_services(settings, store=store, clock=clock, rng=random.Random(1))


async def _challenge(http: httpx.AsyncClient) -> httpx.Response:
    return await http.post("/v1/workers/challenge", json={"address": Account.create().address})


def test_challenges_and_registrations_from_one_address_are_limited(
    tmp_path: Path, sqlite_store: Store, clock: FakeClock
) -> None:
    services = _services(tmp_path, sqlite_store, clock)

    async def body() -> None:
        app = create_app(services.settings, services=services, run_sweeper=False)
        flooder = httpx.ASGITransport(app=app, client=("203.0.113.7", 4000))
        neighbour = httpx.ASGITransport(app=app, client=("198.51.100.2", 4000))
        async with (
            httpx.AsyncClient(transport=flooder, base_url=BASE_URL) as http,
            httpx.AsyncClient(transport=neighbour, base_url=BASE_URL) as other,
        ):
            # One registration (challenge + register) and three more challenges: the burst.
            worker = await Api(http, services).register_worker()
            assert worker.worker_id
            for _ in range(BURST - 1):
                assert (await _challenge(http)).status_code == 200
            refused = await _challenge(http)
            problem = assert_problem(
                refused,
                429,
                "too_many_requests",
                "too many worker challenges from 203.0.113.7",
                f"at most {BURST} at once and 6 per minute per address",
                "retry in 10 s",
            )
            assert refused.headers["retry-after"] == "10" and problem["retry_after_s"] == 10
            # Registrations have a bucket of their own: challenges taken by others from the same
            # address (workers behind one NAT) never starve a registration of the challenge it
            # holds; and skipping challenges does not go round the limit either.
            account = Account.create()
            req = register_request(account, "nonce", "message").model_dump(mode="json")
            for _ in range(BURST - 1):  # refused for the unknown challenge, but counted
                resp = await http.post("/v1/workers/register", json=req)
                assert resp.status_code != 429, resp.text
            resp = await http.post("/v1/workers/register", json=req)
            assert_problem(resp, 429, "too_many_requests", "too many worker registrations from")

            # Another address is not held back by this one.
            assert (await _challenge(other)).status_code == 200

            clock.advance(10)  # one request's worth refilled
            assert (await _challenge(http)).status_code == 200
            assert (await _challenge(http)).status_code == 429

    asyncio.run(body())


def test_a_limit_of_zero_turns_it_off(
    tmp_path: Path, sqlite_store: Store, clock: FakeClock
) -> None:
    services = _services(tmp_path, sqlite_store, clock)
    services.challenge_limit.rate_per_s = 0.0

    async def body() -> None:
        app = create_app(services.settings, services=services, run_sweeper=False)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
            statuses = {(await _challenge(http)).status_code for _ in range(3 * BURST)}
        assert statuses == {200}

    asyncio.run(body())
