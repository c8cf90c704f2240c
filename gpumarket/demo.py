"""``make demo``: a whole local marketplace in one command; ``gpumarket up``: the same stack, left
running.

Starts anvil with the contracts, an orchestrator and two staked workers as real processes on
loopback, submits embedding jobs and a transcoding job (its input clip made here with PyAV),
shows progress, prints results with verification outcome, cost, energy, CO2 and gas per job,
and balances before and after redemption; stops every process it started, also on Ctrl-C or
failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from eth_account import Account
from eth_typing import HexStr
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from contracts.anvil import DEV_PRIVATE_KEYS, Anvil
from contracts.broker import PaymentBroker
from contracts.chain import Chain
from contracts.deploy import Deployment, deploy, write_deployment
from contracts.events import Redeemed
from contracts.registry import WorkerRegistry
from gpumarket.output import Column, print_fields, print_table
from gpumarket.sdk import FINAL_STATES, Client

READY_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 60.0
MIN_STAKE_WEI = 10**17
PAYER_DEPOSIT_WEI = 10**18
# The operator (the deployer, who signs vouchers) pays the workers that run verification checks.
OPERATOR_DEPOSIT_WEI = 10**18
# New workers get half their results re-run on the other worker, so the demo shows checks.
DEMO_VERIFY_RATE_NEW = "0.5"
# anvil's well-known dev accounts (the local dev chain only): 2 pays, 3 and 4 work.
DEV_KEY = DEV_PRIVATE_KEYS[0]  # deploys, signs vouchers, arbitrates, pays for checks
PAYER_KEY = DEV_PRIVATE_KEYS[2]
WORKER_KEYS = (DEV_PRIVATE_KEYS[3], DEV_PRIVATE_KEYS[4])
WORKER_OFFERS = (("800000000000000", "50"), ("1000000000000000", "400"))  # wei/item, gCO2/kWh
TRANSCODE_PRICE_WEI = "10000000"  # per output pixel
JOB_TIMEOUT_S = 300.0
SENTENCES = [
    "A worker with an idle GPU earns by running other people's jobs.",
    "Idle graphics cards can serve inference for strangers.",
    "The orchestrator matches each job to the best worker.",
    "Paris is the capital of France.",
    "Transcoding turns one video into a ladder of renditions.",
    "Cheaters are caught by re-running a sample of jobs elsewhere.",
    "Payment vouchers are signed off-chain and redeemed in one transaction.",
    "The weather today is sunny with a light breeze.",
]
OPERATOR_TOKEN_BYTES = 24
EMBED_MODEL = "all-MiniLM-L6-v2"
TRY_IT = "Try it, from this folder"
UP_READY = "Ctrl-C (or SIGTERM) stops everything."
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CLIP_FRAMES = 48

# soft_wrap: a URL, key or command is never folded, on a terminal or into a file.
console = Console(soft_wrap=True, highlight=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Stack:
    """Child processes that are always stopped: SIGTERM, then SIGKILL after a grace period."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = (self.root / f"{name}.log").open("ab")
        with log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gpumarket.cli", *args],
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop the children in order
            )
        self.procs.append((name, proc))

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = (self.root / f"{name}.log").read_text()[-1500:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        """Every child, in reverse start order. A second Ctrl-C or SIGTERM while stopping is
        ignored, so it cannot cut the shutdown short and leave a child running."""
        with _signals_ignored():
            self._stop()

    def _stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored inside (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM stops the stack as Ctrl-C does: every child stopped, the temp folder removed."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Market:
    url: str
    token: str
    rpc_url: str
    deployment: Deployment
    workers: tuple[str, ...]
    stack: Stack


@contextlib.contextmanager
def local_stack(
    root: Path, port: int | None = None, chain_port: int | None = None, *, generate: bool = False
) -> Iterator[Market]:
    """anvil with the contracts, a funded payer, an orchestrator and two staked workers, on
    ``port`` and ``chain_port`` (None: any free port); with ``generate``, the workers also
    offer the built-in LLM (per token)."""
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    token = "gmo_demo_" + os.urandom(OPERATOR_TOKEN_BYTES).hex()
    with (root / "anvil.log").open("ab") as anvil_log, Anvil(chain_port, log=anvil_log) as node:
        deployer = Chain.connect(node.url, DEV_KEY)  # anvil dev keys: dev chain
        deployment = deploy(deployer, withdraw_delay_s=3600, min_stake_wei=MIN_STAKE_WEI)
        write_deployment(deployment, root / "deployment.json")
        payer = PaymentBroker(Chain.connect(node.url, PAYER_KEY), deployment.payment_broker)
        payer.deposit(PAYER_DEPOSIT_WEI)
        payer.authorize(deployer.address, PAYER_DEPOSIT_WEI)
        operator = PaymentBroker(deployer, deployment.payment_broker)
        operator.deposit(OPERATOR_DEPOSIT_WEI)
        operator.authorize(deployer.address, OPERATOR_DEPOSIT_WEI)
        stack = Stack(root)
        try:
            stack.spawn(
                "orchestrator",
                [
                    "orchestrator",
                    "serve",
                    "--port",
                    str(port),
                    "--data-dir",
                    str(root / "orchestrator"),
                ],
                {
                    "GPUMARKET_ADMIN_TOKEN": token,
                    "GPUMARKET_LOG_LEVEL": "warning",
                    "GPUMARKET_DEPLOYMENT_FILE": str(root / "deployment.json"),
                    "GPUMARKET_STAKE_CHECK_INTERVAL_S": "1",
                    "GPUMARKET_RECONCILE_INTERVAL_S": "1",
                    "GPUMARKET_VERIFY_RATE_NEW": DEMO_VERIFY_RATE_NEW,
                },
            )
            _wait_ready(url, stack)
            workers = []
            for i, (price, intensity) in enumerate(WORKER_OFFERS):
                key_file = root / f"worker{i + 1}.key"
                key_file.write_text(WORKER_KEYS[i] + "\n")
                workers.append(Account.from_key(WORKER_KEYS[i]).address)
                stack.spawn(
                    f"worker{i + 1}",
                    [
                        "worker",
                        "run",
                        "--orchestrator",
                        url,
                        "--key-file",
                        str(key_file),
                        "--work-dir",
                        str(root / f"work{i + 1}"),
                        "--price",
                        f"inference={price}",
                        "--price",
                        f"transcode={TRANSCODE_PRICE_WEI}",
                        "--carbon-intensity",
                        intensity,
                        "--max-concurrency",
                        "4",
                        *(GENERATE_FLAGS if generate else ()),
                    ],
                    {
                        "GPUMARKET_WORKER_LOG_LEVEL": "warning",
                        "GPUMARKET_WORKER_STAKE_WEI": str(MIN_STAKE_WEI),
                        "GPUMARKET_WORKER_REDEEM_THRESHOLD_WEI": "1",
                        "GPUMARKET_WORKER_REDEEM_POLL_S": "1",
                    },
                )
            yield Market(url, token, node.url, deployment, tuple(workers), stack)
            stack.check_alive()
        finally:
            stack.stop()


def _wait_ready(url: str, stack: Stack) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        stack.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"orchestrator not ready after {READY_TIMEOUT_S:.0f}s")


def _wait_workers(url: str, token: str, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
        while time.monotonic() < deadline:
            workers: list[dict[str, object]] = http.get("/v1/workers").json()
            if len(workers) >= count:
                return workers
            time.sleep(0.5)
    raise RuntimeError(f"{count} workers did not register within {READY_TIMEOUT_S:.0f}s")


def _track(client: Client, job_ids: list[str]) -> dict[str, dict[str, object]]:
    """Poll until every job is final, with a progress bar; returns the final job views."""
    final: dict[str, dict[str, object]] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("jobs finished", total=len(job_ids))
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while len(final) < len(job_ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"jobs not finished after {JOB_TIMEOUT_S:.0f}s")
            for job_id in job_ids:
                if job_id not in final:
                    job = client.get(job_id)
                    if job["state"] in FINAL_STATES:
                        final[job_id] = job
            progress.update(bar, completed=len(final))
            time.sleep(0.2)
    return final


JOB_REPORT_COLUMNS = (
    Column("job"),
    Column("state"),
    Column("worker"),
    Column("verified"),
    Column("units", right=True),
    Column("cost wei", right=True),
    Column("s", right=True),
    Column("J", right=True),
    Column("gCO2", right=True),
    Column("result"),
)
MONEY_COLUMNS = (
    Column("account"),
    Column("before", right=True),
    Column("after", right=True),
    Column("change", right=True),
)


def _report(client: Client, jobs: dict[str, dict[str, object]], labels: dict[str, str]) -> None:
    rows = []
    for job_id, job in jobs.items():
        summary = "-"
        if job["state"] == "succeeded":
            result = client.result(job_id)
            if result.get("output"):
                vector = result["output"]["embeddings"][0]
                summary = f"{len(vector)}-d [{vector[0]:+.2f}, ...]"
            else:
                summary = " ".join(f"{b['height']}p" for b in result["output_blobs"])
        worker = str(job.get("worker_address") or "-")
        verification = job.get("verification")
        verified = "not sampled"
        if isinstance(verification, dict):
            verified = str(verification["status"])
            checks = verification.get("checks") or []
            if checks and checks[0].get("value") is not None:
                verified += f" ({checks[0]['metric']} {checks[0]['value']:.4f})"
        rows.append(
            [
                labels[job_id],
                str(job["state"]),
                worker,
                verified,
                str(job.get("units")),
                str(job.get("cost_wei")),
                f"{job.get('duration_s') or 0:.2f}",
                f"{job.get('energy_j') or 0:.2f}",
                f"{job.get('co2_g') or 0:.3g}",
                summary,
            ]
        )
    print_table(console, JOB_REPORT_COLUMNS, rows, title="Jobs")
    sources = {str(j.get("energy_source")) for j in jobs.values()}
    console.print(
        f"energy source: {', '.join(sorted(sources))} (nvml/rapl measured, else estimate)"
    )


def _wait_staked(market: Market) -> None:
    registry = WorkerRegistry(Chain.connect(market.rpc_url), market.deployment.worker_registry)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not all(registry.is_eligible(w) for w in market.workers):
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not stake in time")
        time.sleep(0.3)


def _wait_settled(market: Market) -> dict[str, object]:
    """Until every worker has redeemed what the ledger owes it (read back from the chain)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    with httpx.Client(
        base_url=market.url, headers={"Authorization": f"Bearer {market.token}"}
    ) as http:
        while True:
            report: dict[str, object] = http.get("/v1/settlement").json()
            pairs = report["pairs"]
            assert isinstance(pairs, list)
            if pairs and all(p["redeemed_wei"] == p["ledger_wei"] for p in pairs):
                return report
            if time.monotonic() > deadline:
                raise RuntimeError(f"redemptions incomplete after {SETTLE_TIMEOUT_S:.0f}s")
            time.sleep(0.5)


def _balances(market: Market, payer: str) -> dict[str, int]:
    chain = Chain.connect(market.rpc_url)
    broker = PaymentBroker(chain, market.deployment.payment_broker)
    found = {w: chain.balance_wei(w) for w in market.workers}
    found["payer deposit"] = broker.balance_of(payer)
    found["operator deposit (checks)"] = broker.balance_of(Account.from_key(DEV_KEY).address)
    return found


def _redemption_gas(market: Market) -> tuple[int, int]:
    """(redemption transactions, gas they used), read back from the chain."""
    chain = Chain.connect(market.rpc_url)
    broker = PaymentBroker(chain, market.deployment.payment_broker)
    start = market.deployment.deployed_at_block
    txs = {e.tx_hash for e in broker.events.read(Redeemed, start, chain.block_number())}
    gas = 0
    for tx in txs:
        gas += int(chain.w3.eth.get_transaction_receipt(HexStr(tx))["gasUsed"])
    return len(txs), gas


def _report_money(
    before: dict[str, int], after: dict[str, int], settled: dict[str, object]
) -> None:
    rows = [
        [account, str(was), str(after[account]), f"{after[account] - was:+d}"]
        for account, was in before.items()
    ]
    print_table(console, MONEY_COLUMNS, rows, title="On chain (wei)")
    pairs = settled["pairs"]
    assert isinstance(pairs, list)
    operator = Account.from_key(DEV_KEY).address
    for p in pairs:
        payer = "operator (checks)" if p["payer"] == operator else "client"
        console.print(
            f"{payer} -> worker {p['payee']}: ledger {p['ledger_wei']} wei = voucher "
            f"{p['voucher_wei']} = redeemed on chain {p['redeemed_wei']}"
        )
    console.print(
        f"{settled['ledger_entries']} paid jobs (client jobs and verification checks) settled "
        f"over {len(pairs)} payer-worker pair(s); worker balances rise by what they earned "
        "minus the broker fee and their gas"
    )


def _report_gas(market: Market, paid_jobs: int) -> None:
    txs, gas = _redemption_gas(market)
    if txs and paid_jobs:
        console.print(
            f"settlement gas: {gas:,} in {txs} redemption transaction(s) for {paid_jobs} paid "
            f"job(s): {gas / paid_jobs:,.0f} gas per job (a per-job escrow release: ~56,000)"
        )


GENERATE_FLAGS = (
    "--job-type",
    "inference",
    "--job-type",
    "transcode",
    "--job-type",
    "generate",
)
CHAT_MODEL = "SmolLM2-135M-Instruct"
CHAT_QUESTION = "What is the capital of France?"
CHAT_TIMEOUT_S = 120.0


def _chat(url: str, key: str) -> bool:
    """One streamed chat completion through the OpenAI-compatible API: the answer as it comes,
    then tokens/s, cost and energy. False if it did not finish."""
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": CHAT_QUESTION}],
        "max_tokens": 32,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    console.print(f"chat ({CHAT_MODEL}, POST /v1/chat/completions, streamed): {CHAT_QUESTION}")
    started = time.monotonic()
    extras: dict[str, object] = {}
    usage: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=CHAT_TIMEOUT_S
    ) as response:
        if response.status_code != 200:
            response.read()
            console.print(f"[red]chat failed: {response.status_code} {response.text}[/red]")
            return False
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                console.print(f"[red]chat failed: {chunk['error']['message']}[/red]")
                return False
            for choice in chunk.get("choices") or []:
                console.print((choice.get("delta") or {}).get("content") or "", end="")
            extras = chunk.get("gpumarket") or extras
            usage = chunk.get("usage") or usage
    elapsed = time.monotonic() - started
    completion = usage.get("completion_tokens", 0)
    console.print()
    console.print(
        f"  {completion} tokens in {elapsed:.1f} s ({completion / elapsed:.1f} tokens/s), "
        f"{usage.get('total_tokens', 0)} billed: {extras.get('cost_wei')} wei, "
        f"{float(str(extras.get('energy_j', 0))):.1f} J, worker {extras.get('worker_address')}",
        markup=False,
    )
    return bool(completion)


def _submit_all(client: Client, clip: Path) -> dict[str, str]:
    labels: dict[str, str] = {}
    for i, sentence in enumerate(SENTENCES):
        job = client.submit(
            {
                "type": "inference",
                "model": EMBED_MODEL,
                "input": {"texts": [sentence]},
                "max_price_wei_per_unit": "1000000000000000",
                "preference": ["cost", "speed", "green", "balanced"][i % 4],
            }
        )
        labels[job["id"]] = f"embed {i + 1} {job['preference']}"
    blob = client.upload_blob(clip)
    job = client.submit(
        {
            "type": "transcode",
            "input_blob": blob,
            "max_price_wei_per_unit": TRANSCODE_PRICE_WEI,
            # what the client authorises: 48 frames of 1280x720 + 854x480 + 640x360
            "max_units": CLIP_FRAMES * (1280 * 720 + 854 * 480 + 640 * 360),
        }
    )
    labels[job["id"]] = "transcode 720p"
    return labels


def main() -> int:
    from worker.executors.transcode import make_test_clip

    with tempfile.TemporaryDirectory(prefix="gpumarket-demo-") as tmp:
        root = Path(tmp)
        console.rule("gpumarket demo")
        with local_stack(root, generate=True) as market:
            console.print(
                f"anvil {market.rpc_url}; PaymentBroker {market.deployment.payment_broker}"
            )
            console.print(f"orchestrator {market.url} (API docs {market.url}/docs)")
            console.print(f"dashboard {market.url}/#token={market.token}")
            for w in _wait_workers(market.url, market.token, 2):
                console.print(f"  worker {w['address']} registered")
            _wait_staked(market)
            console.print("  both workers staked in WorkerRegistry")
            key = httpx.post(
                f"{market.url}/v1/clients",
                json={"name": "demo"},
                headers={"Authorization": f"Bearer {market.token}"},
            ).json()["api_key"]
            with Client(market.url, key) as client:
                payer = client.link_payer(PAYER_KEY)["payer_address"]
                console.print(f"client pays from {payer} (deposit 1 ETH, authorised 1 ETH)")
                before = _balances(market, payer)
                clip = make_test_clip(root / "clip.mp4", width=1280, height=720, frames=CLIP_FRAMES)
                labels = _submit_all(client, clip)
                jobs = _track(client, list(labels))
                _report(client, jobs, labels)
                if not _chat(market.url, key):
                    return 1
            failed = [j for j in jobs.values() if j["state"] != "succeeded"]
            if failed:
                console.print(f"[red]{len(failed)} job(s) did not succeed[/red]")
                return 1
            settled = _wait_settled(market)
            _report_money(before, _balances(market, payer), settled)
            entries = settled["ledger_entries"]
            _report_gas(market, entries if isinstance(entries, int) else 0)
        console.print(
            "[green]demo finished: every job succeeded and was paid; all processes stopped[/green]"
        )
    return 0


def _demo_client(market: Market) -> str:
    """A client account paying from the funded dev payer; returns its API key."""
    key: str = httpx.post(
        f"{market.url}/v1/clients",
        json={"name": "local"},
        headers={"Authorization": f"Bearer {market.token}"},
    ).json()["api_key"]
    with Client(market.url, key) as client:
        client.link_payer(PAYER_KEY)
    return key


def port_in_use(port: int) -> bool:
    """True when something already listens on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _check_up_options(port: int | None, chain_port: int | None, data_dir: Path | None) -> None:
    """Refuse, with the fix, what would make ``up`` fail half-way."""
    for option, value in (("--port", port), ("--chain-port", chain_port)):
        if value is not None and port_in_use(value):
            raise UpRefused(f"{option} {value}: the port is in use; pick another (or leave it out)")
    if port is not None and port == chain_port:
        raise UpRefused("--port and --chain-port must differ")
    if data_dir is not None and data_dir.exists() and any(data_dir.iterdir()):
        raise UpRefused(
            f"--data-dir {data_dir}: not empty (state from an earlier chain would not match "
            "the new one); give a new or empty folder"
        )


class UpRefused(ValueError):
    """``gpumarket up`` cannot start as asked; the message says what to change."""


@contextlib.contextmanager
def _up_root(data_dir: Path | None) -> Iterator[Path]:
    """``data_dir`` (kept afterwards), or a temporary folder removed when ``up`` stops."""
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        yield data_dir.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="gpumarket-up-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def _published_deployment(deployment: Deployment, path: Path) -> Iterator[None]:
    """The contracts' addresses at ``path``, where ``wallet`` and ``orchestrator`` commands look;
    removed on stop unless something else rewrote it meanwhile (the chain it names is gone)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_deployment(deployment, path)
    written = path.read_bytes()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_bytes() == written:
                path.unlink()


def up_commands(url: str, key: str, deployment_file: Path, default_deployment: Path) -> list[str]:
    """The commands ``up`` prints to try the stack, each runnable as written from the folder
    ``up`` was started in (a test runs them verbatim)."""
    wallet = "gpumarket wallet balance --dev-account 2"
    if deployment_file != default_deployment:
        wallet += f" --deployment {shlex.quote(str(deployment_file))}"
    top_price = max(int(price) for price, _ in WORKER_OFFERS)
    return [
        f"export GPUMARKET_URL={url} GPUMARKET_API_KEY={key}",
        f'gpumarket job submit --model {EMBED_MODEL} --text "hello world" '
        f"--max-price {top_price} --wait",
        "gpumarket job list",
        wallet,
    ]


def up(
    *,
    port: int | None = None,
    chain_port: int | None = None,
    data_dir: Path | None = None,
    deployment_file: Path,
    default_deployment: Path,
) -> int:
    """``gpumarket up``: the demo's stack, left running until Ctrl-C or SIGTERM; prints where
    it is and commands to try it. Raises UpRefused for options that cannot work."""
    _check_up_options(port, chain_port, data_dir)
    with sigterm_as_ctrl_c(), _up_root(data_dir) as root:
        console.rule("gpumarket up")
        with (
            local_stack(root, port, chain_port) as market,
            _published_deployment(market.deployment, deployment_file),
        ):
            _wait_workers(market.url, market.token, 2)
            _wait_staked(market)
            key = _demo_client(market)
            console.print("local marketplace:", markup=False)
            print_fields(
                console,
                [
                    ("dashboard", f"{market.url}/#token={market.token}"),
                    ("API docs", f"{market.url}/docs"),
                    ("metrics", f"{market.url}/metrics"),
                    ("chain RPC", market.rpc_url),
                    ("PaymentBroker", market.deployment.payment_broker),
                    ("WorkerRegistry", market.deployment.worker_registry),
                    ("deployment", str(deployment_file)),
                    *((f"worker {i + 1}", w) for i, w in enumerate(market.workers)),
                    ("logs", str(root)),
                ],
            )
            console.print(f"{TRY_IT} (a client paying from a funded dev account is ready):")
            for command in up_commands(market.url, key, deployment_file, default_deployment):
                console.print(f"  {command}", markup=False)
            console.print(UP_READY)
            while True:
                market.stack.check_alive()
                time.sleep(1)


if __name__ == "__main__":
    try:
        with sigterm_as_ctrl_c():  # `make demo` stopped by SIGTERM stops what it started
            code = main()
        sys.exit(code)
    except KeyboardInterrupt:
        console.print("interrupted; every process was stopped")
        sys.exit(130)
