"""Gas per job: cumulative vouchers (PaymentBroker) against one escrow release per job.

    python -m bench.settlement_gas [--json OUT]

(``measure`` gives section e of ``python -m bench.run``: N = 10, 100 and 1000.)

Starts its own anvil, deploys PaymentBroker (``contracts.deploy.deploy``, dev key 0, default
fee) and the baseline ``bench/contracts/NaiveEscrow.sol``, compiled now with the pinned solc.
A client (dev key 1) deposits and authorises the orchestrator (dev key 2) as its signer.

For each N in ``JOBS_PER_REDEMPTION`` one worker does N paid jobs; the orchestrator signs one
cumulative voucher for them and the worker redeems it ("first": the pair's first redemption,
which fills a fresh storage slot). The worker then does N more jobs and redeems again
("repeat": the steady state of a worker that redeems every N jobs). Gas per job is the
redemption's gas divided by N. The baseline pays the same N jobs through NaiveEscrow, one
``release`` transaction per job; its gas per job is the total over N. A last row has the
orchestrator redeem ``BATCH_WORKERS`` workers' vouchers in one ``redeemBatch``.

Gas is each receipt's ``gasUsed`` (the 21,000 base cost included). Before the rows, one warm-up
redemption makes the signer's ``spent`` counter non-zero, as it is in steady operation, so the
first row does not carry a one-off 20,000-gas slot initialisation the others do not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress, HexStr
from eth_utils import keccak
from web3.contract import Contract
from web3.types import RPCEndpoint, TxParams, TxReceipt

from bench.table import Row as TableRow
from bench.table import ratio as table_ratio
from contracts.abi import Artifact
from contracts.anvil import DEV_PRIVATE_KEYS, Anvil
from contracts.broker import PaymentBroker
from contracts.chain import (
    BASE_FEE_MULTIPLIER,
    GAS_HEADROOM_PERCENT,
    RECEIPT_POLL_INTERVAL_S,
    RECEIPT_TIMEOUT_S,
    Chain,
)
from contracts.compile import OPTIMIZER_RUNS, compile_sources
from contracts.deploy import deploy
from protocol.vouchers import Voucher

JOBS_PER_REDEMPTION = (1, 10, 100, 1000)
BATCH_WORKERS = 10
BATCH_JOBS_PER_WORKER = 100
PRICE_WEI_PER_JOB = 10**13
"""0.00001 ETH per job: the amount only changes calldata bytes, not the storage writes."""
VOUCHER_TTL_S = 86_400
WORKER_GAS_WEI = 10**18
"""Each worker's own ETH, for the gas of its redemptions (and so it is not a new account)."""
NAIVE_ESCROW_SOURCE = Path(__file__).parent / "contracts" / "NaiveEscrow.sol"
NAIVE_ESCROW = "NaiveEscrow"

DEPLOYER_KEY = DEV_PRIVATE_KEYS[0]
CLIENT_KEY = DEV_PRIVATE_KEYS[1]
ORCHESTRATOR_KEY = DEV_PRIVATE_KEYS[2]


