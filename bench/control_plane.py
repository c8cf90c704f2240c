"""Control plane: no-op jobs completed per second, gpumarket (SQLite, PostgreSQL) vs Celery.

    python -m bench.control_plane [--quick]

**gpumarket.** A real ``gpumarket orchestrator serve`` child process (no payments,
verification off: ``GPUMARKET_VERIFY_RATE=0``), once on SQLite (a file in a temporary data
folder) and once on PostgreSQL (a fresh database made with ``CREATE DATABASE`` and dropped
afterwards). ``WORKERS`` scripted workers in this process register over HTTP with a signed
EIP-191 challenge, then long-poll ``/v1/workers/lease`` with their free slots and complete each
job at once (no ``/start`` call; ASSIGNED -> SUCCEEDED is allowed) with a valid EIP-712-signed
no-op result: one zero "embedding" per text, no model run. ``CLIENT_TASKS`` client tasks
submit the jobs through the SDK (``gpumarket.sdk.AsyncClient``): the smallest valid inference
job, one short text; then each fetches its jobs' results from ``/v1/jobs/{id}/result``,
polling every ``RESULT_POLL_S`` while a job is not done (gpumarket has no push to clients).

**Celery.** A Celery app (``bench.celery_noop``) with a Redis broker and result backend, and a
worker child process (``celery worker --pool threads --concurrency 16``; see CELERY_POOL). One
thread submits the same no-op task N times with ``.delay()``, then waits for every result
(``ResultSet.join``).

**The figure.** jobs/s = N / seconds from the first submit to the last result in the client's
hands, every result checked final (state ``succeeded``; gpumarket's signatures are also
checked afterwards, outside the timed window). Each side first runs ``WARM_UP_JOBS`` untimed,
and keeps its best of ``ROUNDS_FULL`` rounds (rounds alternate the sides). The orchestrator's
CPU per job by component comes from a further, untimed run of as many jobs under py-spy
(bench/cpu_profile.py): the sampler never runs beside a timed one. Per job, gpumarket
keeps a job row with its state machine, an audit history (three events) and the worker's
counters, recovers the worker's address from the result signature (ecrecover), and answers over
HTTP + JSON with pydantic validation; Celery keeps a message in a Redis list and a result key.
Neither fsyncs per job on SQLite (WAL, synchronous=NORMAL) or Redis (default snapshotting);
PostgreSQL does (synchronous_commit on).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from eth_account import Account
from eth_account.signers.local import LocalAccount

from bench.cpu_profile import OrchestratorProfile
from bench.processes import process_usage
from bench.table import Row, ratio, section_main
from gpumarket.sdk import AsyncClient
from protocol.signing import (
    output_sha256,
    recover_job_result_signer,
    result_hash,
    sign_registration,
    sign_result_batch,
)
from protocol.workers import MAX_LEASE_JOBS

SECTION = "b"
JOBS_FULL = 2000
JOBS_QUICK = 60
WARM_UP_JOBS = 20
WORKERS = 4
SLOTS_PER_WORKER = 64
"""Free slots each scripted worker offers; a lease hands out at most MAX_LEASE_JOBS of them."""
CLIENT_TASKS = 16
SUBMIT_BATCH = 100
"""Jobs per submit request (each client task submits its share in such batches)."""
ROUNDS_FULL = 3
ROUNDS_QUICK = 1
CELERY_POOL = "threads"
CELERY_CONCURRENCY = 16
"""Celery's strongest setting of those tried here on no-op tasks: the default (prefork x the
core count), threads x4, threads x16 and solo; threads x16 came out ahead."""
GOAL = ">= 1.0x Celery"
GOAL_RATIO = 1.0

MODEL = "all-MiniLM-L6-v2"
PRICE_WEI_PER_UNIT = 1000
JOB_TEXT = "hello"
NOOP_OUTPUT: dict[str, Any] = {"embeddings": [[0.0]]}

PG_URL_ENV = "GPUMARKET_BENCH_PG_URL"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL_ENV = "GPUMARKET_BENCH_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
OPERATOR_TOKEN = "bench-operator-token-" + "0" * 32

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
PG_CONNECT_TIMEOUT_S = 3
LEASE_WAIT_S = 5.0
RUN_TIMEOUT_S = 600.0
HTTP_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
KEEPALIVE_EXPIRY_S = 2.0
"""httpx's default (5 s) equals uvicorn's keep-alive timeout, so a pooled connection could be
reused just as the server closes it (a ReadError); idle connections are dropped sooner here."""
COMPLETE_TRIES = 3
LEASE_TIMEOUT = httpx.Timeout(LEASE_WAIT_S + 30.0, connect=5.0)


# ---- the gpumarket side ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Orchestrator:
    """``gpumarket orchestrator serve`` as a child process; ``db_url`` None means SQLite."""

    def __init__(self, data_dir: Path, db_url: str | None) -> None:
        self.data_dir = data_dir
        self.db_url = db_url
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "orchestrator.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Orchestrator:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "GPUMARKET_ADMIN_TOKEN": OPERATOR_TOKEN,
            "GPUMARKET_VERIFY_RATE": "0",
            "GPUMARKET_REGISTRATION_RATE_PER_MIN": "0",  # all scripted workers share 127.0.0.1
            "GPUMARKET_VERIFY_RATE_NEW": "0",
        }
        env.pop("GPUMARKET_DEPLOYMENT_FILE", None)  # no payments
        args = [sys.executable, "-m", "gpumarket.cli", "orchestrator", "serve"]
        args += ["--port", str(self.port), "--data-dir", str(self.data_dir)]
        args += ["--log-level", "warning"]
        if self.db_url is not None:
            args += ["--db", self.db_url]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"orchestrator exited: {self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"orchestrator not ready in {READY_TIMEOUT_S:g} s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def __exit__(self, *_: object) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=STOP_TIMEOUT_S)

    def new_client_key(self) -> str:
        headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        response = httpx.post(
            f"{self.url}/v1/clients", json={"name": "bench"}, headers=headers, timeout=10
        )
        response.raise_for_status()
        return str(response.json()["api_key"])


@dataclass
class ScriptedWorker:
    """A worker that leases jobs and completes each at once with a signed no-op result."""

    http: httpx.AsyncClient
    account: LocalAccount = field(default_factory=Account.create)
    in_flight: set[asyncio.Task[None]] = field(default_factory=set)
    failure: BaseException | None = None
    _sizes: dict[asyncio.Task[None], int] = field(default_factory=dict)

    async def register(self) -> None:
        challenge = await self.http.post(
            "/v1/workers/challenge", json={"address": self.account.address}
        )
        challenge.raise_for_status()
        body = challenge.json()
        request = {
            "address": self.account.address,
            "nonce": body["nonce"],
            "signature": sign_registration(self.account.key, body["message"]),
            "hardware": {"cpu_model": "bench", "cpu_cores": 1, "ram_mb": 1024},
            "offers": [
                {
                    "job_type": "inference",
                    "model": MODEL,
                    "precision": "fp32",
                    "price_wei_per_unit": str(PRICE_WEI_PER_UNIT),
                }
            ],
            "max_concurrency": SLOTS_PER_WORKER,
        }
        registered = await self.http.post("/v1/workers/register", json=request)
        registered.raise_for_status()
        self.http.headers["Authorization"] = f"Bearer {registered.json()['session_token']}"

    async def run(self) -> None:
        """Lease and complete until cancelled; raises if a completion was refused."""
        try:
            while True:
                if self.failure is not None:
                    raise self.failure
                free = SLOTS_PER_WORKER - self.holding
                if free <= 0:
                    await asyncio.wait(self.in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                response = await self.http.post(
                    "/v1/workers/lease",
                    json={"max_jobs": min(free, MAX_LEASE_JOBS), "wait_s": LEASE_WAIT_S},
                    timeout=LEASE_TIMEOUT,
                )
                response.raise_for_status()
                leased = response.json()["jobs"]
                if leased:
                    task = asyncio.create_task(self._complete_batch(leased))
                    self._sizes[task] = len(leased)
                    self.in_flight.add(task)
                    task.add_done_callback(self._completed)
        finally:
            for task in list(self.in_flight):
                task.cancel()

    @property
    def holding(self) -> int:
        """Jobs leased and not yet reported."""
        return sum(self._sizes.get(t, 0) for t in self.in_flight)

    async def _complete_batch(self, leased: list[dict[str, Any]]) -> None:
        """Report every leased job at once: one request, one signature over their hashes."""
        digest = output_sha256(NOOP_OUTPUT)
        items = [
            {
                "job_id": job["job_id"],
                "attempt": job["attempt"],
                "output": NOOP_OUTPUT,
                "output_sha256": digest,
                "price_wei_per_unit": job["price_wei_per_unit"],
                "duration_s": 0.0,
                "energy_j": 0.0,
                "energy_source": "estimate",
                "units": 1,
            }
            for job in leased
        ]
        hashes = [
            result_hash(i["job_id"], i["attempt"], digest, 1, int(i["price_wei_per_unit"]))
            for i in items
        ]
        body = {"results": items, "signature": sign_result_batch(self.account.key, hashes)}
        for tries_left in reversed(range(COMPLETE_TRIES)):
            try:
                response = await self.http.post("/v1/workers/results", json=body)
                break
            except httpx.TransportError:
                # As the worker daemon does: completion is idempotent, so send it again.
                if not tries_left:
                    raise
        response.raise_for_status()
        refused = [r for r in response.json()["results"] if r["error"] is not None]
        if refused:
            raise RuntimeError(f"{len(refused)} results refused, e.g. {refused[0]}")

    def _completed(self, task: asyncio.Task[None]) -> None:
        self._sizes.pop(task, None)
        self.in_flight.discard(task)
        error = None if task.cancelled() else task.exception()
        if self.failure is None:
            self.failure = error


def _limits() -> httpx.Limits:
    return httpx.Limits(
        max_connections=SLOTS_PER_WORKER + 1,
        max_keepalive_connections=SLOTS_PER_WORKER + 1,
        keepalive_expiry=KEEPALIVE_EXPIRY_S,
    )


def _job_spec() -> dict[str, Any]:
    return {
        "type": "inference",
        "model": MODEL,
        "input": {"texts": [JOB_TEXT]},
        "max_price_wei_per_unit": str(PRICE_WEI_PER_UNIT),
    }


async def _submit_and_collect(client: AsyncClient, jobs: int) -> list[dict[str, Any]]:
    """Submit ``jobs`` jobs in batches of ``SUBMIT_BATCH``, then wait for them all with
    long-polls over many jobs at once; results in submit order."""
    spec = _job_spec()
    ids: list[str] = []
    for start in range(0, jobs, SUBMIT_BATCH):
        items = await client.submit_many([spec] * min(SUBMIT_BATCH, jobs - start))
        ids.extend(item["job"]["id"] for item in items)
    results = await client.wait_many(ids, timeout_s=RUN_TIMEOUT_S)
    for result in results:
        if result["state"] != "succeeded":
            raise RuntimeError(f"job {result.get('id')} ended {result['state']}")
    return results


async def _run_clients(url: str, api_key: str, jobs: int) -> tuple[float, list[dict[str, Any]]]:
    """Seconds from the first submit to the last result, and every result."""
    shares = [jobs // CLIENT_TASKS + (i < jobs % CLIENT_TASKS) for i in range(CLIENT_TASKS)]
    transport = httpx.AsyncHTTPTransport(limits=_limits())
    async with AsyncClient(url, api_key, transport=transport) as client:
        started = time.perf_counter()
        per_task = await asyncio.gather(
            *(_submit_and_collect(client, share) for share in shares if share)
        )
        elapsed = time.perf_counter() - started
    return elapsed, [result for results in per_task for result in results]


def _check_results(results: Sequence[dict[str, Any]], workers: Sequence[ScriptedWorker]) -> None:
    """Every result is final and signed by one of our workers over its own output."""
    addresses = {str(worker.account.address) for worker in workers}
    for result in results:
        if result["state"] != "succeeded" or result["output_sha256"] != output_sha256(
            result["output"]
        ):
            raise RuntimeError(f"job {result['job_id']}: bad result {result}")
        proof = result["batch"]
        if proof is None:
            raise RuntimeError(f"job {result['job_id']}: not reported in a batch")
        signer = recover_job_result_signer(
            result["job_id"],
            result["attempt"],
            result["output_sha256"],
            result["units"],
            int(result["price_wei_per_unit"]),
            proof["signature"],
            proof.get("result_hashes"),
            proof["index"],
            batch_count=proof["count"],
            batch_path=proof["path"],
        )
        if signer not in addresses or signer != result["worker_address"]:
            raise RuntimeError(f"job {result['job_id']}: signed by {signer}")


async def _while_workers_run(
    clients: Coroutine[Any, Any, tuple[float, list[dict[str, Any]]]],
    loops: list[asyncio.Task[None]],
) -> tuple[float, list[dict[str, Any]]]:
    """The clients' outcome; a worker loop that fails first fails the run at once."""
    task = asyncio.create_task(clients)
    done, _ = await asyncio.wait(
        {task, *loops}, timeout=RUN_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
    )
    if task in done:
        return task.result()
    task.cancel()
    for loop in done:
        loop.result()  # raises the worker's error
    raise TimeoutError(f"the jobs were not all done in {RUN_TIMEOUT_S:g} s")


