"""The orchestrator's settlement against a real anvil: payer linking, 402 admission, ledger and
vouchers written with the completion, stake-gated matching, redemption and reconciliation."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from sqlalchemy import select
from web3 import Web3

from contracts.anvil import DEV_PRIVATE_KEYS, Anvil
from contracts.broker import PaymentBroker
from contracts.chain import Chain
from contracts.deploy import deploy, write_deployment
from contracts.registry import WorkerRegistry
from orchestrator.config import Settings
from orchestrator.exceptions import InvalidInput, PaymentRequired, Unauthorized
from orchestrator.services import settlement
from orchestrator.services.auth import Principal
from orchestrator.services.settlement import ELIGIBILITY_BATCH, ChainPayments
from orchestrator.store import Store
from orchestrator.store.models import Slash, Worker
from orchestrator.wiring import Services, build_services
from protocol import JobSpec, JobState, LeasedJob
from protocol.batches import BatchCompleteRequest
from protocol.signing import sign_registration
from protocol.vouchers import Voucher
from tests.api.test_batches_api import batch_item, signed
from tests.conftest import FakeClock
from tests.support import EMBED_MODEL, TestWorker, completion, offer, register, register_request

DEPLOYER, PAYER, WORKER = DEV_PRIVATE_KEYS[0], DEV_PRIVATE_KEYS[2], DEV_PRIVATE_KEYS[3]
PRICE = 10**12  # wei per item, the worker's ask
MAX_PRICE = 2 * 10**12
TEXTS = ["one", "two", "three"]


def _paid_services(
    anvil: Anvil, w3: Web3, tmp_path: Path, store: Store, **settings: object
) -> Services:
    """Services with ChainPayments over a fresh deployment (the deployer signs vouchers)."""
    chain = Chain.connect(anvil.url, DEPLOYER)
    deployment = deploy(chain, min_stake_wei=10**17, withdraw_delay_s=3600)
    path = tmp_path / "deployment.json"
    write_deployment(deployment, path)
    config = Settings(
        data_dir=tmp_path / "data",
        admin_token="operator-token-for-tests-0123456789abcdef",
        deployment_file=path,
        **settings,  # type: ignore[arg-type]
    )
    clock = FakeClock(start=float(w3.eth.get_block("latest")["timestamp"]))
    return build_services(config, store=store, clock=clock, rng=random.Random(1))


@pytest.fixture
def paid(anvil: Anvil, w3: Web3, tmp_path: Path, sqlite_store: Store) -> Iterator[Services]:
    yield _paid_services(anvil, w3, tmp_path, sqlite_store, verify_rate=0.0, verify_rate_new=0.0)


def _client(services: Services) -> Principal:
    client_id, _ = services.auth.create_client("payer-client", services.now())
    return Principal("client", client_id)


def _link(services: Services, client: Principal, key: str) -> None:
    address = Account.from_key(key).address
    challenge = services.accounts.payer_challenge(client, address, services.now())
    services.accounts.link_payer(
        client, address, challenge.nonce, sign_registration(key, challenge.message), services.now()
    )


def _spec(**extra: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "type": "inference",
            "model": EMBED_MODEL,
            "input": {"texts": TEXTS},
            "max_price_wei_per_unit": MAX_PRICE,
            **extra,
        }
    )


def _worker(services: Services, key: str = WORKER, max_concurrency: int = 1) -> TestWorker:
    account = Account.from_key(key)
    challenge = services.workers.challenge(account.address, services.now())
    req = register_request(
        account,
        challenge.nonce,
        challenge.message,
        offers=[offer(price=PRICE)],
        max_concurrency=max_concurrency,
    )
    resp = services.workers.register(req, services.now())
    return TestWorker(Principal("worker", resp.worker_id), account, resp.session_token)


def _fund(
    anvil: Anvil, services: Services, deposit: int, cap: int, key: str = PAYER
) -> PaymentBroker:
    assert services.payments.deployment is not None
    broker = PaymentBroker(
        Chain.connect(anvil.url, key), services.payments.deployment.payment_broker
    )
    broker.deposit(deposit)
    broker.authorize(Account.from_key(DEPLOYER).address, cap)
    return broker


def _stake_and_lease(
    anvil: Anvil, paid: Services, worker: TestWorker, jobs: int
) -> list[LeasedJob]:
    """Stake the worker (key WORKER) on chain, then lease it ``jobs`` queued jobs."""
    assert paid.payments.deployment is not None
    WorkerRegistry(
        Chain.connect(anvil.url, WORKER), paid.payments.deployment.worker_registry
    ).stake(10**17)
    paid.workers.refresh_stakes(paid.now())
    paid.leases.open_poll(worker.principal, jobs, until=paid.now() + 10, now=paid.now())
    assert len(paid.leases.dispatch(paid.now())) == jobs
    return paid.leases.claim(worker.principal, jobs, paid.now())


def test_admission_needs_a_linked_and_funded_payer(anvil: Anvil, paid: Services) -> None:
    client = _client(paid)
    with pytest.raises(PaymentRequired, match="link a payer"):
        paid.jobs.submit(client, _spec(), paid.now())
    _link(paid, client, PAYER)
    with pytest.raises(PaymentRequired) as refused:
        paid.jobs.submit(client, _spec(), paid.now())
    assert refused.value.extra["needed_wei"] == str(MAX_PRICE * len(TEXTS))
    assert refused.value.extra["available_wei"] == "0"

    _fund(anvil, paid, deposit=10**18, cap=MAX_PRICE * len(TEXTS) * 2)
    paid.jobs.submit(client, _spec(), paid.now())
    paid.jobs.submit(client, _spec(), paid.now())
    # Two unfinished jobs reserve the whole cap: a third does not fit.
    with pytest.raises(PaymentRequired, match="reserved by unfinished jobs"):
        paid.jobs.submit(client, _spec(), paid.now())
    account = paid.accounts.account(client)
    assert account.budget is not None and account.budget.available_wei == 0
    assert account.budget.reserved_wei == 2 * MAX_PRICE * len(TEXTS)


def test_transcode_on_a_paid_orchestrator_needs_max_units(anvil: Anvil, paid: Services) -> None:
    client = _client(paid)
    _link(paid, client, PAYER)
    spec = JobSpec.model_validate(
        {"type": "transcode", "input_blob": "ab" * 32, "max_price_wei_per_unit": 1}
    )
    with pytest.raises(InvalidInput, match="max_units"):
        paid.jobs.submit(client, spec, paid.now())


def test_paid_job_end_to_end_ledger_voucher_redeem_reconcile(
    anvil: Anvil, paid: Services, w3: Web3
) -> None:
    client = _client(paid)
    _link(paid, client, PAYER)
    _fund(anvil, paid, deposit=10**18, cap=10**18)
    worker = _worker(paid)
    job, _ = paid.jobs.submit(client, _spec(), paid.now())

    # Not staked: the job waits and says why.
    paid.leases.open_poll(worker.principal, 1, until=paid.now() + 10, now=paid.now())
    assert paid.leases.dispatch(paid.now()) == []
    assert "not staked" in (paid.jobs.get(client, job.id).waiting_reason or "")

    assert paid.payments.deployment is not None
    registry = WorkerRegistry(
        Chain.connect(anvil.url, WORKER), paid.payments.deployment.worker_registry
    )
    registry.stake(10**17)
    # The registry's Staked event names the worker: re-read at the next refresh, not after
    # stake_check_interval_s.
    assert paid.workers.refresh_stakes(paid.now()) == 1
    assert paid.workers.refresh_stakes(paid.now()) == 0  # nothing changed since
    clock = paid.clock
    assert isinstance(clock, FakeClock)
    paid.leases.open_poll(worker.principal, 1, until=paid.now() + 10, now=paid.now())
    assert paid.leases.dispatch(paid.now()) == [(job.id, worker.id)]
    [leased] = paid.leases.claim(worker.principal, 1, paid.now())
    output = {"embeddings": [[1.0], [2.0], [3.0]]}
    req = completion(
        worker,
        job.id,
        leased.attempt,
        output,
        units=len(TEXTS),
        price_wei_per_unit=leased.price_wei_per_unit,
    )
    result = paid.leases.complete(worker.principal, job.id, req, paid.now())
    assert int(result.cost_wei) == PRICE * len(TEXTS)
    paid.leases.complete(worker.principal, job.id, req, paid.now())  # a retried report

    report = paid.accounts.settlement()
    [pair] = report.pairs
    assert (pair.ledger_wei, pair.voucher_wei, pair.redeemed_wei) == (PRICE * 3, PRICE * 3, 0)
    assert report.ledger_entries == 1 and report.consistent

    [signed] = paid.workers.vouchers(worker.principal, paid.now())
    assert signed.voucher == Voucher(
        payer=Account.from_key(PAYER).address,
        payee=worker.address,
        cumulative_amount=PRICE * 3,
        expiry=signed.voucher.expiry,
    )
    # Close to expiry, serving the voucher signs it again: same amount, later expiry.
    clock.advance(paid.settings.voucher_ttl_s - 3600)
    [renewed] = paid.workers.vouchers(worker.principal, paid.now())
    assert renewed.voucher.cumulative_amount == signed.voucher.cumulative_amount
    assert renewed.voucher.expiry > signed.voucher.expiry
    clock.advance(-(paid.settings.voucher_ttl_s - 3600))
    broker = PaymentBroker(
        Chain.connect(anvil.url, WORKER), paid.payments.deployment.payment_broker
    )
    before = w3.eth.get_balance(worker.address)
    redeemed = broker.redeem(signed.voucher, signed.signature)
    gas_cost = (
        redeemed.gas_used * w3.eth.get_transaction_receipt(redeemed.tx_hash)["effectiveGasPrice"]
    )
    fee = PRICE * 3 * paid.payments.deployment.fee_bps // 10_000
    assert w3.eth.get_balance(worker.address) - before == PRICE * 3 - fee - gas_cost

    assert paid.payments.reconcile() == 1
    assert paid.payments.reconcile() == 0  # reading the same events again changes nothing
    [pair] = paid.accounts.settlement().pairs
    assert pair.redeemed_wei == pair.ledger_wei == PRICE * 3
    assert paid.jobs.get(client, job.id).state is JobState.SUCCEEDED


def test_a_chain_outage_is_a_503_and_loses_nothing(tmp_path: Path, sqlite_store: Store) -> None:
    """With the RPC gone, a submit is refused with 503 + Retry-After, and no job is made."""
    from fastapi.testclient import TestClient

    from orchestrator.app import create_app

    with Anvil() as node:
        deployment = deploy(Chain.connect(node.url, DEPLOYER))
        write_deployment(deployment, tmp_path / "deployment.json")
        settings = Settings(
            data_dir=tmp_path / "data",
            admin_token="operator-token-for-tests-0123456789abcdef",
            deployment_file=tmp_path / "deployment.json",
        )
        services = build_services(settings, store=sqlite_store)
        client = _client(services)
        _link(services, client, PAYER)
    # the node is stopped now
    _, key = services.auth.create_client("other", services.now())
    with sqlite_store.transaction() as s:
        from orchestrator.store.models import Client

        row = s.get(Client, client.id)
        assert row is not None
        key_row = s.scalar(select(Client).where(Client.name == "other"))
        assert key_row is not None
        key_row.payer_address = row.payer_address
    app = create_app(settings, services=services, run_sweeper=False)
    with TestClient(app) as http:
        resp = http.post(
            "/v1/jobs",
            json={
                "type": "inference",
                "model": EMBED_MODEL,
                "input": {"texts": TEXTS},
                "max_price_wei_per_unit": str(MAX_PRICE),
            },
            headers={"Authorization": f"Bearer {key}"},
        )
        assert resp.status_code == 503, resp.text
        assert resp.json()["code"] == "chain_unavailable"
        assert resp.headers["Retry-After"] == "5"
        listed = http.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).json()
        assert listed["jobs"] == []


def test_paid_jobs_must_finish_inside_the_withdrawal_delay(anvil: Anvil, paid: Services) -> None:
    client = _client(paid)
    _link(paid, client, PAYER)
    _fund(anvil, paid, deposit=10**18, cap=10**18)
    assert paid.payments.deployment is not None
    limit = paid.payments.deployment.withdraw_delay_s / 2
    with pytest.raises(InvalidInput, match="half the payer's withdrawal delay"):
        paid.jobs.submit(client, _spec(deadline_s=limit + 1), paid.now())
    job, _ = paid.jobs.submit(client, _spec(), paid.now())  # default deadline: clamped
    assert (job.deadline_at - job.created_at).total_seconds() == pytest.approx(limit)


def test_a_lowered_cap_counts_for_admission_at_once(anvil: Anvil, paid: Services) -> None:
    """On chain a lower cap waits out the delay (signed work stays payable); admission of
    new work must already respect it."""
    client = _client(paid)
    _link(paid, client, PAYER)
    broker = _fund(anvil, paid, deposit=10**18, cap=10**18)
    broker.authorize(Account.from_key(DEPLOYER).address, MAX_PRICE * len(TEXTS) - 1)
    assert (
        broker.allowance(broker.chain.address, Account.from_key(DEPLOYER).address).cap_wei == 10**18
    )
    with pytest.raises(PaymentRequired):
        paid.jobs.submit(client, _spec(), paid.now())


def test_a_cheat_is_caught_slashed_on_chain_unpaid_and_its_client_not_charged(
    anvil: Anvil, w3: Web3, tmp_path: Path, sqlite_store: Store
) -> None:
    """Every result checked: a cheat's embeddings lose the tie-break to two honest workers.

    The cheat is slashed through WorkerRegistry with the evidence hash, gets no voucher for
    the job, and drops out of matching; the checks are paid by the operator's verification
    payer (the deployer here), and the client pays nothing for the cheated job."""
    services = _paid_services(anvil, w3, tmp_path, sqlite_store, verify_rate=1.0)
    deployment = services.payments.deployment
    assert deployment is not None
    client = _client(services)
    _link(services, client, PAYER)
    _fund(anvil, services, deposit=10**18, cap=10**18)
    _fund(anvil, services, deposit=10**18, cap=10**18, key=DEPLOYER)  # pays for checks
    keys = {"cheat": WORKER, "honest1": DEV_PRIVATE_KEYS[4], "honest2": DEV_PRIVATE_KEYS[5]}
    workers = {}
    for name, key in keys.items():
        WorkerRegistry(Chain.connect(anvil.url, key), deployment.worker_registry).stake(10**17)
        workers[name] = _worker(services, key)
    right = {"embeddings": [[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]]}
    wrong = {"embeddings": [[0.8, -0.6], [0.0, 1.0], [1.0, 0.0]]}
    job, _ = services.jobs.submit(client, _spec(), services.now())

    def run(name: str, output: dict[str, object]) -> str:
        worker = workers[name]
        services.leases.open_poll(worker.principal, 1, services.now() + 10, services.now())
        services.leases.dispatch(services.now())
        [leased] = services.leases.claim(worker.principal, 1, services.now())
        services.leases.close_poll(worker.principal, services.now())
        req = completion(
            worker,
            leased.job_id,
            leased.attempt,
            output,
            units=len(TEXTS),
            price_wei_per_unit=leased.price_wei_per_unit,
        )
        services.leases.complete(worker.principal, leased.job_id, req, services.now())
        return leased.job_id

    assert run("cheat", wrong) == job.id
    assert services.jobs.get(client, job.id).state is JobState.VERIFYING
    assert services.workers.vouchers(workers["cheat"].principal, services.now()) == []
    run("honest1", right)
    run("honest2", right)
    done = services.jobs.get(client, job.id)
    assert done.state is JobState.SUCCEEDED and done.verification is not None
    assert done.verification.status == "replaced"
    assert done.verification.slashed_address == workers["cheat"].address

    assert services.verification.send_slashes() == 1
    registry = WorkerRegistry(Chain.connect(anvil.url), deployment.worker_registry)
    assert registry.is_slashed(workers["cheat"].address)
    assert registry.stake_of(workers["cheat"].address) == 0
    assert not registry.is_slashed(workers["honest1"].address)
    with services.store.transaction() as s:
        [slash] = s.scalars(select(Slash)).all()
        assert slash.status == "sent" and slash.slashed_wei == 10**17 and slash.tx_hash
        slash.status = "pending"  # as if the orchestrator died before recording the receipt
    assert services.verification.send_slashes() == 1
    with services.store.read() as s:
        [slash] = s.scalars(select(Slash)).all()
        assert slash.status == "sent" and "already slashed" in (slash.detail or "")

    # Money: the client owes nothing, the cheat nothing; each checker is owed by the operator.
    report = services.accounts.settlement()
    payer, operator = Account.from_key(PAYER).address, Account.from_key(DEPLOYER).address
    owed = {(p.payer, p.payee): p.ledger_wei for p in report.pairs}
    assert owed == {
        (operator, workers["honest1"].address): PRICE * len(TEXTS),
        (operator, workers["honest2"].address): PRICE * len(TEXTS),
    }
    assert payer not in {p for p, _ in owed}
    assert services.workers.vouchers(workers["cheat"].principal, services.now()) == []

    # Out of matching at once; the chain agrees at the next stake refresh.
    second, _ = services.jobs.submit(client, _spec(), services.now())
    cheat = workers["cheat"]
    services.leases.open_poll(cheat.principal, 1, services.now() + 10, services.now())
    assert services.leases.dispatch(services.now()) == []
    clock = services.clock
    assert isinstance(clock, FakeClock)
    clock.advance(services.settings.stake_check_interval_s + 1)
    services.workers.refresh_stakes(services.now())
    with services.store.read() as s:
        row = s.scalar(select(Worker).where(Worker.address == cheat.address))
        assert row is not None and row.stake_eligible is False
    assert "not staked" in (services.jobs.get(client, second.id).waiting_reason or "")


IDLE_WORKERS = 600


class RpcCount:
    """JSON-RPC traffic of one provider, as sent over HTTP: single requests by method, and
    the size of each batch request."""

    def __init__(self, provider: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.methods: Counter[str] = Counter()
        self.batches: list[int] = []  # requests per batch
        sessions = provider._request_session_manager
        post = sessions.make_post_request

        def make_post_request(uri: str, data: bytes, **kwargs: Any) -> Any:
            body = json.loads(data)
            if isinstance(body, list):
                self.batches.append(len(body))
            else:
                self.methods[body["method"]] += 1
            return post(uri, data, **kwargs)

        monkeypatch.setattr(sessions, "make_post_request", make_post_request)

    def reset(self) -> None:
        self.methods.clear()
        self.batches.clear()


def test_stake_refresh_costs_batches_and_events_not_calls_per_idle_worker(
    anvil: Anvil, w3: Web3, tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hundreds of unstaked registrations: a full re-read is a few JSON-RPC batches and one
    transaction, a refresh with nothing changed asks the chain for no worker at all, a stake
    is picked up from its event, and the idle registrations end after their time."""
    paid = _paid_services(
        anvil,
        w3,
        tmp_path,
        store,
        stake_check_interval_s=300.0,
        unstaked_registration_ttl_s=3600.0,
    )
    clock = paid.clock
    assert isinstance(clock, FakeClock) and isinstance(paid.payments, ChainPayments)
    idle = [register(paid) for _ in range(IDLE_WORKERS)]
    staker = _worker(paid)
    rpc = RpcCount(paid.payments.registry.chain.w3.provider, monkeypatch)

    clock.advance(300 + 1)  # every registration is due for its periodic re-read
    assert paid.workers.refresh_stakes(paid.now()) == IDLE_WORKERS + 1
    assert rpc.methods["eth_call"] == 0, rpc.methods  # no call per worker...
    assert rpc.batches == [ELIGIBILITY_BATCH, IDLE_WORKERS + 1 - ELIGIBILITY_BATCH]  # ...batches
    assert rpc.methods["eth_getLogs"] == 1  # one event scan for all workers

    rpc.reset()
    assert paid.workers.refresh_stakes(paid.now()) == 0
    # No block since the last scan: the head is all it asks for.
    assert (dict(rpc.methods), rpc.batches) == ({"eth_blockNumber": 1}, [])

    assert paid.payments.deployment is not None
    address = paid.payments.deployment.worker_registry
    WorkerRegistry(Chain.connect(anvil.url, WORKER), address).stake(10**17)
    rpc.reset()
    assert paid.workers.refresh_stakes(paid.now()) == 1  # named by its Staked event
    assert (rpc.methods["eth_call"], rpc.batches) == (0, [1])
    with paid.store.read() as s:
        assert s.get(Worker, staker.id).stake_eligible is True  # type: ignore[union-attr]

    clock.advance(3600)  # the idle registrations' time is up; the staked one stays
    paid.workers.refresh_stakes(paid.now())
    with paid.store.read() as s:
        listed = dict(s.execute(select(Worker.id, Worker.status)).all())
    assert listed[staker.id] == "registered"
    assert {listed[w.id] for w in idle} == {"deregistered"}
    with pytest.raises(Unauthorized):
        paid.auth.worker(idle[0].token)
    rpc.reset()
    clock.advance(300 + 1)
    assert paid.workers.refresh_stakes(paid.now()) == 1  # only the staked worker is left to read
    assert rpc.batches == [1]

    # An expired worker that comes back registers afresh, with a new unstaked period.
    again = paid.workers.challenge(idle[0].address, paid.now())
    req = register_request(idle[0].account, again.nonce, again.message)
    assert paid.workers.register(req, paid.now()).worker_id == idle[0].id
    assert paid.workers.expire_unstaked(paid.now()) == 0