# ---- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the table. Gas in gas units; ``workers`` × ``jobs_per_worker`` jobs are
    paid by one voucher redemption (``redeemBatch`` when ``workers`` > 1) or by that many
    escrow releases."""

    label: str
    workers: int
    jobs_per_worker: int
    voucher_first_redeem_gas: int
    voucher_repeat_redeem_gas: int
    escrow_total_gas: int

    @property
    def jobs(self) -> int:
        return self.workers * self.jobs_per_worker

    @property
    def voucher_first_gas_per_job(self) -> float:
        return self.voucher_first_redeem_gas / self.jobs

    @property
    def voucher_repeat_gas_per_job(self) -> float:
        return self.voucher_repeat_redeem_gas / self.jobs

    @property
    def escrow_gas_per_job(self) -> float:
        return self.escrow_total_gas / self.jobs

    @property
    def escrow_over_voucher_first(self) -> float:
        return self.escrow_gas_per_job / self.voucher_first_gas_per_job

    @property
    def escrow_over_voucher_repeat(self) -> float:
        return self.escrow_gas_per_job / self.voucher_repeat_gas_per_job

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "jobs": self.jobs,
            "voucher_first_gas_per_job": self.voucher_first_gas_per_job,
            "voucher_repeat_gas_per_job": self.voucher_repeat_gas_per_job,
            "escrow_gas_per_job": self.escrow_gas_per_job,
            "escrow_over_voucher_first": self.escrow_over_voucher_first,
            "escrow_over_voucher_repeat": self.escrow_over_voucher_repeat,
        }


@dataclass(frozen=True)
class Report:
    """The rows and what they were measured with; ``wall_s`` is the whole run, seconds."""

    rows: tuple[Row, ...]
    anvil_version: str
    evm_hardfork: str
    solc_version: str
    optimizer_runs: int
    fee_bps: int
    price_wei_per_job: int
    wall_s: float

    def as_json(self) -> dict[str, Any]:
        return {
            "anvil_version": self.anvil_version,
            "evm_hardfork": self.evm_hardfork,
            "solc_version": self.solc_version,
            "optimizer_runs": self.optimizer_runs,
            "fee_bps": self.fee_bps,
            "price_wei_per_job": self.price_wei_per_job,
            "wall_s": self.wall_s,
            "rows": [row.as_json() for row in self.rows],
        }

    def table(self) -> str:
        """The results as a plain-text (ASCII) table with a title and a legend."""
        header = (
            "jobs/redemption",
            "redeem gas first",
            "redeem gas repeat",
            "gas/job first",
            "gas/job repeat",
            "escrow gas/job",
            "escrow/voucher first",
            "escrow/voucher repeat",
        )
        lines = [
            (
                row.label,
                f"{row.voucher_first_redeem_gas:,}",
                f"{row.voucher_repeat_redeem_gas:,}",
                f"{row.voucher_first_gas_per_job:,.1f}",
                f"{row.voucher_repeat_gas_per_job:,.1f}",
                f"{row.escrow_gas_per_job:,.1f}",
                f"{row.escrow_over_voucher_first:,.2f}x",
                f"{row.escrow_over_voucher_repeat:,.2f}x",
            )
            for row in self.rows
        ]
        widths = [max(len(cells[i]) for cells in (header, *lines)) for i in range(len(header))]

        def render(cells: Sequence[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
            return "  ".join((first, *rest))

        title = (
            "Settlement gas, cumulative vouchers (PaymentBroker) vs one NaiveEscrow release "
            f"per job: anvil {self.anvil_version} (hardfork {self.evm_hardfork}), "
            f"solc {self.solc_version}, optimizer {self.optimizer_runs} runs, "
            f"fee {self.fee_bps} bps, run took {self.wall_s:.0f} s"
        )
        legend = (
            "first: the worker's first redemption from this payer; repeat: each later one "
            "(steady state).\ngas/job = voucher redemption gas / jobs; escrow gas/job = "
            "total gas of one release transaction per job / jobs."
        )
        rule = "-" * len(render(header))
        body = (render(cells) for cells in lines)
        return "\n".join((title, render(header), rule, *body, rule, legend))


# ---- the baseline contract --------------------------------------------------------------


def compile_naive_escrow() -> Artifact:
    """NaiveEscrow compiled now with the pinned solc (CompileError if that fails)."""
    raw = NAIVE_ESCROW_SOURCE.read_bytes()
    compilation = compile_sources({f"{NAIVE_ESCROW}.sol": raw.decode()})
    for warning in compilation.warnings:
        print(warning, file=sys.stderr)
    contract = compilation.contract(f"{NAIVE_ESCROW}.sol", NAIVE_ESCROW)
    return Artifact(
        contract_name=NAIVE_ESCROW,
        abi=contract["abi"],
        bytecode="0x" + contract["evm"]["bytecode"]["object"],
        deployed_bytecode="0x" + contract["evm"]["deployedBytecode"]["object"],
        compiler=compilation.solc_version,
        source_sha256=hashlib.sha256(raw).hexdigest(),
    )


# ---- the market under test --------------------------------------------------------------


@dataclass
class _Market:
    chain: Chain
    client: PaymentBroker  # sends from the client's key
    orchestrator: PaymentBroker  # sends and signs vouchers from the orchestrator's key
    escrow: Contract
    owed_wei: dict[str, int]  # cumulative wei owed per worker (the orchestrator's ledger)
    next_job: int = 0

    def voucher_for(self, worker: str, jobs: int) -> tuple[Voucher, str]:
        """Credit ``jobs`` paid jobs to ``worker``; the latest cumulative voucher, signed."""
        self.owed_wei[worker] = self.owed_wei.get(worker, 0) + jobs * PRICE_WEI_PER_JOB
        voucher = Voucher(
            payer=self.client.chain.address,
            payee=worker,
            cumulative_amount=self.owed_wei[worker],
            expiry=int(time.time()) + VOUCHER_TTL_S,
        )
        return voucher, self.orchestrator.sign_voucher(voucher)

    def job_id(self) -> bytes:
        """A fresh 32-byte job id; hashed so its calldata costs what a real id's would."""
        self.next_job += 1
        return bytes(keccak(text=f"gpumarket bench job {self.next_job}"))