@dataclass(frozen=True)
class Run:
    """One timed gpumarket run: jobs/s and where the orchestrator's CPU went."""

    jobs_per_s: float
    cpu: str


async def _gpumarket_rate(url: str, api_key: str, jobs: int, pid: int) -> Run:
    worker_http = [
        httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT, limits=_limits())
        for _ in range(WORKERS)
    ]
    workers = [ScriptedWorker(http) for http in worker_http]
    try:
        for worker in workers:
            await worker.register()
        loops = [asyncio.create_task(worker.run()) for worker in workers]
        try:
            await _while_workers_run(_run_clients(url, api_key, WARM_UP_JOBS), loops)
            before = process_usage(pid)
            elapsed, results = await _while_workers_run(_run_clients(url, api_key, jobs), loops)
            cpu_s = process_usage(pid).cpu_s - before.cpu_s
            # Where that CPU went: as many jobs again, untimed, under py-spy (its sampling
            # takes CPU of its own on these shared cores, so it never runs while timed).
            with OrchestratorProfile(pid) as profile:
                await _while_workers_run(_run_clients(url, api_key, jobs), loops)
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
    finally:
        for http in worker_http:
            await http.aclose()
    if len(results) != jobs:
        raise RuntimeError(f"{len(results)} results for {jobs} jobs")
    _check_results(results, workers)
    return Run(jobs / elapsed, profile.describe(cpu_s, jobs))


