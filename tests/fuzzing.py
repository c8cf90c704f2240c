"""Schemathesis against the orchestrator's OpenAPI spec, in-process, with real credentials.

Shared by the short run in ``make test`` (tests/api/test_api_fuzz.py) and the long one in
``make faults`` (tests/faults/test_api_fuzz_long.py). The schema is loaded from the spec at
import time (schemathesis' lazy ``from_fixture`` loader does not run under pytest 9); the app
it is called against comes from a fixture, so each run has its own database.

Every request carries the credential its route takes (operator token, client key, worker
session), so the generated bodies reach the handlers instead of stopping at 401. Half the
generated job ids and blob hashes are swapped for ones that exist, so the handlers get past
404 too. ``drain`` and ``deregister`` get a fresh worker each time, or the first one would end
the session every later worker request uses.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import schemathesis
from eth_account import Account
from fastapi import FastAPI
from hypothesis import HealthCheck
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from orchestrator.app import create_app
from orchestrator.config import Settings
from orchestrator.services.auth import Principal
from orchestrator.store import Store
from orchestrator.wiring import Services, build_services
from protocol import JobSpec
from protocol.signing import sign_registration
from tests.support import EMBED_MODEL, TestWorker, offer, register

OPERATOR_TOKEN = "fuzz-operator-token-0123456789abcdef0123"
# Long-polls end at once: the lease route's wait would otherwise dominate the run.
LONG_POLL_MAX_S = 0.05
SEEDED_JOBS = 6
SEED_BLOB = b"fuzz seed blob\n"
HEALTH_CHECKS_OFF = [
    HealthCheck.function_scoped_fixture,
    HealthCheck.too_slow,
    HealthCheck.filter_too_much,
    HealthCheck.data_too_large,
]
# No 5xx, and every answer as the spec documents it: status, media type, body, headers.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
OPERATOR_PATHS = ("/v1/stats", "/v1/clients", "/v1/settlement", "/v1/dashboard")
FRESH_WORKER_PATHS = ("/v1/workers/drain", "/v1/workers/deregister")
OPEN_WORKER_PATHS = ("/v1/workers/challenge", "/v1/workers/register")


def openapi_schema() -> schemathesis.BaseSchema:
    """The orchestrator's OpenAPI spec as a schemathesis schema (no database is opened)."""
    with tempfile.TemporaryDirectory(prefix="gpumarket-spec-") as tmp:
        spec = create_app(
            Settings(data_dir=Path(tmp), admin_token=OPERATOR_TOKEN), run_sweeper=False
        ).openapi()
    return schemathesis.openapi.from_dict(spec)


def fuzz_settings(data_dir: Path, **overrides: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        admin_token=OPERATOR_TOKEN,
        long_poll_max_s=LONG_POLL_MAX_S,
        max_blob_bytes=64 * 1024,
        verify_rate=0.0,
        verify_rate_new=0.0,
        **overrides,
    )


@dataclass
class FuzzTarget:
    """The app under test, its credentials and some ids that exist; counts what was sent."""

    app: FastAPI
    services: Services
    client_key: str
    worker: TestWorker
    job_ids: list[str]
    blob_sha256: str
    requests: int = 0
    started: float = field(default_factory=time.monotonic)
    statuses: Counter[int] = field(default_factory=Counter)
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    def authorization(self, path: str, method: str) -> str | None:
        if path in OPERATOR_PATHS or (path == "/v1/workers" and method == "GET"):
            return OPERATOR_TOKEN
        if path in FRESH_WORKER_PATHS:
            return register(self.services).token
        if path in OPEN_WORKER_PATHS or not path.startswith("/v1/") or path == "/v1/chain":
            return None
        if path.startswith("/v1/workers"):
            return self.worker.token
        return self.client_key  # jobs, blobs, account

    def call(self, case: schemathesis.Case) -> schemathesis.Response:
        """Send ``case`` to the app with the right credential; count it."""
        turn = next(self._turn)
        params = case.path_parameters
        if params and turn % 2 == 0:
            if "job_id" in params:
                params["job_id"] = self.job_ids[turn // 2 % len(self.job_ids)]
            if "sha256" in params:
                params["sha256"] = self.blob_sha256
        token = self.authorization(case.operation.path, case.method.upper())
        headers = {"Authorization": f"Bearer {token}"} if token else None
        response = case.call(app=self.app, headers=headers)
        self.requests += 1
        self.statuses[response.status_code] += 1
        return response


def build_target(
    data_dir: Path, store: Store, *, deployment_file: Path | None = None, payer_key: str = ""
) -> FuzzTarget:
    """Services and the app over ``store``, with a client, a worker holding leased jobs, and a
    blob; with ``deployment_file``, payments are on and the client pays from ``payer_key``."""
    settings = fuzz_settings(data_dir, deployment_file=deployment_file)
    services = build_services(settings, store=store, clock=time.time, rng=random.Random(7))
    store.migrate()
    client_id, client_key = services.auth.create_client("fuzz", services.now())
    client = Principal("client", client_id)
    if deployment_file is not None:
        _link_payer(services, client, payer_key)
    worker = register(services, offers=[offer(price=10)], max_concurrency=SEEDED_JOBS)
    if services.payments.enabled:
        _mark_staked(services, worker)
    job_ids = [_seed_job(services, client, i) for i in range(SEEDED_JOBS)]
    now = services.now()
    services.leases.open_poll(worker.principal, SEEDED_JOBS, now + 60, now)
    services.leases.dispatch(now)
    leased = services.leases.claim(worker.principal, SEEDED_JOBS, now)
    assert len(leased) == SEEDED_JOBS, leased
    sha256 = _put_blob(services, client)
    app = create_app(settings, services=services, run_sweeper=False)
    return FuzzTarget(app, services, client_key, worker, job_ids, sha256)


def _seed_job(services: Services, client: Principal, i: int) -> str:
    spec = JobSpec.model_validate(
        {
            "type": "inference",
            "model": EMBED_MODEL,
            "input": {"texts": [f"fuzz seed {i}", "x"]},
            "max_price_wei_per_unit": "1000",
        }
    )
    job, _ = services.jobs.submit(client, spec, services.now(), f"seed-{i}")
    return job.id


def _put_blob(services: Services, client: Principal) -> str:
    async def chunks() -> AsyncIterator[bytes]:
        yield SEED_BLOB

    sha256, _ = asyncio.run(services.blobs.upload(client, chunks(), services.now()))
    return sha256


def _link_payer(services: Services, client: Principal, payer_key: str) -> None:
    address = Account.from_key(payer_key).address
    challenge = services.accounts.payer_challenge(client, address, services.now())
    signature = sign_registration(payer_key, challenge.message)  # EIP-191, as the SDK signs
    services.accounts.link_payer(client, address, challenge.nonce, signature, services.now())


def _mark_staked(services: Services, worker: TestWorker) -> None:
    """The fuzzed worker never stakes on chain; let matching treat it as staked."""
    from orchestrator.store.models import Worker

    with services.store.transaction() as s:
        row = s.get(Worker, worker.id)
        assert row is not None
        row.stake_eligible = True
