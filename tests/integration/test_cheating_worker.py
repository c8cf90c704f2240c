"""Cheating workers among honest ones, all real processes on a real chain.

anvil with the contracts; an orchestrator that checks every result of a new worker
(``GPUMARKET_VERIFY_RATE_NEW=1``); two honest ``gpumarket worker run`` processes and one cheat
(tests/integration/cheating_worker.py): one that returns junk embeddings for half of its jobs,
or one that bills transcode frames the client did not ask for. The cheat is caught by a check,
loses the tie-break, is slashed on chain and gets no more work, while the honest workers keep
completing and earning, and every client result (and bill) is right.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from contracts.anvil import DEV_PRIVATE_KEYS, Anvil
from contracts.broker import PaymentBroker
from contracts.chain import Chain
from contracts.deploy import deploy, write_deployment
from contracts.registry import WorkerRegistry
from gpumarket import Client
from tests.integration.conftest import OrchestratorProcess, WorkerProcess, wait_for_workers
from tests.support import EMBED_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DEPLOYER, PAYER = DEV_PRIVATE_KEYS[0], DEV_PRIVATE_KEYS[2]
WORKER_KEYS = {"cheat": DEV_PRIVATE_KEYS[3], "honest1": DEV_PRIVATE_KEYS[4]}
WORKER_KEYS["honest2"] = DEV_PRIVATE_KEYS[5]
MIN_STAKE = 10**17
PRICE = 10**12
JOB_TIMEOUT_S = 240.0
ROUND = 6  # jobs submitted at a time


def _spec(i: int) -> dict[str, object]:
    return {
        "type": "inference",
        "model": EMBED_MODEL,
        "input": {"texts": [f"sentence number {i} about graphics cards"]},
        "max_price_wei_per_unit": str(PRICE),
    }


def _reference(texts: list[str]) -> list[list[float]]:
    """The built-in model run in this process (fp32, CPU): what an honest worker returns."""
    from protocol.jobs import Precision
    from worker.executors.inference import BUILTIN_EMBEDDING_MODEL, ModelRegistry

    model = ModelRegistry(device="cpu").get(BUILTIN_EMBEDDING_MODEL, Precision.FP32)
    return model.run_batch(texts)


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


def test_a_cheat_is_caught_slashed_and_shut_out_while_honest_workers_earn(
    tmp_path: Path,
) -> None:
    with _market(tmp_path, "inference", f"inference={PRICE}", "0.5") as market:
        cheat = Account.from_key(WORKER_KEYS["cheat"]).address
        _run_until_caught(market.orchestrator, market.registry, cheat, market.workers)


@dataclass
class Market:
    orchestrator: OrchestratorProcess
    registry: WorkerRegistry
    workers: dict[str, WorkerProcess]


@contextlib.contextmanager
def _market(
    tmp_path: Path, job_type: str, price: str, cheat_mode: str, *worker_args: str
) -> Iterator[Market]:
    """anvil, the contracts, a paying client and the operator's check payer, an orchestrator
    that checks every result of a new worker, and three workers of ``job_type`` (the "cheat"
    one run as ``cheating_worker CHEAT_MODE``), each also given ``worker_args``."""
    with Anvil() as anvil:
        deployer = Chain.connect(anvil.url, DEPLOYER)
        deployment = deploy(deployer, min_stake_wei=MIN_STAKE, withdraw_delay_s=3600)
        write_deployment(deployment, tmp_path / "deployment.json")
        for key in (PAYER, DEPLOYER):  # the client's payer, and the operator's for checks
            broker = PaymentBroker(Chain.connect(anvil.url, key), deployment.payment_broker)
            broker.deposit(10**18)
            broker.authorize(deployer.address, 10**18)
        registry = WorkerRegistry(Chain.connect(anvil.url), deployment.worker_registry)

        orchestrator = OrchestratorProcess(
            tmp_path / "orchestrator",
            GPUMARKET_DEPLOYMENT_FILE=str(tmp_path / "deployment.json"),
            GPUMARKET_VERIFY_RATE="0.05",
            GPUMARKET_VERIFY_RATE_NEW="1",
            GPUMARKET_STAKE_CHECK_INTERVAL_S="1",
            GPUMARKET_RECONCILE_INTERVAL_S="1",
        )
        workers: dict[str, WorkerProcess] = {}
        orchestrator.start()
        try:
            for name, key in WORKER_KEYS.items():
                root = tmp_path / name
                root.mkdir()
                (root / "worker.key").write_text(key + "\n")
                proc = WorkerProcess(
                    root,
                    orchestrator.url,
                    "--job-type",
                    job_type,
                    "--price",
                    price,
                    *worker_args,
                    GPUMARKET_WORKER_STAKE_WEI=str(MIN_STAKE),
                    GPUMARKET_WORKER_REDEEM_THRESHOLD_WEI="1",
                    GPUMARKET_WORKER_REDEEM_POLL_S="1",
                )
                if name == "cheat":  # the same command, with a lazy executor swapped in
                    proc.args = [
                        sys.executable,
                        "-m",
                        "tests.integration.cheating_worker",
                        cheat_mode,
                        *proc.args[3:],
                    ]
                proc.start()
                workers[name] = proc
            wait_for_workers(orchestrator, 3)
            yield Market(orchestrator, registry, workers)
        finally:
            for proc in workers.values():
                proc.stop()
            orchestrator.stop()


def _run_until_caught(
    orchestrator: OrchestratorProcess,
    registry: WorkerRegistry,
    cheat: str,
    workers: dict[str, WorkerProcess],
) -> None:
    key = orchestrator.new_client_key()
    with Client(orchestrator.url, key) as client:
        client.link_payer(PAYER)
        done: list[dict] = []
        deadline = time.monotonic() + JOB_TIMEOUT_S
        caught = False
        i = 0
        while not caught:
            assert time.monotonic() < deadline, (
                "the cheat was never caught:\n" + workers["cheat"].log()
            )
            ids = [client.submit(_spec(i + n))["id"] for n in range(ROUND)]
            i += ROUND
            for job_id in ids:
                client.wait(job_id, JOB_TIMEOUT_S)
                done.append(client.get(job_id))
            # Convicted as the job's worker ("replaced") or as a checker ("upheld").
            caught = any(
                (j.get("verification") or {}).get("slashed_address") == cheat for j in done
            )

        # Every result the client got is right: a new worker's results are all checked, so
        # not one forged embedding reached the client. Compared with the model run here.
        texts = [f"sentence number {n} about graphics cards" for n in range(i)]
        truth = _reference(texts)
        for job, expected in zip(done, truth, strict=True):
            [vector] = client.result(job["id"])["output"]["embeddings"]
            assert _cosine(vector, expected) > 0.999, job
        replaced = [j for j in done if (j["verification"] or {}).get("status") == "replaced"]
        assert all(j["verification"]["slashed_address"] == cheat for j in replaced)
        assert all(j["cost_wei"] == "0" for j in replaced)  # the client paid nothing for those
        upheld = [j for j in done if (j["verification"] or {}).get("status") == "upheld"]
        assert all(j["worker_address"] != cheat for j in upheld)  # the cheat was the checker
        assert replaced or upheld
        assert "cheating on job" in workers["cheat"].log()

        # Slashed on chain by the sweeper.
        deadline = time.monotonic() + 30
        while not registry.is_slashed(cheat):
            assert time.monotonic() < deadline, "no slash reached the chain"
            time.sleep(0.5)
        assert registry.stake_of(cheat) == 0

        # Shut out: new work goes only to the honest workers, who keep earning.
        time.sleep(2)  # a stake refresh, though the verdict excluded it already
        more = [client.submit(_spec(1000 + n))["id"] for n in range(ROUND)]
        finished = [client.wait(job_id, JOB_TIMEOUT_S) for job_id in more]
        assert cheat not in {r["worker_address"] for r in finished}
        assert {r["state"] for r in finished} == {"succeeded"}

    with orchestrator.operator() as http:
        listed = {w["address"]: w for w in http.get("/v1/workers").json()}
        report = http.get("/v1/settlement").json()
    assert listed[cheat]["reputation"] < 0.25
    honest = [a for a in listed if a != cheat]
    assert all(listed[a]["reputation"] > 0.5 for a in honest)
    earned = {p["payee"]: int(p["ledger_wei"]) for p in report["pairs"]}
    assert all(earned.get(a, 0) > 0 for a in honest)
    # The honest workers' redemptions reach the chain: earnings are real wei.
    deadline = time.monotonic() + 30
    with httpx.Client(base_url=orchestrator.url) as http:
        while not any(int(p["redeemed_wei"]) > 0 for p in report["pairs"] if p["payee"] in honest):
            assert time.monotonic() < deadline, report
            time.sleep(1)
            with orchestrator.operator() as op:
                report = op.get("/v1/settlement").json()
        assert http.get("/healthz").status_code == 200


# --- an overbilling transcoder ------------------------------------------------------------------

CLIP_SIZE, CLIP_FRAMES, CLIP_FPS = (160, 120), 24, 24  # one second of video
LADDER = [{"name": "120p", "height": 120, "fps": 12, "bitrate_kbps": 200}]
HONEST_UNITS = 160 * 120 * 12  # 12 fps for 1 s; the overbiller encodes (and bills) all 24 frames
PIXEL_PRICE = 1  # wei per output pixel


def test_a_worker_billing_frames_nobody_asked_for_is_slashed_like_any_cheat(
    tmp_path: Path,
) -> None:
    from worker.executors.transcode import make_test_clip

    clip = make_test_clip(tmp_path / "clip.mp4", *CLIP_SIZE, CLIP_FRAMES, CLIP_FPS)
    with _market(tmp_path, "transcode", f"transcode={PIXEL_PRICE}", "overbill") as market:
        orchestrator, registry = market.orchestrator, market.registry
        cheat = Account.from_key(WORKER_KEYS["cheat"]).address
        key = orchestrator.new_client_key()
        with Client(orchestrator.url, key) as client:
            client.link_payer(PAYER)
            video = client.upload_blob(clip)
            spec = {
                "type": "transcode",
                "input_blob": video,
                "renditions": LADDER,
                "max_price_wei_per_unit": str(PIXEL_PRICE),
                "max_units": 2 * CLIP_FRAMES * CLIP_SIZE[0] * CLIP_SIZE[1],
            }
            done = _transcode_until_caught(client, spec, cheat, market.workers)
            # The client got honest renditions, and paid for no frame it did not ask for.
            for job in done:
                [rendition] = client.result(job["id"])["output_blobs"]
                assert rendition["frames"] == 12, job
                assert int(job["cost_wei"]) in (0, HONEST_UNITS * PIXEL_PRICE), job
            assert "overbilling job" in market.workers["cheat"].log()
        deadline = time.monotonic() + 30
        while not registry.is_slashed(cheat):
            assert time.monotonic() < deadline, "no slash reached the chain"
            time.sleep(0.5)
        with orchestrator.operator() as http:
            listed = {w["address"]: w for w in http.get("/v1/workers").json()}
        assert listed[cheat]["reputation"] < 0.25


def _transcode_until_caught(
    client: Client, spec: dict[str, object], cheat: str, workers: dict[str, WorkerProcess]
) -> list[dict]:
    done: list[dict] = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any((j.get("verification") or {}).get("slashed_address") == cheat for j in done):
        assert time.monotonic() < deadline, (
            "the overbiller was never caught:\n" + workers["cheat"].log()
        )
        ids = [client.submit(spec)["id"] for _ in range(3)]
        for job_id in ids:
            client.wait(job_id, JOB_TIMEOUT_S)
            done.append(client.get(job_id))
    convicted = [j for j in done if (j["verification"] or {}).get("slashed_address") == cheat]
    assert all("billed units differ" in str(j["verification"]) for j in convicted), convicted
    return done


# --- a generator that makes up its tokens -------------------------------------------------------

TOKEN_PRICE = 10**9  # wei per token


def test_a_worker_making_up_generated_text_is_caught_by_teacher_forcing_and_slashed(
    tmp_path: Path,
) -> None:
    # One job at a time per worker: a round of three reaches every worker, the cheat too
    # (with free slots, the fastest one would take the whole round).
    one_slot = ("--max-concurrency", "1")
    with _market(tmp_path, "generate", f"generate={TOKEN_PRICE}", "makeup", *one_slot) as market:
        orchestrator, cheat = market.orchestrator, Account.from_key(WORKER_KEYS["cheat"]).address
        with Client(orchestrator.url, orchestrator.new_client_key()) as client:
            client.link_payer(PAYER)
            done: list[dict] = []
            deadline = time.monotonic() + JOB_TIMEOUT_S
            i = 0
            while not any((j["verification"] or {}).get("slashed_address") == cheat for j in done):
                assert time.monotonic() < deadline, market.workers["cheat"].log()
                ids = [client.submit(_generate_spec(i + n))["id"] for n in range(3)]
                i += 3
                for job_id in ids:
                    client.wait(job_id, JOB_TIMEOUT_S)
                    done.append(client.get(job_id))
            convicted = [
                j for j in done if (j["verification"] or {}).get("slashed_address") == cheat
            ]
            checks = [c for j in convicted for c in j["verification"]["checks"]]
            assert any("not what the model would produce" in str(c["detail"]) for c in checks)
            for job in done:  # made-up text never passes a check, and is never paid for
                status = (job["verification"] or {}).get("status")
                if job["worker_address"] == cheat:
                    assert status != "passed", job
                if status == "replaced":
                    assert job["cost_wei"] == "0"
            assert "cheating on job" in market.workers["cheat"].log()
        deadline = time.monotonic() + 30
        while not market.registry.is_slashed(cheat):
            assert time.monotonic() < deadline, "no slash reached the chain"
            time.sleep(0.5)


def _generate_spec(i: int) -> dict[str, object]:
    return {
        "type": "generate",
        "model": "SmolLM2-135M-Instruct",
        "generation": {"prompt": f"Fact number {i} about graphics cards:", "max_tokens": 8},
        "max_price_wei_per_unit": str(TOKEN_PRICE),
    }