def test_a_generation_is_admitted_by_its_bound_and_paid_prompt_and_completion_apart(
    anvil: Anvil, paid: Services
) -> None:
    """Two prices end to end on a real chain: the budget must hold the bound (the prompt's
    token bound at the prompt cap + max_tokens at the max price), and the ledger, the voucher
    and the chain pay prompt tokens x the prompt price + completion tokens x the price."""
    price, prompt_price, llm = 7 * 10**9, 2 * 10**9, "SmolLM2-135M-Instruct"
    client = _client(paid)
    _link(paid, client, PAYER)
    account = Account.from_key(WORKER)
    challenge = paid.workers.challenge(account.address, paid.now())
    llm_offer = offer(llm, price=price, job_type="generate", prompt_price_wei_per_unit=prompt_price)
    req = register_request(account, challenge.nonce, challenge.message, offers=[llm_offer])
    resp = paid.workers.register(req, paid.now())
    worker = TestWorker(Principal("worker", resp.worker_id), account, resp.session_token)
    spec = JobSpec.model_validate(
        {
            "type": "generate",
            "model": llm,
            "generation": {"prompt": "Hello", "max_tokens": 4},
            "max_price_wei_per_unit": price,
            "max_prompt_price_wei_per_unit": prompt_price,
        }
    )
    bound = (len(b"Hello") + 64) * prompt_price + 4 * price
    with pytest.raises(PaymentRequired) as refused:
        paid.jobs.submit(client, spec, paid.now())
    assert refused.value.extra["needed_wei"] == str(bound)
    assert "69 prompt tokens at 2000000000 wei + max_tokens 4 at 7000000000 wei" in str(
        refused.value.detail
    )
    _fund(anvil, paid, deposit=10**18, cap=bound)  # exactly the bound: admitted
    job, _ = paid.jobs.submit(client, spec, paid.now())
    assert paid.accounts.account(client).budget.reserved_wei == bound  # type: ignore[union-attr]

    [leased] = _stake_and_lease(anvil, paid, worker, 1)
    assert leased.job_id == job.id
    output = {
        "text": "Hi there",
        "token_ids": [11, 12, 13],
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 9, "completion_tokens": 3},
    }
    result = paid.leases.complete(
        worker.principal,
        job.id,
        completion(
            worker,
            job.id,
            leased.attempt,
            output,
            units=12,
            price_wei_per_unit=leased.price_wei_per_unit,
            prompt_price_wei_per_unit=leased.prompt_price_wei_per_unit,
        ),
        paid.now(),
    )
    owed = 9 * prompt_price + 3 * price
    assert int(result.cost_wei) == owed
    [pair] = paid.accounts.settlement().pairs
    assert (pair.ledger_wei, pair.voucher_wei) == (owed, owed)
    [signed] = paid.workers.vouchers(worker.principal, paid.now())
    assert signed.voucher.cumulative_amount == owed
    assert paid.payments.deployment is not None
    broker = PaymentBroker(
        Chain.connect(anvil.url, WORKER), paid.payments.deployment.payment_broker
    )
    broker.redeem(signed.voucher, signed.signature)
    assert paid.payments.reconcile() == 1
    [pair] = paid.accounts.settlement().pairs
    assert pair.redeemed_wei == owed and paid.accounts.settlement().consistent
    assert paid.accounts.account(client).budget.reserved_wei == 0  # type: ignore[union-attr]