def _worker(chain: Chain, name: str) -> LocalAccount:
    """A throwaway worker key for this private anvil, given ``WORKER_GAS_WEI`` to spend."""
    account: LocalAccount = Account.from_key(keccak(text=f"gpumarket bench worker {name}"))
    chain.w3.provider.make_request(
        RPCEndpoint("anvil_setBalance"), [account.address, hex(WORKER_GAS_WEI)]
    )
    return account


def _setup(rpc_url: str, escrow_artifact: Artifact, voucher_jobs: int, escrow_jobs: int) -> _Market:
    chain = Chain.connect(rpc_url, DEPLOYER_KEY)
    deployment = deploy(chain)
    client_chain = chain.with_key(CLIENT_KEY)
    orchestrator_chain = chain.with_key(ORCHESTRATOR_KEY)
    client = PaymentBroker(client_chain, deployment.payment_broker)
    orchestrator = client.with_chain(orchestrator_chain)

    deposit_wei = voucher_jobs * PRICE_WEI_PER_JOB
    client.deposit(deposit_wei)
    client.authorize(orchestrator_chain.address, deposit_wei)

    receipt = client_chain.wait(client_chain.deploy(escrow_artifact, orchestrator_chain.address))
    escrow = client_chain.contract(str(receipt["contractAddress"]), escrow_artifact.abi)
    client_chain.transact(escrow, "fund", value_wei=escrow_jobs * PRICE_WEI_PER_JOB)
    return _Market(
        chain=chain, client=client, orchestrator=orchestrator, escrow=escrow, owed_wei={}
    )


# ---- measurements -----------------------------------------------------------------------


def _redeem_gas(market: _Market, workers: Sequence[LocalAccount], jobs_per_worker: int) -> int:
    """Gas of one redemption paying ``jobs_per_worker`` more jobs to each worker: a lone
    worker redeems its own voucher; several are redeemed by the orchestrator in one batch."""
    signed = [market.voucher_for(worker.address, jobs_per_worker) for worker in workers]
    vouchers = [voucher for voucher, _ in signed]
    signatures = [signature for _, signature in signed]
    if len(workers) == 1:
        own_chain = market.chain.with_key(workers[0].key)
        result = market.client.with_chain(own_chain).redeem(vouchers[0], signatures[0])
    else:
        result = market.orchestrator.redeem_batch(vouchers, signatures)
    expected_wei = len(workers) * jobs_per_worker * PRICE_WEI_PER_JOB
    if result.paid_wei + result.fee_wei != expected_wei:
        raise RuntimeError(
            f"redemption moved {result.paid_wei + result.fee_wei} wei, expected {expected_wei}"
        )
    return result.gas_used


