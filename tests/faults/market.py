"""A whole paid market as real processes, for breaking: anvil (its state kept in a file, so it
can be stopped and started again), the contracts, a funded payer, ``gpumarket orchestrator
serve`` and paced workers (tests/faults/paced_worker.py: the real worker daemon, stand-in
executors), each of which stakes before it starts and redeems its own vouchers.

Short leases, heartbeats and sweeps keep a trial's recovery to seconds. The reputation floor
is 0: a worker killed twenty times is still offered work, so the trials test crash safety,
not the reputation rules.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import httpx
from eth_account import Account

from contracts.anvil import DEV_PRIVATE_KEYS, Anvil
from contracts.broker import PaymentBroker
from contracts.chain import Chain
from contracts.deploy import Deployment, deploy, write_deployment
from contracts.registry import WorkerRegistry
from gpumarket import Client
from gpumarket.sdk import FINAL_STATES
from protocol.problems import ProblemError
from tests.faults.paced_worker import (
    CHEAT_ENV,
    EMBED_MODEL,
    JOB_S_ENV,
    LOSE_HEARTBEATS_ENV,
    OUTPUT_BYTES_ENV,
    transcode_units,
)
from tests.integration.conftest import OrchestratorProcess, WorkerProcess, wait_for_workers

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOYER_KEY, PAYER_KEY = DEV_PRIVATE_KEYS[0], DEV_PRIVATE_KEYS[2]
MIN_STAKE_WEI = 10**17
PAYER_DEPOSIT_WEI = 10**18
WORKER_FUNDS_WEI = 10**20
INFERENCE_PRICE_WEI = 10**12  # per text
TRANSCODE_PRICE_WEI = 10  # per output pixel
LEASE_TTL_S = 2.0
FAULTS_ORCHESTRATOR_ENV = {
    "GPUMARKET_LEASE_TTL_S": str(LEASE_TTL_S),
    "GPUMARKET_HEARTBEAT_INTERVAL_S": "0.5",
    "GPUMARKET_SWEEP_INTERVAL_S": "0.2",
    "GPUMARKET_LONG_POLL_MAX_S": "2",
    "GPUMARKET_RECONCILE_INTERVAL_S": "0.5",
    "GPUMARKET_STAKE_CHECK_INTERVAL_S": "1",
    "GPUMARKET_REPUTATION_FLOOR": "0",
}
FAULTS_WORKER_ENV = {
    "GPUMARKET_WORKER_LEASE_WAIT_S": "2",
    "GPUMARKET_WORKER_BACKOFF_MAX_S": "1",
    "GPUMARKET_WORKER_REDEEM_THRESHOLD_WEI": "1",
    "GPUMARKET_WORKER_REDEEM_POLL_S": "0.5",
    "GPUMARKET_WORKER_LOG_LEVEL": "info",
    "PYTHONPATH": str(REPO_ROOT),
}
RETRY_PAUSE_S = 0.2
SUBMIT_TIMEOUT_S = 60.0
FINAL_TIMEOUT_S = 120.0


def until(check: Callable[[], object], what: str, timeout_s: float = 60.0) -> Any:
    """Poll ``check`` until it returns something truthy (returned); fail after ``timeout_s``.
    Connection errors count as "not yet": the orchestrator may be restarting."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(RETRY_PAUSE_S)


def inference_spec(i: int | str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "inference",
        "model": EMBED_MODEL,
        "input": {"texts": [f"fault trial job {i}", "x"]},
        "max_price_wei_per_unit": str(2 * INFERENCE_PRICE_WEI),
        "max_attempts": 10,
        **extra,
    }


def transcode_spec(
    input_blob: str, heights: Iterable[int] = (360,), **extra: Any
) -> dict[str, Any]:
    heights = list(heights)
    return {
        "type": "transcode",
        "input_blob": input_blob,
        "renditions": [{"height": h, "bitrate_kbps": 800} for h in heights],
        "max_price_wei_per_unit": str(TRANSCODE_PRICE_WEI),
        "max_units": transcode_units(heights),
        "max_attempts": 10,
        **extra,
    }


