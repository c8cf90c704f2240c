"""What every fault trial must find afterwards, whatever it broke on the way:

1. every job is final;
2. one job per idempotency key (replaying each submit returns the same job, and the client's
   list holds nothing else), and each succeeded job's result is one result: the same on every
   read, from the attempt and worker the job names, signed by that worker, and the output that
   job's input gives (the paced executors are pure functions of the input);
3. each paid job is paid exactly once on chain: per worker, the wei the Redeemed events moved
   = what the chain says was redeemed = the sum of the succeeded jobs' costs = the
   orchestrator's ledger = its latest voucher, and there is one ledger entry per paid job;
4. the orchestrator's redemption rows are exactly the chain's Redeemed events: per worker the
   same count, paid and fee wei, and ``/v1/settlement`` finds no row or event without the other;
5. a job whose result verification replaced (a cheat's) holds the right output and cost 0.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

from eth_account import Account

from contracts.events import Redeemed
from protocol.signing import output_sha256, recover_job_result_signer
from tests.faults.market import PAYER_KEY, Market, until
from tests.faults.paced_worker import embedding, rendition_bytes

SETTLE_TIMEOUT_S = 90.0


def check_exactly_once(market: Market) -> dict[str, int]:
    """Run every check; returns the counts for the trial's summary."""
    jobs = market.wait_final()
    _check_one_job_per_key(market)
    states = Counter(jobs[job_id]["state"] for _, job_id in market.jobs.values())
    paid = Counter[str]()
    paid_jobs = replaced = 0
    for spec, job_id in market.jobs.values():
        job = jobs[job_id]
        if job["state"] != "succeeded":
            continue
        if (job.get("verification") or {}).get("status") == "replaced":
            _check_replaced(market, spec, job)
            replaced += 1
            continue
        result = _check_result(market, spec, job)
        paid[result["worker_address"]] += int(result["cost_wei"])
        paid_jobs += 1
    redemptions = _check_paid_once(market, paid, paid_jobs=paid_jobs)
    return {
        "jobs": len(market.jobs),
        **{f"jobs_{state}": n for state, n in sorted(states.items())},
        "jobs_replaced": replaced,
        "paid_wei": sum(paid.values()),
        "redemptions": redemptions,
    }


def _check_replaced(market: Market, spec: dict[str, Any], job: dict[str, Any]) -> None:
    """A result verification proved wrong: the client has the result two other workers agreed
    on (the right output for its input), pays nothing, and the job's worker was slashed."""
    result = market.api.result(job["id"])
    assert job["cost_wei"] == result["cost_wei"] == "0", job
    assert job["verification"]["slashed_address"] == job["worker_address"], job
    texts = spec["input"]["texts"]
    assert result["output"] == {"embeddings": [embedding(t) for t in texts]}, job["id"]


def _check_one_job_per_key(market: Market) -> None:
    ids = [job_id for _, job_id in market.jobs.values()]
    assert len(set(ids)) == len(ids), "two idempotency keys made the same job"
    listed = [j["id"] for j in market.api.list(limit=200)]
    assert sorted(listed) == sorted(ids), "the client has jobs it did not submit once"
    for key, (spec, job_id) in list(market.jobs.items()):
        assert market.submit(key, spec) == job_id, f"replaying {key} made a second job"


def _check_result(market: Market, spec: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    first = market.api.result(job["id"])
    assert market.api.result(job["id"]) == first, f"job {job['id']}: the result changed"
    assert first["attempt"] == job["attempt"]
    assert first["worker_address"] == job["worker_address"]
    assert first["cost_wei"] == job["cost_wei"] and int(first["cost_wei"]) > 0
    proof = first.get("batch") or {}  # reported in a batch: proven by its place in it
    signer = recover_job_result_signer(
        job["id"],
        first["attempt"],
        first["output_sha256"],
        first["units"],
        int(first["price_wei_per_unit"]),
        first["signature"],
        proof.get("result_hashes"),
        proof.get("index"),
        batch_count=proof.get("count"),
        batch_path=proof.get("path"),
    )
    assert signer == first["worker_address"], f"job {job['id']}: result not signed by its worker"
    if spec["type"] == "inference":
        texts = spec["input"]["texts"]
        assert first["output"] == {"embeddings": [embedding(t) for t in texts]}
        assert first["output_sha256"] == output_sha256(first["output"])
    else:
        _check_renditions(market, spec, first, market.root / "downloads" / job["id"])
    return first


def _check_renditions(
    market: Market, spec: dict[str, Any], result: dict[str, Any], folder: Any
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    heights = [r["height"] for r in spec["renditions"]]
    assert [b["height"] for b in result["output_blobs"]] == heights
    for blob in result["output_blobs"]:
        data = market.api.download_blob(blob["sha256"], folder / blob["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == blob["sha256"]
        assert data == rendition_bytes(spec["input_blob"], blob["height"], len(data))


def _check_paid_once(market: Market, paid: Counter[str], paid_jobs: int) -> int:
    """Wait for the workers to redeem everything, then compare chain, ledger and vouchers.
    Returns the number of redemptions on chain."""
    assert market.deployment is not None and market.orchestrator is not None
    payer = Account.from_key(PAYER_KEY).address
    broker = market.broker()
    until(
        lambda: all(broker.redeemed(payer, payee) == wei for payee, wei in paid.items()),
        "the workers to redeem what the jobs cost",
        SETTLE_TIMEOUT_S,
    )
    events = [
        e
        for e in broker.events.read(Redeemed, market.deployment.deployed_at_block)
        if e.payer == payer
    ]
    moved = Counter[str]()
    for event in events:
        moved[event.payee] += event.delta_wei
    assert moved == paid, f"the chain moved {dict(moved)} but the jobs cost {dict(paid)}"

    with market.orchestrator.operator() as op:

        def read_back() -> dict[str, Any] | None:
            report: dict[str, Any] = op.get("/v1/settlement").json()
            redeemed = {p["payee"]: int(p["redeemed_wei"]) for p in report["pairs"]}
            return report if redeemed == dict(paid) else None

        report = until(read_back, "the orchestrator to read the redemptions", SETTLE_TIMEOUT_S)
    for pair in report["pairs"]:
        assert pair["payer"] == payer
        assert int(pair["ledger_wei"]) == int(pair["voucher_wei"]) == paid[pair["payee"]], pair
    assert report["ledger_entries"] == paid_jobs, report
    assert report["consistent"] and report["problems"] == [], report
    _check_rows_are_the_chain_events(report, events)
    return len(events)


def _check_rows_are_the_chain_events(report: dict[str, Any], events: list[Redeemed]) -> None:
    """Per worker, the orchestrator's rows = the events this check read from the chain itself."""
    on_chain: dict[str, tuple[int, int, int]] = {}
    for e in events:
        count, paid, fee = on_chain.get(e.payee, (0, 0, 0))
        on_chain[e.payee] = (count + 1, paid + e.paid_wei, fee + e.fee_wei)
    rows = {
        p["payee"]: (p["redemptions"], int(p["paid_wei"]), int(p["fee_wei"]))
        for p in report["pairs"]
        if p["redemptions"]
    }
    assert rows == on_chain, f"redemption rows {rows} but the chain has {on_chain}"
    assert report["through_block"] >= max((e.block_number for e in events), default=0), report
