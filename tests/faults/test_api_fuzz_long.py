"""Schemathesis, long run: thousands of requests generated from the OpenAPI spec, random each
run, against the app with on-chain payments on (anvil), so admission, budgets and vouchers
read the chain. No request may get a 5xx; at least ``GPUMARKET_FAULTS_FUZZ_REQUESTS`` (1,000)
requests are sent. The short, fixed run is tests/api/test_api_fuzz.py, in ``make test``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import settings

from contracts.anvil import Anvil
from contracts.broker import PaymentBroker
from contracts.chain import Chain
from contracts.deploy import deploy, write_deployment
from orchestrator.store import Store
from tests.faults.conftest import TrialReport, repeat_count
from tests.faults.market import DEPLOYER_KEY, MIN_STAKE_WEI, PAYER_DEPOSIT_WEI, PAYER_KEY
from tests.fuzzing import CHECKS, HEALTH_CHECKS_OFF, FuzzTarget, build_target, openapi_schema

pytestmark = [pytest.mark.faults, pytest.mark.slow]

MAX_EXAMPLES = 100  # per operation, Hypothesis' default; plus schemathesis' coverage cases

schema = openapi_schema()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    root = tmp_path_factory.mktemp("fuzz-long")
    with Anvil() as anvil:
        deployer = Chain.connect(anvil.url, DEPLOYER_KEY)  # anvil dev keys: dev chain only
        deployment = deploy(deployer, min_stake_wei=MIN_STAKE_WEI)
        write_deployment(deployment, root / "deployment.json")
        payer = PaymentBroker(Chain.connect(anvil.url, PAYER_KEY), deployment.payment_broker)
        payer.deposit(PAYER_DEPOSIT_WEI)
        payer.authorize(deployer.address, PAYER_DEPOSIT_WEI)
        store = Store(f"sqlite:///{root / 'orchestrator.db'}")
        try:
            yield build_target(
                root / "data",
                store,
                deployment_file=root / "deployment.json",
                payer_key=PAYER_KEY,
            )
        finally:
            store.dispose()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=HEALTH_CHECKS_OFF,
)
def test_no_server_errors(case: schemathesis.Case, target: FuzzTarget) -> None:
    response = target.call(case)
    case.validate_response(response, checks=CHECKS)


def test_schemathesis_long_run(target: FuzzTarget, trial_report: TrialReport) -> None:
    """Runs after the cases above (file order): counts what they sent."""
    wanted = repeat_count("FUZZ_REQUESTS", 1000)
    server_errors = sum(n for status, n in target.statuses.items() if status >= 500)
    trial_report.record(
        duration_s=round(time.monotonic() - target.started, 1),
        requests=target.requests,
        server_errors=server_errors,
        operations=len(list(schema.get_all_operations())),
        statuses={str(k): v for k, v in sorted(target.statuses.items())},
    )
    assert target.requests >= wanted, f"only {target.requests} requests; want {wanted}"
    assert server_errors == 0, target.statuses