def _escrow_gas(market: _Market, workers: Sequence[LocalAccount], jobs_per_worker: int) -> int:
    """Total gas of paying each worker ``jobs_per_worker`` jobs, one release per job."""
    calls = [
        market.escrow.encode_abi(
            "release", args=[worker.address, PRICE_WEI_PER_JOB, market.job_id()]
        )
        for worker in workers
        for _ in range(jobs_per_worker)
    ]
    escrow_chain = market.orchestrator.chain
    before_wei = escrow_chain.balance_wei(market.escrow.address)
    receipts = send_all(escrow_chain, market.escrow.address, calls)
    moved_wei = before_wei - escrow_chain.balance_wei(market.escrow.address)
    if moved_wei != len(calls) * PRICE_WEI_PER_JOB:
        raise RuntimeError(f"escrow paid out {moved_wei} wei for {len(calls)} jobs")
    return sum(int(receipt["gasUsed"]) for receipt in receipts)


def send_all(chain: Chain, to: ChecksumAddress, calls: Sequence[HexStr]) -> list[TxReceipt]:
    """Send one transaction per call from ``chain``'s key, then wait for all of them.

    ``Chain.send`` estimates gas and reads fees and the nonce for every transaction, and
    ``Chain.transact`` waits for each receipt; here the calls all have the same shape, so the
    first one's estimate and the fees are reused and nonces are counted locally. Raises
    RuntimeError if any transaction failed.
    """
    if not calls:
        return []
    w3 = chain.w3
    probe: TxParams = {"from": chain.address, "to": to, "data": calls[0]}
    gas = int(w3.eth.estimate_gas(probe)) * (100 + GAS_HEADROOM_PERCENT) // 100
    base_fee = int(w3.eth.get_block("latest").get("baseFeePerGas", 0) or 0)
    tip = int(w3.eth.max_priority_fee)
    nonce = int(w3.eth.get_transaction_count(chain.address, "pending"))
    hashes = []
    for offset, data in enumerate(calls):
        transaction: dict[str, Any] = {
            "type": 2,
            "chainId": chain.chain_id,
            "nonce": nonce + offset,
            "to": to,
            "data": data,
            "value": 0,
            "gas": gas,
            "maxFeePerGas": base_fee * BASE_FEE_MULTIPLIER + tip,
            "maxPriorityFeePerGas": tip,
        }
        signed = chain.account.sign_transaction(transaction)
        hashes.append(w3.eth.send_raw_transaction(signed.raw_transaction))
    receipts = [
        w3.eth.wait_for_transaction_receipt(
            tx_hash, timeout=RECEIPT_TIMEOUT_S, poll_latency=RECEIPT_POLL_INTERVAL_S
        )
        for tx_hash in hashes
    ]
    failed = [receipt for receipt in receipts if receipt["status"] != 1]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(receipts)} transactions to {to} failed")
    return receipts


def _measure_row(
    market: _Market, label: str, workers: Sequence[LocalAccount], jobs_per_worker: int
) -> Row:
    first_gas = _redeem_gas(market, workers, jobs_per_worker)
    repeat_gas = _redeem_gas(market, workers, jobs_per_worker)
    return Row(
        label=label,
        workers=len(workers),
        jobs_per_worker=jobs_per_worker,
        voucher_first_redeem_gas=first_gas,
        voucher_repeat_redeem_gas=repeat_gas,
        escrow_total_gas=_escrow_gas(market, workers, jobs_per_worker),
    )