def gpumarket_jobs_per_s(jobs: int, db_url: str | None) -> float:
    """No-op jobs/s through a real orchestrator process on ``db_url`` (None: SQLite)."""
    return gpumarket_run(jobs, db_url).jobs_per_s


def gpumarket_run(jobs: int, db_url: str | None) -> Run:
    """A timed run through a real orchestrator process on ``db_url`` (None: SQLite)."""
    with tempfile.TemporaryDirectory(prefix="gpumarket-bench-") as tmp:
        with Orchestrator(Path(tmp) / "orchestrator", db_url) as orchestrator:
            api_key = orchestrator.new_client_key()
            try:
                return asyncio.run(
                    _gpumarket_rate(orchestrator.url, api_key, jobs, orchestrator.pid)
                )
            except BaseException as exc:
                exc.add_note(f"orchestrator log: {orchestrator.log()}")
                raise


# ---- PostgreSQL -------------------------------------------------------------------------------


def _pg_url() -> str:
    return os.environ.get(PG_URL_ENV, DEFAULT_PG_URL)


def pg_unreachable_reason() -> str | None:
    """None when PostgreSQL answers at ``GPUMARKET_BENCH_PG_URL``, else why not."""
    try:
        with psycopg.connect(_pg_url(), connect_timeout=PG_CONNECT_TIMEOUT_S):
            return None
    except psycopg.Error as exc:
        lines = str(exc).strip().splitlines()
        return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new, empty database on the server of ``GPUMARKET_BENCH_PG_URL``; dropped afterwards."""
    base = _pg_url()
    name = f"gpumarket_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(base, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# ---- the Celery side --------------------------------------------------------------------------


def celery_missing_reason() -> str | None:
    """None when Celery (the ``bench`` extra) is installed and Redis answers, else why not."""
    if importlib.util.find_spec("celery") is None or importlib.util.find_spec("redis") is None:
        return "Celery is not installed (the bench extra): pip install -e '.[bench]'"
    import redis

    try:
        redis.Redis.from_url(_redis_url(), socket_connect_timeout=PG_CONNECT_TIMEOUT_S).ping()
    except redis.RedisError as exc:
        return f"Redis at {_redis_url()} is unreachable ({exc})"
    return None


def _redis_url() -> str:
    return os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL)


def celery_version() -> str:
    import celery

    return str(celery.__version__)


@contextlib.contextmanager
def celery_worker(queue: str, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``celery worker`` on ``queue`` (pool CELERY_POOL x CELERY_CONCURRENCY), a child process."""
    repo_root = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        REDIS_URL_ENV: _redis_url(),
        "GPUMARKET_BENCH_CELERY_QUEUE": queue,
        "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])),
    }
    args = [sys.executable, "-m", "celery", "-A", "bench.celery_noop", "worker", "-Q", queue]
    args += ["--pool", CELERY_POOL, "--concurrency", str(CELERY_CONCURRENCY)]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, env=env, cwd=repo_root, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()  # warm shutdown
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