def test_a_batch_of_results_pays_one_voucher_signed_once_over_the_sum(
    anvil: Anvil, paid: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Results reported together for one payer: a ledger entry per job, and the voucher they
    all pay into signed once, over the batch's total (a signature costs ~1 ms: never one per
    job); that voucher redeems on chain for every job's cost."""
    client = _client(paid)
    _link(paid, client, PAYER)
    _fund(anvil, paid, deposit=10**18, cap=10**18)
    worker = _worker(paid, max_concurrency=3)
    jobs = [paid.jobs.submit(client, _spec(), paid.now())[0] for _ in range(3)]
    leased = _stake_and_lease(anvil, paid, worker, 3)
    assert {j.job_id for j in leased} == {j.id for j in jobs}
    items = [batch_item(job.model_dump(mode="json"), units=len(TEXTS)) for job in leased]
    signatures = Counter[str]()
    real_sign = settlement.sign_voucher

    def counted(*args: Any, **kwargs: Any) -> str:
        signatures["voucher"] += 1
        return real_sign(*args, **kwargs)

    monkeypatch.setattr(settlement, "sign_voucher", counted)
    request = BatchCompleteRequest.model_validate(signed(items, worker.account))
    outcomes = paid.leases.complete_batch(worker.principal, request, paid.now())
    assert [o.error for o in outcomes] == [None] * 3
    assert signatures["voucher"] == 1
    owed = 3 * PRICE * len(TEXTS)
    report = paid.accounts.settlement()
    [pair] = report.pairs
    assert (pair.ledger_wei, pair.voucher_wei) == (owed, owed)
    assert report.ledger_entries == 3 and report.consistent
    [voucher] = paid.workers.vouchers(worker.principal, paid.now())
    assert voucher.voucher.cumulative_amount == owed
    assert paid.payments.deployment is not None
    broker = PaymentBroker(
        Chain.connect(anvil.url, WORKER), paid.payments.deployment.payment_broker
    )
    broker.redeem(voucher.voucher, voucher.signature)  # the one signature is the valid one
    assert paid.payments.reconcile() == 1
    assert {paid.jobs.get(client, j.id).state for j in jobs} == {JobState.SUCCEEDED}
