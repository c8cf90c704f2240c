"""The operator dashboard in a real browser: a `gpumarket orchestrator serve` process paying
through anvil, two scripted workers over the worker REST API, and headless Chromium reading
the page at / the way a person would: worker rows with their hardware, succeeded jobs with
their cost, totals equal to the API's, charts with bars; a wrong token or a dead server shows
the error banner.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from contracts.anvil import DEV_PRIVATE_KEYS, Anvil, AnvilNotInstalled, anvil_binary
from contracts.broker import PaymentBroker
from contracts.chain import Chain
from contracts.deploy import deploy, write_deployment
from contracts.registry import WorkerRegistry
from gpumarket import Client
from protocol import CompleteRequest, HardwareDescriptor, LeasedJob, Offer
from protocol.generation import StreamChunk
from protocol.signing import output_sha256, sign_result
from tests.e2e.conftest import (
    PHONE_WIDTH,
    console_errors,
    phone,
    phone_screenshot,
    require_selenium,
    screenshot,
)
from tests.integration.conftest import OPERATOR_TOKEN, OrchestratorProcess
from tests.support import EMBED_MODEL, completion
from worker.client import OrchestratorClient, SignedVoucher

require_selenium()  # before selenium's imports: skip (or fail) without it

from selenium.webdriver.chrome.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow

DEPLOYER, PAYER = DEV_PRIVATE_KEYS[0], DEV_PRIVATE_KEYS[4]
GPU_KEY, CPU_KEY = DEV_PRIVATE_KEYS[5], DEV_PRIVATE_KEYS[6]
GPU_PRICE, CPU_PRICE = 3 * 10**12, 10**12  # wei per text
STAKE_WEI = 10**17
UI_TIMEOUT_S = 30.0  # the page polls every 2 s; Chromium on two busy cores can be slow
SETTLE_TIMEOUT_S = 30.0
TOKEN_KEY = "gpumarket.operatorToken"
# Nothing is sampled for verification: every job here ends where its worker leaves it.
NO_VERIFICATION = {"GPUMARKET_VERIFY_RATE": "0", "GPUMARKET_VERIFY_RATE_NEW": "0"}

GPU_HARDWARE = HardwareDescriptor.model_validate(
    {
        "cpu_model": "AMD EPYC 9354",
        "cpu_cores": 64,
        "ram_mb": 512_000,
        "cuda_available": True,
        "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "vram_mb": 81_920}],
    }
)
CPU_HARDWARE = HardwareDescriptor.model_validate(
    {"cpu_model": "Intel Xeon Gold 6338", "cpu_cores": 8, "ram_mb": 32_000}
)


def _offer(price: int) -> Offer:
    return Offer.model_validate(
        {"job_type": "inference", "model": EMBED_MODEL, "price_wei_per_unit": str(price)}
    )


def _spec(text: str) -> dict[str, Any]:
    return {
        "type": "inference",
        "model": EMBED_MODEL,
        "input": {"texts": [text, "a second sentence"]},
        "max_price_wei_per_unit": str(GPU_PRICE),
    }


async def _finish(worker: OrchestratorClient, job: LeasedJob, energy_j: float) -> None:
    """Run ``job`` as a worker would report it: started, then a signed result or a failure."""
    await worker.start(job.job_id, job.attempt)
    texts = (job.input or {}).get("texts", [])
    if texts and texts[0] == "fail me":
        await worker.fail(job.job_id, job.attempt, retryable=False, reason="input refused")
        return
    output = {"embeddings": [[0.6, 0.8]] * len(texts)}
    digest = output_sha256(output)
    request = CompleteRequest(
        attempt=job.attempt,
        output=output,
        output_sha256=digest,
        signature=sign_result(
            worker.account.key, job.job_id, job.attempt, digest, len(texts), job.price_wei_per_unit
        ),
        duration_s=0.25,
        energy_j=energy_j,
        energy_source="estimate",
        units=len(texts),
    )
    await worker.complete(job.job_id, request)


async def _work(worker: OrchestratorClient, jobs: int, energy_j: float) -> None:
    """Lease and finish ``jobs`` jobs (those the orchestrator assigns to this worker)."""
    done = 0
    async with asyncio.timeout(SETTLE_TIMEOUT_S):
        while done < jobs:
            for job in await worker.lease(max_jobs=jobs - done, wait_s=1):
                await _finish(worker, job, energy_j)
                done += 1


async def _run_market(url: str) -> None:
    """Register a GPU and a CPU worker and let them work through the queue: jobs 0-3 go to
    the GPU worker (it polls first, with 4 slots), the next three to the CPU one, which fails
    the last of them; then the GPU worker takes the last job and keeps it running."""
    gpu = OrchestratorClient(url, Account.from_key(GPU_KEY))
    cpu = OrchestratorClient(url, Account.from_key(CPU_KEY))
    try:
        await gpu.register(GPU_HARDWARE, [_offer(GPU_PRICE)], max_concurrency=4)
        await cpu.register(CPU_HARDWARE, [_offer(CPU_PRICE)], max_concurrency=2)
        await _work(gpu, 4, energy_j=12.5)
        await _work(cpu, 3, energy_j=40.0)
        [held] = await gpu.lease(max_jobs=1, wait_s=5)
        await gpu.start(held.job_id, held.attempt)
    finally:
        await gpu.aclose()
        await cpu.aclose()


@dataclass
class Market:
    proc: OrchestratorProcess
    api_key: str
    job_ids: list[str]
    redeemed_wei: int

    def dashboard(self) -> dict[str, Any]:
        with self.proc.operator() as op:
            resp = op.get("/v1/dashboard")
            resp.raise_for_status()
            body: dict[str, Any] = resp.json()
            return body

    def jobs(self) -> dict[str, dict[str, Any]]:
        """Every job as its client sees it (GET /v1/jobs/{id}): the figures to check against."""
        with Client(self.proc.url, self.api_key) as client:
            return {job_id: client.get(job_id) for job_id in self.job_ids}


def _wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    """anvil + contracts + an orchestrator paying through them; 8 jobs: 6 succeeded (4 on the
    GPU worker, 2 on the CPU one), 1 failed, 1 running; the GPU worker redeems on chain."""
    try:
        anvil_binary()
    except AnvilNotInstalled as exc:
        pytest.fail(f"{exc} (make install does this)")
    root = tmp_path_factory.mktemp("market")
    with Anvil() as anvil:
        chain = Chain.connect(anvil.url, DEPLOYER)
        deployment = deploy(chain, min_stake_wei=STAKE_WEI)
        write_deployment(deployment, root / "deployment.json")
        payer = PaymentBroker(Chain.connect(anvil.url, PAYER), deployment.payment_broker)
        payer.deposit(10**18)
        payer.authorize(chain.address, 10**18)
        for key in (GPU_KEY, CPU_KEY):
            WorkerRegistry(Chain.connect(anvil.url, key), deployment.worker_registry).stake(
                STAKE_WEI
            )
        proc = OrchestratorProcess(
            root / "orchestrator",
            GPUMARKET_DEPLOYMENT_FILE=str(root / "deployment.json"),
            GPUMARKET_RECONCILE_INTERVAL_S="0.5",
            GPUMARKET_LEASE_TTL_S="600",  # the running job and both workers stay put
            **NO_VERIFICATION,
        )
        proc.start()
        try:
            key = proc.new_client_key()
            with Client(proc.url, key) as client:
                client.link_payer(PAYER)
                texts = [f"sentence {i}" for i in range(6)] + ["fail me", "still running"]
                ids = [client.submit(_spec(t))["id"] for t in texts]
            asyncio.run(_run_market(proc.url))
            redeemed = _redeem(anvil.url, proc, deployment.payment_broker)
            market = Market(proc, key, ids, redeemed)
            _wait_until(
                lambda: market.dashboard()["totals"]["wei_redeemed_total"] == str(redeemed),
                SETTLE_TIMEOUT_S,
                "the orchestrator to read the redemption back from the chain",
            )
            yield market
        finally:
            proc.stop()


def _redeem(rpc_url: str, proc: OrchestratorProcess, broker_address: str) -> int:
    """The GPU worker redeems its voucher; returns the wei it was paid (after the fee)."""

    async def latest() -> SignedVoucher:
        worker = OrchestratorClient(proc.url, Account.from_key(GPU_KEY))
        await worker.register(GPU_HARDWARE, [_offer(GPU_PRICE)], max_concurrency=4)
        try:
            [signed] = await worker.vouchers()
            return signed
        finally:
            await worker.aclose()

    signed = asyncio.run(latest())
    broker = PaymentBroker(Chain.connect(rpc_url, GPU_KEY), broker_address)
    return broker.redeem(signed.voucher, signed.signature).paid_wei


# -- page helpers ------------------------------------------------------------------------------


# The page redraws what changed every 2 s, so each read below is one script run: it sees one
# rendering whole, never half of one (and never an element the next poll has replaced).
TABLE_JS = """
const [table, key] = arguments;
return Array.from(document.querySelectorAll(`#${table} tbody tr[data-${key}]`), (tr) => {
  const text = {}, wei = {};
  for (const td of tr.cells) {
    const col = Array.from(td.classList).find((c) => c.startsWith("col-"));
    if (!col) continue;
    text[col.slice(4)] = td.innerText.trim();
    const money = td.querySelector(".wei");
    if (money) wei[col.slice(4)] = money.dataset.wei;
  }
  return {key: tr.getAttribute(`data-${key}`), text, wei};
});
"""
FIND_JS = "const e = document.querySelector(arguments[0]); "
TEXT_JS = FIND_JS + "return e ? (e.innerText ?? e.textContent).trim() : null;"  # SVG: no innerText
ATTR_JS = FIND_JS + "return e ? e.getAttribute(arguments[1]) : null;"
BANNER_JS = "const e = document.getElementById('error'); return e.hidden ? null : e.innerText;"


@dataclass
class Row:
    text: dict[str, str]  # column -> what the cell shows
    wei: dict[str, str]  # column -> the exact wei a money cell carries


def _open(driver: WebDriver, url: str) -> None:
    driver.get(url)
    WebDriverWait(driver, UI_TIMEOUT_S).until(lambda d: d.find_element(By.ID, "board"))


def _table(driver: WebDriver, table: str, key: str) -> dict[str, Row]:
    rows = driver.execute_script(TABLE_JS, table, key)
    return {r["key"]: Row(r["text"], r["wei"]) for r in rows}


def _wait_table(driver: WebDriver, table: str, key: str, count: int) -> dict[str, Row]:
    WebDriverWait(driver, UI_TIMEOUT_S).until(
        lambda d: len(_table(d, table, key)) == count, f"{count} rows in #{table}"
    )
    return _table(driver, table, key)


def _text(driver: WebDriver, selector: str) -> str | None:
    text: str | None = driver.execute_script(TEXT_JS, selector)
    return text


def _attr(driver: WebDriver, selector: str, name: str) -> str | None:
    value: str | None = driver.execute_script(ATTR_JS, selector, name)
    return value


def _banner(driver: WebDriver) -> str | None:
    text: str | None = driver.execute_script(BANNER_JS)
    return text


def _wait_banner(driver: WebDriver, *says: str) -> str:
    def shown(d: WebDriver) -> str | bool:
        text = _banner(d)
        return text if text is not None and all(s in text for s in says) else False

    return str(WebDriverWait(driver, UI_TIMEOUT_S).until(shown, f"an error banner with {says}"))


# -- tests -------------------------------------------------------------------------------------


def test_dashboard_shows_workers_jobs_money_and_charts(browser: WebDriver, market: Market) -> None:
    console_errors(browser)  # drop what earlier pages logged
    _open(browser, f"{market.proc.url}/#token={OPERATOR_TOKEN}")
    workers = _wait_table(browser, "workers", "worker-id", 2)
    jobs = _wait_table(browser, "jobs", "job-id", len(market.job_ids))
    board = market.dashboard()
    client_jobs = market.jobs()

    # the token left the address bar for this tab's sessionStorage
    assert "token" not in browser.current_url
    assert browser.execute_script(f"return sessionStorage.getItem('{TOKEN_KEY}')") == (
        OPERATOR_TOKEN
    )
    assert _banner(browser) is None
    WebDriverWait(browser, UI_TIMEOUT_S).until(
        lambda d: (_text(d, "#status") or "").startswith("live"), "the live status"
    )

    # workers: hardware, load, reputation, jobs and money as the API has them
    api_workers = {w["id"]: w for w in board["workers"]}
    assert set(workers) == set(api_workers)
    by_hardware = {row.text["hardware"]: wid for wid, row in workers.items()}
    gpu_id = by_hardware.pop("NVIDIA H100 80GB HBM3 (80 GiB)")
    cpu_id = by_hardware.pop("Intel Xeon Gold 6338 (8 cores)")
    assert by_hardware == {}
    gpu, cpu = workers[gpu_id].text, workers[cpu_id].text
    assert (gpu["load"], cpu["load"]) == ("1/4", "0/2")
    assert (gpu["jobs"], cpu["jobs"]) == ("4 / 0", "2 / 1")
    assert gpu["status"] == cpu["status"] == "registered"
    for wid, row in workers.items():
        api = api_workers[wid]
        assert row.text["reputation"] == f"{api['reputation']:.2f}"
        assert row.wei["billed"] == api["billed_wei"]
        assert row.wei["settled"] == api["settled_wei"] == api["billed_wei"]
        assert row.wei["redeemed"] == api["redeemed_wei"]
    assert int(api_workers[gpu_id]["settled_wei"]) == 4 * 2 * GPU_PRICE
    assert int(api_workers[cpu_id]["settled_wei"]) == 2 * 2 * CPU_PRICE
    assert workers[gpu_id].wei["redeemed"] == str(market.redeemed_wei) != "0"
    # 24,000,000,000,000 wei reads as 24,000 gwei, with the exact wei under it
    assert gpu["settled"].splitlines() == ["24,000 gwei", "24,000,000,000,000 wei"]

    # jobs: every job with the state, cost and energy its client sees
    assert set(jobs) == set(client_jobs)
    states = sorted(row.text["state"] for row in jobs.values())
    assert states == ["failed", "running"] + ["succeeded"] * 6
    for job_id, row in jobs.items():
        job = client_jobs[job_id]
        assert row.text["state"] == job["state"]
        if job["state"] == "succeeded":
            assert row.wei["cost"] == job["cost_wei"]
            assert int(job["cost_wei"]) in (2 * GPU_PRICE, 2 * CPU_PRICE)
            assert row.text["energy"] in ("12.5 J estimate", "40.0 J estimate")
            assert row.text["latency"].endswith(("ms", " s"))
        else:
            assert row.text["cost"] == "—" and "cost" not in row.wei

    # totals: the header says what the API says, and what the jobs add up to
    totals = board["totals"]
    paid = sum(int(j["cost_wei"]) for j in client_jobs.values() if j["state"] == "succeeded")
    assert totals["wei_settled_total"] == str(paid)
    assert _text(browser, "#total-workers-online") == "2"
    assert _text(browser, "#total-workers-registered") == "2"
    for state, n in totals["jobs_by_state"].items():
        assert _text(browser, f"#total-jobs li[data-state='{state}'] .n") == str(n), state
    assert _attr(browser, "#total-wei .wei", "data-wei") == str(paid)
    assert (_text(browser, "#total-wei-title") or "").lower() == "wei settled"
    assert _text(browser, "#total-energy") == "130.0 J"  # 4 x 12.5 + 2 x 40
    assert totals["energy_j_total"] == 130.0
    assert _text(browser, "#payments") == "on-chain payments"

    # charts: bars drawn, adding up to the jobs finished and the wei settled
    assert _attr(browser, "#chart-throughput", "data-total") == "7"  # 6 succeeded, 1 failed
    bars = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg rect.bar'), "
        "(b) => [b.closest('svg').id, b.classList[1], Number(b.getAttribute('height'))]);"
    )
    assert {(svg, kind) for svg, kind, _ in bars} == {
        ("chart-throughput", "ok"),
        ("chart-throughput", "bad"),
        ("chart-wei", "money"),
    }
    assert all(height > 0 for _, _, height in bars)
    assert _attr(browser, "#chart-wei", "data-total") == str(paid)

    # every energy figure here is an estimate, and the card says so
    assert _text(browser, "#total-energy-source") == (
        "succeeded jobs, estimated by workers (no power meter readable)"
    )
    # the time axis in 24-hour time, like the status line
    ticks = browser.execute_script(
        "return Array.from(document.querySelectorAll('#chart-throughput text.tick'), "
        "(t) => t.textContent).filter((t) => t.includes(':'));"
    )
    assert ticks and all(re.fullmatch(r"[0-2][0-9]:[0-5][0-9]", t) for t in ticks), ticks

    # no script error, no CSP refusal (nothing inline, nothing from elsewhere), no failed load
    assert console_errors(browser) == []
    path = screenshot(browser, "dashboard.png")
    assert path.stat().st_size > 10_000

    # on a phone: nothing wider than the screen, legends inside their charts
    with phone(browser):
        browser.refresh()
        _wait_table(browser, "jobs", "job-id", len(market.job_ids))
        page_width, view_width = browser.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]"
        )
        assert view_width == PHONE_WIDTH and page_width <= view_width, (page_width, view_width)
        outside = browser.execute_script(
            "return Array.from(document.querySelectorAll('.legend, .card, .chart'))"
            ".filter((e) => { const r = e.getBoundingClientRect(); "
            "return r.left < 0 || r.right > window.innerWidth; }).map((e) => e.className);"
        )
        assert outside == []
        assert phone_screenshot(browser, "dashboard-phone.png").stat().st_size > 10_000


def test_a_wrong_token_shows_the_error_banner_and_asks_again(
    browser: WebDriver, market: Market
) -> None:
    _open(browser, f"{market.proc.url}/#token=not-the-operator-token")
    text = _wait_banner(browser, "Token refused (401)")
    assert "operator token" in text
    assert browser.find_element(By.ID, "token-form").is_displayed()
    assert not browser.find_element(By.ID, "board").is_displayed()  # no figures without a token
    assert browser.execute_script(f"return sessionStorage.getItem('{TOKEN_KEY}')") is None
    screenshot(browser, "dashboard-token-refused.png")

    # typing the right one in brings the banner down and the figures back
    browser.find_element(By.ID, "token-input").send_keys(OPERATOR_TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    WebDriverWait(browser, UI_TIMEOUT_S).until(lambda d: _banner(d) is None, "banner gone")
    assert len(_wait_table(browser, "workers", "worker-id", 2)) == 2
    WebDriverWait(browser, UI_TIMEOUT_S).until(
        lambda d: d.find_element(By.ID, "board").is_displayed(), "the figures shown"
    )
    assert not browser.find_element(By.ID, "token-form").is_displayed()


def test_without_payments_and_when_the_server_goes_away(browser: WebDriver, tmp_path: Path) -> None:
    proc = OrchestratorProcess(tmp_path / "orchestrator", **NO_VERIFICATION)
    proc.start()
    try:
        _open(browser, f"{proc.url}/#token={OPERATOR_TOKEN}")
        WebDriverWait(browser, UI_TIMEOUT_S).until(
            lambda d: "No workers registered yet" in (_text(d, "#workers tbody") or ""),
            "the empty workers table",
        )
        assert "No jobs yet" in (_text(browser, "#jobs tbody") or "")
        assert _text(browser, "#chart-throughput text.chart-empty") == "nothing in the last 30 min"
        # an empty market says so in the generation panel, with no figure (no NaN)
        assert (_text(browser, "#gen-empty") or "").startswith("No generation yet in the last 30")
        assert not browser.find_element(By.ID, "gen-figures").is_displayed()

        with Client(proc.url, proc.new_client_key()) as client:
            ids = [client.submit(_spec(f"free {i}"))["id"] for i in range(3)]
        asyncio.run(_free_market(proc.url))
        jobs = _wait_table(browser, "jobs", "job-id", 3)
        WebDriverWait(browser, UI_TIMEOUT_S).until(
            lambda d: _attr(d, "#total-wei .wei", "data-wei") == str(3 * 2 * GPU_PRICE),
            "the billed total",
        )
        assert (_text(browser, "#total-wei-title") or "").lower() == "wei billed"
        assert _text(browser, "#payments") == "no on-chain payments"
        assert {jobs[i].text["state"] for i in ids} == {"succeeded"}
        [worker] = _wait_table(browser, "workers", "worker-id", 1).values()
        assert worker.text["settled"] == "—"  # nothing settles without a chain
        assert worker.wei["billed"] == str(3 * 2 * GPU_PRICE)
    finally:
        proc.stop()

    text = _wait_banner(browser, "Orchestrator unreachable")
    assert "Retrying every 2 s" in text
    # the last figures stay on screen under the banner
    assert len(_table(browser, "jobs", "job-id")) == 3


async def _free_market(url: str) -> None:
    gpu = OrchestratorClient(url, Account.from_key(GPU_KEY))
    try:
        await gpu.register(GPU_HARDWARE, [_offer(GPU_PRICE)], max_concurrency=4)
        await _work(gpu, 3, energy_j=1.0)
    finally:
        await gpu.aclose()


LLM = "SmolLM2-135M-Instruct"
TOKEN_PRICE = 10**9  # wei per token
PROMPT_TOKENS = 3
COMPLETION_TOKENS = [4, 5, 6]  # one generation each


def _generate_spec() -> dict[str, Any]:
    return {
        "type": "generate",
        "model": LLM,
        "generation": {"prompt": "Hello", "max_tokens": 8},
        "max_price_wei_per_unit": str(TOKEN_PRICE),
    }


async def _generate(url: str, submit: Callable[[], int]) -> list[tuple[str, float]]:
    """A scripted LLM worker: registers (so the model is known), has ``submit`` submit the
    jobs, leases them, streams a first text for each and reports its result (usage:
    PROMPT_TOKENS + COMPLETION_TOKENS[i]). Returns (job id, unix time just after its first
    text was taken) per job."""
    worker = OrchestratorClient(url, Account.from_key(GPU_KEY))
    streamed: list[tuple[str, float]] = []
    try:
        offer = Offer.model_validate(
            {
                "job_type": "generate",
                "model": LLM,
                "price_wei_per_unit": str(TOKEN_PRICE),
                "context_tokens": 8192,
            }
        )
        await worker.register(GPU_HARDWARE, [offer], max_concurrency=len(COMPLETION_TOKENS))
        jobs = submit()
        leased: list[LeasedJob] = []
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            while len(leased) < jobs:
                leased += await worker.lease(max_jobs=jobs - len(leased), wait_s=1)
        for job, completion_tokens in zip(leased, COMPLETION_TOKENS, strict=True):
            await worker.stream(job.job_id, StreamChunk(attempt=1, seq=0, text="Hi", tokens=1))
            streamed.append((job.job_id, time.time()))
            await asyncio.sleep(0.1)  # generating the rest
            output = {
                "text": "Hi there, friend",
                "token_ids": list(range(completion_tokens)),
                "finish_reason": "length",
                "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion_tokens},
            }
            request = completion(
                worker,
                job.job_id,
                job.attempt,
                output,
                PROMPT_TOKENS + completion_tokens,
                duration_s=0.1,
                energy_j=1.0,
                price_wei_per_unit=job.price_wei_per_unit,
                prompt_price_wei_per_unit=job.prompt_price_wei_per_unit or 0,
            )
            await worker.complete(job.job_id, request)
    finally:
        await worker.aclose()
    return streamed


def test_the_generation_panel_shows_tokens_rate_and_time_to_first_token(
    browser: WebDriver, tmp_path: Path
) -> None:
    proc = OrchestratorProcess(tmp_path / "orchestrator", **NO_VERIFICATION)
    proc.start()
    try:
        key = proc.new_client_key()
        submitted: dict[str, float] = {}

        def submit() -> int:
            with Client(proc.url, key) as client:
                for _ in COMPLETION_TOKENS:
                    before = time.time()
                    submitted[client.submit(_generate_spec())["id"]] = before
            return len(submitted)

        streamed = asyncio.run(_generate(proc.url, submit))
        with proc.operator() as op:
            resp = op.get("/v1/dashboard")
            resp.raise_for_status()
            gen = resp.json()["generation"]
        with Client(proc.url, key) as client:
            jobs = [client.get(job_id) for job_id in submitted]

        # the API's figures, against the jobs as their client sees them
        prompt, completion = PROMPT_TOKENS * len(jobs), sum(COMPLETION_TOKENS)
        assert (gen["jobs"], gen["prompt_tokens"], gen["completion_tokens"]) == (
            len(jobs),
            prompt,
            completion,
        )
        assert sum(j["units"] for j in jobs) == prompt + completion
        running_s = sum((_instant(j["finished_at"]) - _instant(j["started_at"])) for j in jobs)
        assert gen["completion_tokens_per_s"] == pytest.approx(completion / running_s, rel=1e-3)
        # each first text came after its submission and before the worker heard it was taken
        waits = sorted(at - submitted[job_id] for job_id, at in streamed)
        assert gen["first_token_jobs"] == len(jobs)
        assert 0 <= gen["first_token_p50_s"] <= waits[-1] + 0.01
        assert gen["first_token_p50_s"] <= gen["first_token_p99_s"] <= waits[-1] + 0.01

        # the page shows those figures
        console_errors(browser)  # drop what earlier pages logged
        _open(browser, f"{proc.url}/#token={OPERATOR_TOKEN}")
        WebDriverWait(browser, UI_TIMEOUT_S).until(
            lambda d: _attr(d, "#gen-tokens", "data-value") == str(prompt + completion),
            "the generation panel's token total",
        )
        assert not browser.find_element(By.ID, "gen-empty").is_displayed()
        assert _text(browser, "#gen-tokens") == str(prompt + completion)
        assert _text(browser, "#gen-tokens-more") == (
            f"{prompt} prompt + {completion} completion, {len(jobs)} jobs succeeded"
        )
        rate = gen["completion_tokens_per_s"]
        assert float(_attr(browser, "#gen-rate", "data-value") or "nan") == rate
        assert _text(browser, "#gen-rate") == f"{rate:.{2 if rate < 10 else 1}f} tokens/s"
        assert float(_attr(browser, "#gen-ttft", "data-value") or "nan") == gen["first_token_p50_s"]
        assert float(_attr(browser, "#gen-ttft", "data-p99") or "nan") == gen["first_token_p99_s"]
        assert re.fullmatch(r"(\d+ ms|\d+\.\d\d s) p50", _text(browser, "#gen-ttft") or "")
        assert (_text(browser, "#gen-ttft-more") or "").endswith(
            f"submission to first streamed text, {len(jobs)} jobs"
        )
        assert "NaN" not in (_text(browser, "#generation") or "")
        assert console_errors(browser) == []
        screenshot(browser, "dashboard-generation.png")
    finally:
        proc.stop()


def _instant(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()