def _celery_round(noop: Any, jobs: int) -> float:
    """Seconds from the first ``.delay()`` to the last result fetched, every one checked."""
    from celery.result import ResultSet

    started = time.perf_counter()
    pending = [noop.delay([JOB_TEXT]) for _ in range(jobs)]
    results = ResultSet(pending).join(timeout=RUN_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    if len(results) != jobs or any(result != NOOP_OUTPUT for result in results):
        raise RuntimeError("a Celery task returned something else")
    if not all(r.successful() for r in pending):
        raise RuntimeError("a Celery task did not succeed")
    for r in pending:
        r.forget()  # outside the timed window: leave no result keys behind
    return elapsed


def celery_jobs_per_s(jobs: int) -> float:
    """No-op tasks/s through a Celery worker child process on Redis, a queue of its own."""
    from bench import celery_noop

    queue = f"gpumarket-bench-{uuid.uuid4().hex[:12]}"
    celery_noop.app.conf.task_default_queue = queue
    with tempfile.TemporaryDirectory(prefix="gpumarket-bench-celery-") as tmp:
        log_path = Path(tmp) / "celery.log"
        try:
            with celery_worker(queue, log_path):
                # The warm-up's first result also waits out the worker's start.
                _celery_round(celery_noop.noop, WARM_UP_JOBS)
                elapsed = _celery_round(celery_noop.noop, jobs)
        except BaseException as exc:
            exc.add_note(f"celery log: {log_path.read_text(errors='replace')[-2000:]}")
            raise
        finally:
            _drop_queue(queue)
    return jobs / elapsed


def _drop_queue(queue: str) -> None:
    import redis

    with redis.Redis.from_url(_redis_url()) as conn:
        conn.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


# ---- rows -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """Best jobs/s of each side over the rounds; None where that side could not run."""

    celery: float | None
    sqlite: float
    postgres: float | None
    sqlite_cpu: str = ""
    postgres_cpu: str = ""


def measure_rates(jobs: int, rounds: int, *, with_celery: bool, with_postgres: bool) -> Rates:
    """Each round runs Celery, gpumarket on SQLite and on PostgreSQL in turn, so a busy spell
    on a shared machine hits all of them alike; each side keeps its best round."""
    celery: list[float] = []
    sqlite: list[Run] = []
    postgres: list[Run] = []
    for _ in range(rounds):
        if with_celery:
            celery.append(celery_jobs_per_s(jobs))
        sqlite.append(gpumarket_run(jobs, None))
        if with_postgres:
            with fresh_pg_database() as url:
                postgres.append(gpumarket_run(jobs, url))
    best_sqlite = max(sqlite, key=lambda run: run.jobs_per_s)
    best_pg = max(postgres, key=lambda run: run.jobs_per_s, default=None)
    return Rates(
        celery=max(celery, default=None),
        sqlite=best_sqlite.jobs_per_s,
        postgres=best_pg.jobs_per_s if best_pg else None,
        sqlite_cpu=best_sqlite.cpu,
        postgres_cpu=best_pg.cpu if best_pg else "",
    )


def _row(store: str, value: float | None, baseline: float | None, notes: list[str]) -> Row:
    r = ratio(value, baseline)
    return Row(
        section=SECTION,
        name=f"gpumarket no-op jobs/s ({store})",
        value=value,
        unit="jobs/s",
        baseline_name=f"Celery + Redis no-op tasks/s ({CELERY_POOL} pool x{CELERY_CONCURRENCY})",
        baseline_value=baseline,
        ratio=r,
        goal=GOAL,
        met=None if r is None else r >= GOAL_RATIO,
        note="; ".join(notes),
    )


def measure(quick: bool) -> list[Row]:
    """Two rows: gpumarket jobs/s on SQLite and on PostgreSQL, each beside Celery's tasks/s."""
    jobs = JOBS_QUICK if quick else JOBS_FULL
    rounds = ROUNDS_QUICK if quick else ROUNDS_FULL
    celery_reason = celery_missing_reason()
    pg_reason = pg_unreachable_reason()
    rates = measure_rates(
        jobs, rounds, with_celery=celery_reason is None, with_postgres=pg_reason is None
    )
    shared = [
        f"{jobs} jobs, best of {rounds}; {CLIENT_TASKS} client tasks submitting in batches of "
        f"{SUBMIT_BATCH} and waiting with long-polls over their jobs, {WORKERS} scripted "
        f"workers x {SLOTS_PER_WORKER} slots reporting each lease's jobs in one signed batch; "
        "per job gpumarket keeps a row with its state machine and 4 history events and its "
        "result's hash under the batch's signed Merkle root; Celery keeps a Redis message and "
        "a result key",
        celery_reason or f"Celery {celery_version()}",
    ]
    sqlite_notes = [
        *shared,
        "SQLite WAL, synchronous=NORMAL (no fsync per commit)",
        f"{rates.sqlite_cpu} (best round)",
    ]
    pg_notes = [*shared, "PostgreSQL 'CREATE DATABASE' per run; fsync per commit"]
    if rates.postgres_cpu:
        pg_notes.append(f"{rates.postgres_cpu} (best round)")
    if pg_reason is not None:
        pg_notes.append(f"PostgreSQL at {_pg_url()} is unreachable ({pg_reason})")
    return [
        _row("SQLite", rates.sqlite, rates.celery, sqlite_notes),
        _row("PostgreSQL", rates.postgres, rates.celery, pg_notes),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    return section_main("python -m bench.control_plane", __doc__, measure, argv)


if __name__ == "__main__":
    sys.exit(main())
