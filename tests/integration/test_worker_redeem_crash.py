"""A worker process SIGKILLed between sending its redemption and the receipt.

Automine is off, so the redemption sits in the node's pool when the worker dies. Then either
the transaction is mined anyway (the restarted worker must not pay itself twice) or it is lost
(the restarted worker must redeem again). Either way the chain pays exactly the ledger.

The worker is ``gpumarket worker run`` with paced stand-in executors
(tests/faults/paced_worker.py): the real daemon, reports and voucher redeemer, without loading
the model twice per case (what is under test is the redeemer, not the embedding).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from eth_account import Account
from web3 import Web3

from contracts.anvil import DEV_PRIVATE_KEYS, Anvil
from contracts.broker import PaymentBroker
from contracts.chain import Chain
from contracts.deploy import deploy, write_deployment
from contracts.events import Redeemed
from contracts.registry import WorkerRegistry
from gpumarket import Client
from tests.integration.conftest import OrchestratorProcess, WorkerProcess, wait_for_workers
from tests.support import EMBED_MODEL

pytestmark = pytest.mark.slow

DEPLOYER, PAYER, WORKER = DEV_PRIVATE_KEYS[0], DEV_PRIVATE_KEYS[6], DEV_PRIVATE_KEYS[7]
PRICE = 10**15
WAIT_S = 90.0


def _until(check: object, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _pending_from(w3: Web3, address: str) -> int:
    return w3.eth.get_transaction_count(address, "pending") - w3.eth.get_transaction_count(
        address, "latest"
    )


@pytest.mark.parametrize("tx_survives", [True, False], ids=["mined-after-crash", "lost-in-crash"])
def test_worker_killed_mid_redemption_is_paid_exactly_once(
    tmp_path: Path, tx_survives: bool
) -> None:
    with Anvil() as node:
        w3 = Web3(Web3.HTTPProvider(node.url))
        deployment = deploy(Chain.connect(node.url, DEPLOYER), min_stake_wei=10**17)
        write_deployment(deployment, tmp_path / "deployment.json")
        payer = PaymentBroker(Chain.connect(node.url, PAYER), deployment.payment_broker)
        payer.deposit(10**18)
        payer.authorize(Account.from_key(DEPLOYER).address, 10**18)
        WorkerRegistry(Chain.connect(node.url, WORKER), deployment.worker_registry).stake(10**17)
        worker_address = Account.from_key(WORKER).address
        (tmp_path / "w").mkdir()
        (tmp_path / "w" / "worker.key").write_text(WORKER + "\n")

        orchestrator = OrchestratorProcess(
            tmp_path / "orchestrator",
            GPUMARKET_DEPLOYMENT_FILE=str(tmp_path / "deployment.json"),
            GPUMARKET_RECONCILE_INTERVAL_S="0.5",
        )
        orchestrator.start()
        worker_env = {
            "GPUMARKET_WORKER_REDEEM_THRESHOLD_WEI": "1",
            "GPUMARKET_WORKER_REDEEM_POLL_S": "0.5",
            "GPUMARKET_WORKER_JOB_TYPES": '["inference"]',
        }
        price_args = ("--price", f"inference={PRICE}")
        worker = WorkerProcess(tmp_path / "w", orchestrator.url, *price_args, **worker_env).paced(
            0.05
        )
        try:
            worker.start()
            wait_for_workers(orchestrator, 1)
            w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
            with orchestrator.operator() as op:
                key = op.post("/v1/clients", json={"name": "c"}).json()["api_key"]
            with Client(orchestrator.url, key) as client:
                client.link_payer(PAYER)
                ids = [
                    client.submit(
                        {
                            "type": "inference",
                            "model": EMBED_MODEL,
                            "input": {"texts": [f"s{i}"]},
                            "max_price_wei_per_unit": str(PRICE),
                        }
                    )["id"]
                    for i in range(3)
                ]
                for job_id in ids:
                    client.wait(job_id, WAIT_S)
            _until(lambda: _pending_from(w3, worker_address) > 0, "the redemption to be sent")
            assert worker.proc is not None
            worker.proc.kill()  # SIGKILL: no receipt was ever seen
            worker.proc.wait(timeout=10)
            if not tx_survives:
                pool = w3.provider.make_request("txpool_content", [])["result"]  # type: ignore[arg-type]
                by_sender = {k.lower(): v for k, v in pool["pending"].items()}
                [tx] = by_sender[worker_address.lower()].values()
                w3.provider.make_request("anvil_dropTransaction", [tx["hash"]])  # type: ignore[arg-type]
            w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
            w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]

            restarted = WorkerProcess(
                tmp_path / "w", orchestrator.url, *price_args, **worker_env
            ).paced(0.05)
            restarted.log_path = tmp_path / "w" / "restarted.log"
            restarted.start()
            worker = restarted
            owed = 3 * PRICE
            broker = PaymentBroker(Chain.connect(node.url), deployment.payment_broker)
            _until(
                lambda: broker.redeemed(payer.chain.address, worker_address) == owed,
                "the chain to have paid the ledger",
            )
            time.sleep(2)  # room for a wrong second redemption to land, if one were coming
            redemptions = list(broker.events.read(Redeemed, deployment.deployed_at_block))
            # Killed after the first voucher was sent: that one redemption (mined) or its
            # resend (lost) pays part; later vouchers pay the rest. Never more than owed.
            assert sum(r.delta_wei for r in redemptions) == owed
            assert w3.eth.get_transaction_count(worker_address) == 1 + len(redemptions)
            with orchestrator.operator() as op:
                _until(
                    lambda: (
                        op.get("/v1/settlement").json()["pairs"][0]["redeemed_wei"] == str(owed)
                    ),
                    "the orchestrator to read the redemption back",
                )
                report = op.get("/v1/settlement").json()
            assert report["consistent"] and report["ledger_entries"] == 3
        finally:
            worker.stop()
            orchestrator.stop()