class PacedWorker(WorkerProcess):
    """tests/faults/paced_worker.py as a child process, with its own funded, staked key."""

    def __init__(
        self,
        root: Path,
        orchestrator_url: str,
        key: str,
        *,
        job_s: float,
        inference_price_wei: int = INFERENCE_PRICE_WEI,
        max_concurrency: int = 2,
        output_bytes: int | None = None,
        lose_heartbeats: bool = False,
        cheat: bool = False,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "worker.key").write_text(key + "\n")
        env = {**FAULTS_WORKER_ENV, JOB_S_ENV: str(job_s)}
        if output_bytes is not None:
            env[OUTPUT_BYTES_ENV] = str(output_bytes)
        if lose_heartbeats:
            env[LOSE_HEARTBEATS_ENV] = "1"
        if cheat:
            env[CHEAT_ENV] = "1"
        super().__init__(
            root,
            orchestrator_url,
            "--price",
            f"inference={inference_price_wei}",
            "--price",
            f"transcode={TRANSCODE_PRICE_WEI}",
            "--max-concurrency",
            str(max_concurrency),
            **env,
        )
        # `python -m gpumarket.cli worker run ARGS` -> `python -m tests.faults.paced_worker ARGS`
        self.args = [sys.executable, "-m", "tests.faults.paced_worker", *self.args[5:]]
        self.address = str(Account.from_key(key).address)
        self.kills = 0
        self.started_at = 0.0  # unix seconds this process was last started

    def start(self) -> None:
        self.started_at = time.time()
        super().start()

    def kill(self) -> None:
        """SIGKILL: no drain, no deregistration, no report of the job in hand."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.kills += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Market:
    """The processes of one trial and the client that pays for its jobs."""

    def __init__(
        self,
        root: Path,
        *,
        orchestrator_env: dict[str, str] | None = None,
        anvil_state_interval_s: int | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._anvil_log: IO[bytes] = (root / "anvil.log").open("ab")
        self.anvil = Anvil(
            state_file=root / "anvil-state.json",
            state_interval_s=anvil_state_interval_s,
            log=self._anvil_log,
        )
        self.orchestrator_env = {**FAULTS_ORCHESTRATOR_ENV, **(orchestrator_env or {})}
        self.workers: list[PacedWorker] = []
        self.jobs: dict[str, tuple[dict[str, Any], str]] = {}  # idempotency key -> (spec, id)
        self.deployment: Deployment | None = None
        self.orchestrator: OrchestratorProcess | None = None
        self.client: Client | None = None
        self.client_key = ""

    # -- setting up and tearing down ----------------------------------------------------------

    def __enter__(self) -> Market:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _start(self) -> None:
        self.anvil.start()
        deployer = Chain.connect(self.anvil.url, DEPLOYER_KEY)  # anvil dev keys: dev chain only
        self.deployment = deploy(deployer, min_stake_wei=MIN_STAKE_WEI)
        write_deployment(self.deployment, self.root / "deployment.json")
        payer = PaymentBroker(
            Chain.connect(self.anvil.url, PAYER_KEY), self.deployment.payment_broker
        )
        payer.deposit(PAYER_DEPOSIT_WEI)
        payer.authorize(deployer.address, PAYER_DEPOSIT_WEI)
        self.orchestrator = OrchestratorProcess(
            self.root / "orchestrator",
            GPUMARKET_DEPLOYMENT_FILE=str(self.root / "deployment.json"),
            **self.orchestrator_env,
        )
        self.orchestrator.start()
        self.client_key = self.orchestrator.new_client_key()
        self.client = Client(self.orchestrator.url, self.client_key)
        self.client.link_payer(PAYER_KEY)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self.client is not None:
            self.client.close()
        if self.orchestrator is not None:
            self.orchestrator.stop()
        self.anvil.stop()
        self._anvil_log.close()

    def add_worker(self, name: str, *, job_s: float, **options: Any) -> PacedWorker:
        """Fund and stake a fresh key on chain, then start a paced worker with it."""
        assert self.deployment is not None and self.orchestrator is not None
        account = Account.create()
        key = "0x" + bytes(account.key).hex().removeprefix("0x")
        chain = Chain.connect(self.anvil.url)
        chain.w3.provider.make_request(
            "anvil_setBalance",  # type: ignore[arg-type]
            [account.address, hex(WORKER_FUNDS_WEI)],
        )
        registry = WorkerRegistry(
            Chain.connect(self.anvil.url, key), self.deployment.worker_registry
        )
        registry.stake(MIN_STAKE_WEI)
        worker = PacedWorker(self.root / name, self.worker_url(), key, job_s=job_s, **options)
        worker.start()
        self.workers.append(worker)
        return worker

    def worker_url(self) -> str:
        """What workers are given as ``--orchestrator`` (several replicas: comma-separated)."""
        assert self.orchestrator is not None
        return self.orchestrator.url

    def wait_for_workers(self) -> None:
        assert self.orchestrator is not None
        wait_for_workers(self.orchestrator, len(self.workers))

    def worker_at(self, address: str) -> PacedWorker:
        [worker] = [w for w in self.workers if w.address.lower() == address.lower()]
        return worker

    # -- the chain ----------------------------------------------------------------------------

    def stop_anvil(self) -> None:
        """SIGTERM: anvil writes its state file and exits; the RPC port stops answering."""
        self.anvil.stop()

    def kill_anvil(self) -> None:
        """SIGKILL: anvil writes nothing more; its state file holds the chain as last written
        (every ``anvil_state_interval_s``), and what was mined since is lost."""
        assert self.anvil.proc is not None
        self.anvil.proc.kill()
        self.anvil.proc.wait(timeout=10)

    def start_anvil(self) -> None:
        """The same port and the same state: the chain continues where it was last written."""
        self.anvil = Anvil(
            self.anvil.port,
            state_file=self.anvil.state_file,
            state_interval_s=self.anvil.state_interval_s,
            log=self._anvil_log,
        ).start()

    def chain(self) -> Chain:
        return Chain.connect(self.anvil.url)

    def broker(self) -> PaymentBroker:
        assert self.deployment is not None
        return PaymentBroker(self.chain(), self.deployment.payment_broker)

    # -- jobs ---------------------------------------------------------------------------------

    @property
    def api(self) -> Client:
        assert self.client is not None
        return self.client

    def submit(self, key: str, spec: dict[str, Any], timeout_s: float = SUBMIT_TIMEOUT_S) -> str:
        """Submit with an idempotency key, retrying through restarts and 5xx as a client
        should; returns the job id."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                job = self.api.submit(spec, idempotency_key=key)
                break
            except httpx.TransportError:
                pass
            except ProblemError as exc:
                if not exc.retryable:
                    raise
            assert time.monotonic() < deadline, f"could not submit {key} in {timeout_s:.0f}s"
            time.sleep(RETRY_PAUSE_S)
        self.jobs[key] = (spec, job["id"])
        return str(job["id"])

    def job_in(self, job_id: str, *states: str) -> dict[str, Any] | None:
        """The job's view if it is in one of ``states`` now, else None."""
        job: dict[str, Any] = self.api.get(job_id)
        return job if job["state"] in states else None

    def all_in(self, job_ids: Iterable[str], states: Iterable[str]) -> bool:
        wanted = set(states)
        return all(self.api.get(job_id)["state"] in wanted for job_id in job_ids)

    def unfinished(self) -> list[dict[str, Any]]:
        return [j for j in self.api.list() if j["state"] not in FINAL_STATES]

    def wait_final(self, timeout_s: float = FINAL_TIMEOUT_S) -> dict[str, dict[str, Any]]:
        """Every submitted job, once all are final (job views by id)."""

        def all_final() -> dict[str, dict[str, Any]] | None:
            jobs = {j["id"]: j for j in self.api.list(limit=200)}
            if all(jobs[i]["state"] in FINAL_STATES for _, i in self.jobs.values()):
                return jobs
            return None

        final: dict[str, dict[str, Any]] = until(all_final, "every job to be final", timeout_s)
        return final