def run_bench(
    jobs_per_redemption: Sequence[int] = JOBS_PER_REDEMPTION,
    *,
    batch_workers: int = BATCH_WORKERS,
    batch_jobs_per_worker: int = BATCH_JOBS_PER_WORKER,
) -> Report:
    """Measure every row on one fresh anvil. ``batch_workers`` 0 leaves the batch row out."""
    if any(n < 1 for n in jobs_per_redemption) or batch_workers < 0 or batch_jobs_per_worker < 1:
        raise ValueError("job and worker counts must be positive")
    started = time.monotonic()
    escrow_artifact = compile_naive_escrow()
    batch_jobs = batch_workers * batch_jobs_per_worker
    escrow_jobs = sum(jobs_per_redemption) + batch_jobs
    warm_up_jobs = 1
    voucher_jobs = warm_up_jobs + 2 * escrow_jobs  # each row redeems twice: first and repeat
    with Anvil() as anvil:
        market = _setup(anvil.url, escrow_artifact, voucher_jobs, escrow_jobs)
        _redeem_gas(market, [_worker(market.chain, "warm-up")], warm_up_jobs)
        rows = [
            _measure_row(market, str(n), [_worker(market.chain, f"single {n}")], n)
            for n in jobs_per_redemption
        ]
        if batch_workers:
            workers = [_worker(market.chain, f"batch {i}") for i in range(batch_workers)]
            label = f"{batch_workers} x {batch_jobs_per_worker} (batch)"
            rows.append(_measure_row(market, label, workers, batch_jobs_per_worker))
        anvil_version = market.chain.w3.client_version.split("/")[-1].removeprefix("v")
        node_info = market.chain.w3.provider.make_request(RPCEndpoint("anvil_nodeInfo"), [])
        evm_hardfork = str(node_info["result"]["hardFork"])
        fee_bps = market.client.fee_bps()
    return Report(
        rows=tuple(rows),
        anvil_version=anvil_version,
        evm_hardfork=evm_hardfork,
        solc_version=escrow_artifact.compiler.split("+")[0],
        optimizer_runs=OPTIMIZER_RUNS,
        fee_bps=fee_bps,
        price_wei_per_job=PRICE_WEI_PER_JOB,
        wall_s=time.monotonic() - started,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.settlement_gas",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    args = parser.parse_args(argv)
    report = run_bench()
    print(report.table())
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---- rows for bench.run (section e) --------------------------------------------------------

SECTION = "e"
TABLE_JOBS_PER_REDEMPTION = (10, 100, 1000)
QUICK_JOBS_PER_REDEMPTION = (10, 100)
GOAL_JOBS_PER_REDEMPTION = 100
GOAL_GAS_PER_JOB = 1000


def rows_for_table(report: Report) -> list[TableRow]:
    """One ``bench.table.Row`` per N: the steady-state ("repeat") voucher gas per job against
    one escrow release per job; the row at ``GOAL_JOBS_PER_REDEMPTION`` carries the goal."""
    rows = []
    for row in report.rows:
        if row.workers != 1:
            continue
        at_goal = row.jobs_per_worker == GOAL_JOBS_PER_REDEMPTION
        value = row.voucher_repeat_gas_per_job
        rows.append(
            TableRow(
                section=SECTION,
                name=f"settlement gas per job, {row.jobs_per_worker:,} jobs per redemption",
                value=value,
                unit="gas/job",
                baseline_name="one escrow release per job, gas/job",
                baseline_value=row.escrow_gas_per_job,
                ratio=table_ratio(value, row.escrow_gas_per_job),
                goal=f"<= {GOAL_GAS_PER_JOB:,} gas/job" if at_goal else "",
                met=value <= GOAL_GAS_PER_JOB if at_goal else None,
                note=(
                    f"steady state (each later redemption); a worker's first redemption from "
                    f"a payer: {row.voucher_first_gas_per_job:,.1f} gas/job; anvil "
                    f"{report.anvil_version}, solc {report.solc_version}"
                ),
            )
        )
    return rows


def measure(quick: bool) -> list[TableRow]:
    """Section e of ``bench.run``: N = 10, 100, 1000 (10, 100 when ``quick``)."""
    sizes = QUICK_JOBS_PER_REDEMPTION if quick else TABLE_JOBS_PER_REDEMPTION
    return rows_for_table(run_bench(sizes, batch_workers=0))
