"""Trial: three orchestrator replicas on one PostgreSQL database; SIGKILL one of them mid-run,
again and again, and start it again.

Three paced workers and a cheat know all three replicas (``--orchestrator a,b,c``) and fail
over when theirs dies; the client submits through every live replica in turn, retrying with the
same idempotency key when a replica dies under it. Every result of a new worker is checked on
another one, so verdicts (row locks on several workers at once) run beside dispatch, polls and
completions on every replica. Whichever replica dies (the one holding the background duties
included: the first one started holds them at first), every job must end once and be paid once
on chain, ledger = voucher = redeemed, the cheat's results are replaced and it is slashed on
chain, and no replica may answer 500 or log a deadlock or a serialization failure.
"""

from __future__ import annotations

import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.broker import PaymentBroker
from contracts.chain import Chain
from contracts.deploy import deploy, write_deployment
from contracts.events import Slashed
from contracts.registry import WorkerRegistry
from gpumarket import Client
from tests.faults.checks import check_exactly_once
from tests.faults.conftest import TrialReport, repeat_count
from tests.faults.market import (
    DEPLOYER_KEY,
    MIN_STAKE_WEI,
    PAYER_DEPOSIT_WEI,
    PAYER_KEY,
    Market,
    inference_spec,
    until,
)
from tests.integration.conftest import OrchestratorProcess

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.postgres]

REPLICAS = 3
WORKERS = 3  # honest ones; one cheat besides
# Every result of a worker with fewer than 20 is checked: all of the cheat's, before and after.
REPLICA_ORCHESTRATOR_ENV = {"GPUMARKET_VERIFY_RATE_NEW": "1"}
JOB_S = 0.3
JOBS_PER_ROUND = 15
KILL_DELAY_MAX_S = 0.5
# Lines no replica may log: an answer 500 (uvicorn's "Exception in ASGI application"), a
# deadlock or a serialization failure that escaped the service's re-runs.
FORBIDDEN_LOG_LINES = ("Exception in ASGI application", "deadlock detected", "could not serialize")


class ReplicatedMarket(Market):
    """The fault trials' market with ``REPLICAS`` orchestrators sharing one database, one blob
    folder, one operator token, one signer and one deployment."""

    def __init__(self, root: Path, db_url: str) -> None:
        super().__init__(root, orchestrator_env=REPLICA_ORCHESTRATOR_ENV)
        self.db_url = db_url
        self.replicas: list[OrchestratorProcess] = []
        self.clients: list[Client] = []
        self.replica_kills = 0

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
        for i in range(REPLICAS):
            replica = OrchestratorProcess(
                self.root / f"replica{i}",
                self.db_url,
                GPUMARKET_DEPLOYMENT_FILE=str(self.root / "deployment.json"),
                GPUMARKET_BLOB_DIR=str(self.root / "shared-blobs"),
                **self.orchestrator_env,
            )
            replica.start()
            self.replicas.append(replica)
        self.orchestrator = self.replicas[0]
        self.client_key = self.orchestrator.new_client_key()
        self.clients = [Client(r.url, self.client_key) for r in self.replicas]
        self.client = self.clients[0]
        self.client.link_payer(PAYER_KEY)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        for client in self.clients:
            client.close()
        for replica in self.replicas:
            replica.stop()
        self.client = None
        self.orchestrator = None
        super().close()

    def worker_url(self) -> str:
        return ",".join(r.url for r in self.replicas)

    def live(self) -> list[int]:
        return [i for i, r in enumerate(self.replicas) if r.proc and r.proc.poll() is None]

    def submit(self, key: str, spec: dict[str, Any], timeout_s: float = 60.0) -> str:
        """Through a live replica chosen by the key; another one if it dies meanwhile."""
        deadline = time.monotonic() + timeout_s
        while True:
            i = random.Random(key).choice(self.live())
            try:
                job = self.clients[i].submit(spec, idempotency_key=key)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"could not submit {key}"
                time.sleep(0.2)
        self.jobs[key] = (spec, job["id"])
        return str(job["id"])

    def kill_replica(self, i: int) -> None:
        self.replicas[i].kill()
        self.replica_kills += 1
        live = self.live()
        # Reads and checks go through a replica that is up.
        self.orchestrator = self.replicas[live[0]]
        self.client = self.clients[live[0]]

    def forbidden_log_lines(self) -> list[str]:
        found = []
        for replica in self.replicas:
            for line in replica.log_path.read_text(errors="replace").splitlines():
                if any(bad in line for bad in FORBIDDEN_LOG_LINES):
                    found.append(f"{replica.log_path}: {line}")
        return found


def _ledger_entries(market: ReplicatedMarket) -> int:
    assert market.orchestrator is not None
    with market.orchestrator.operator() as op:
        return int(op.get("/v1/settlement").json()["ledger_entries"])


@pytest.mark.timeout(900)
def test_replica_sigkill_mid_run(
    tmp_path: Path, pg_database: str, trial_report: TrialReport
) -> None:
    kills_wanted = repeat_count("REPLICA_KILLS", 3)
    rng = random.Random(11)
    with ReplicatedMarket(tmp_path, pg_database) as market:
        for i in range(WORKERS):
            market.add_worker(f"worker{i}", job_s=JOB_S)
        cheat = market.add_worker("cheat", job_s=JOB_S, cheat=True)
        market.wait_for_workers()
        for kill in range(kills_wanted):
            paid_before = _ledger_entries(market)
            for j in range(JOBS_PER_ROUND):
                market.submit(f"round-{kill}-{j}", inference_spec(f"{kill}-{j}"))
            until(partial(_ledger_entries_above, market, paid_before), "a payment this round")
            time.sleep(rng.uniform(0, KILL_DELAY_MAX_S))
            victim = kill % REPLICAS  # replica 0 (the first duties owner) dies first
            market.kill_replica(victim)
            # The market goes on without it: this round's jobs all finish on the others.
            market.wait_final()
            market.replicas[victim].start()
        counts = check_exactly_once(market)
        assert counts["jobs_succeeded"] == counts["jobs"]
        assert market.forbidden_log_lines() == []
        slashes = _slashes_on_chain(market, cheat.address)
        trial_report.record(
            replicas=REPLICAS,
            replica_kills=market.replica_kills,
            workers=WORKERS,
            cheats=1,
            slashes_on_chain=slashes,
            **counts,
        )


def _slashes_on_chain(market: ReplicatedMarket, cheat: str) -> int:
    """The cheat is slashed on chain; only the cheat, and each proof is sent once."""
    assert market.deployment is not None
    registry = WorkerRegistry(Chain.connect(market.anvil.url), market.deployment.worker_registry)
    until(lambda: registry.is_slashed(cheat), "the cheat's slash on chain", 60.0)
    slashed = list(registry.events.read(Slashed, market.deployment.deployed_at_block))
    assert {e.worker for e in slashed} == {cheat}, slashed
    proofs = [e.evidence_hash for e in slashed]
    assert len(set(proofs)) == len(proofs), f"a proof was sent twice: {slashed}"
    return len(slashed)


def _ledger_entries_above(market: ReplicatedMarket, count: int) -> bool:
    return _ledger_entries(market) > count
