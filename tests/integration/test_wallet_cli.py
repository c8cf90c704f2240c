"""`gpumarket wallet` against a real anvil: every command, and the errors a person can fix.

Roles (anvil dev keys): 0 deployer and fee recipient, 1 payer (client), 2 orchestrator
(voucher signer), 3 worker that stakes. The redeeming worker has its own key file, written the
way `gpumarket worker run` writes .gpumarket/worker.key.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import Result
from eth_account import Account
from typer.testing import CliRunner

from contracts.anvil import DEV_PRIVATE_KEYS, Anvil, AnvilNotInstalled, anvil_binary, free_port
from contracts.broker import PaymentBroker
from contracts.chain import Chain
from contracts.deploy import Deployment, deploy, write_deployment
from contracts.registry import WorkerRegistry
from gpumarket.cli import app
from gpumarket.wallet import WALLET_KEY_ENV, format_eth, format_utc, parse_amount_wei
from protocol.vouchers import Voucher, sign_voucher
from worker.config import load_or_create_key

ETH = 10**18
FEE_BPS = 250
WITHDRAW_DELAY_S = 3_600
MIN_STAKE_WEI = ETH // 10
UNBONDING_DELAY_S = 600
FAR_EXPIRY = 2**40
PAYER, SIGNER, STAKER = 1, 2, 3


@dataclass
class Market:
    chain: Chain
    deployment: Deployment
    deployment_path: Path
    broker: PaymentBroker
    registry: WorkerRegistry

    def address(self, dev_account: int) -> str:
        return str(Account.from_key(DEV_PRIVATE_KEYS[dev_account]).address)

    def rpc(self, method: str, *params: Any) -> Any:
        return self.chain.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]

    def advance(self, seconds: int) -> None:
        self.rpc("evm_increaseTime", seconds)
        self.rpc("evm_mine")  # gas is estimated on the latest block: move its clock too


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    try:
        anvil_binary()
    except AnvilNotInstalled as exc:
        pytest.fail(f"{exc} (make install does this)")
    with Anvil() as node:
        chain = Chain.connect(node.url, DEV_PRIVATE_KEYS[0])
        deployment = deploy(
            chain,
            fee_bps=FEE_BPS,
            withdraw_delay_s=WITHDRAW_DELAY_S,
            min_stake_wei=MIN_STAKE_WEI,
            unbonding_delay_s=UNBONDING_DELAY_S,
        )
        path = tmp_path_factory.mktemp("wallet") / "deployment.json"
        write_deployment(deployment, path)
        yield Market(
            chain,
            deployment,
            path,
            PaymentBroker(chain, deployment.payment_broker),
            WorkerRegistry(chain, deployment.worker_registry),
        )


@pytest.fixture
def m(market: Market) -> Iterator[Market]:
    """The market, with each test's chain changes rolled back (evm_snapshot)."""
    snapshot = market.rpc("evm_snapshot")["result"]
    yield market
    market.rpc("evm_revert", snapshot)


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # Click < 8.2
    except TypeError:
        return CliRunner()  # Click >= 8.2 always keeps stderr apart


def wallet(m: Market | None, *args: str, env: dict[str, str | None] | None = None) -> Result:
    """``gpumarket wallet ARGS --deployment FILE`` in-process, 200 columns unless ``env`` says
    otherwise, and no signing key from the caller's environment."""
    deployment = ["--deployment", str(m.deployment_path)] if m is not None else []
    result = _runner().invoke(
        app,
        ["wallet", *args, *deployment],
        env={"COLUMNS": "200", WALLET_KEY_ENV: None, **(env or {})},
    )
    return cast(Result, result)  # Typer's own Result type is newer than typer>=0.12


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result.stdout


def refused(result: Result, code: int = 1) -> str:
    """The one-line message of a command that exited ``code`` on purpose (not a traceback)."""
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    message = result.stderr.strip()
    assert message.count("\n") == 0, message
    return message


def dev(n: int) -> tuple[str, str]:
    return ("--dev-account", str(n))


def worker_key_file(path: Path) -> tuple[str, Path]:
    """A key file made the way `gpumarket worker run` makes one: (address, path)."""
    account, created = load_or_create_key(path)
    assert created
    return str(account.address), path


# --- amounts, no chain needed -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "wei"),
    [
        ("123", 123),
        ("1.5eth", 3 * ETH // 2),
        ("0.2 ETH", ETH // 5),
        ("1000000000gwei", ETH),
        ("1 wei", 1),
        ("2ether", 2 * ETH),
        ("1.000000000000000001eth", ETH + 1),  # float would round this to 1 ETH
        ("0.000000000000000001 eth", 1),
        ("1.0", 1),
        ("0", 0),
    ],
)
def test_amounts_parse_exactly(text: str, wei: int) -> None:
    assert parse_amount_wei(text) == wei


def test_eth_is_shown_exactly() -> None:
    assert format_eth(ETH + 1) == "1.000000000000000001"
    assert format_eth(3 * ETH // 2) == "1.5"
    assert format_eth(10_000 * ETH) == "10000"
    assert format_eth(0) == "0"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("1.5", "not a whole number of wei"),
        ("0.0000000000000000001eth", "not a whole number of wei"),
        ("-1eth", "negative"),
        ("5 dollars", "unknown unit 'dollars'"),
        ("1e18", "not a number"),
        ("lots", "not a number"),
        ("0", "must be more than 0"),
    ],
)
def test_bad_amounts_are_bad_usage(text: str, said: str) -> None:
    message = refused(wallet(None, "deposit", text, *dev(PAYER)), code=2)
    assert said in message and text in message


def test_missing_deployment_says_how_to_make_one(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    result = wallet(None, "balance", "--deployment", str(missing), *dev(PAYER))
    message = refused(result)
    assert str(missing) in message
    assert "run `gpumarket chain up` or pass --deployment" in message


def test_no_key_is_bad_usage(market: Market) -> None:
    message = refused(wallet(market, "deposit", "1eth"), code=2)
    assert "--key-file" in message and WALLET_KEY_ENV in message


# --- against the chain --------------------------------------------------------------------


def test_unreachable_rpc_names_the_url(market: Market) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    message = refused(wallet(market, "balance", *dev(PAYER), "--rpc-url", url))
    assert url in message


def test_deposit_then_balance_shows_it_in_wei_and_eth(m: Market) -> None:
    out = ok(wallet(m, "deposit", "1.5eth", *dev(PAYER)))
    assert "deposit now 1500000000000000000 wei (1.5 ETH)" in out
    assert m.broker.balance_of(m.address(PAYER)) == 3 * ETH // 2

    for columns in ("40", "80", "200"):  # one whole line per field at any width
        out = ok(wallet(m, "balance", *dev(PAYER), env={"COLUMNS": columns}))
        assert re.search(rf"^{m.address(PAYER)} on chain \d+$", out, re.M), out
        deposit = r"^broker deposit\s+1500000000000000000 wei \(1\.5 ETH\)$"
        assert re.search(deposit, out, re.M), out
        assert re.search(r"^deposit unlockAt\s+none \(locked; `gpumarket wallet unlock`", out, re.M)
        eligible = r"^eligible for jobs\s+no \(active stake below the minimum\)"
        assert re.search(eligible, out, re.M), out


def test_balance_of_any_address_needs_no_key(m: Market) -> None:
    out = ok(wallet(m, "balance", m.address(STAKER)))
    balance = m.chain.balance_wei(m.address(STAKER))
    assert f"{balance} wei ({format_eth(balance)} ETH)" in out


def test_authorise_then_the_allowance_is_visible(m: Market) -> None:
    signer = m.address(SIGNER)
    out = ok(wallet(m, "authorise", signer, "0.2 ETH", *dev(PAYER)))
    assert f"authorised {signer}: cap 200000000000000000 wei (0.2 ETH)" in out
    assert m.broker.allowance(m.address(PAYER), signer).cap_wei == ETH // 5

    ok(wallet(m, "authorize", signer.lower(), "1000000000gwei", *dev(PAYER)))  # US spelling
    out = ok(wallet(m, "balance", *dev(PAYER), "--signer", signer))
    assert re.search(r"cap\s+1000000000000000000 wei \(1 ETH\)", out), out
    assert re.search(r"remaining\s+1000000000000000000 wei \(1 ETH\)", out), out


def test_withdraw_needs_unlock_and_the_delay(m: Market) -> None:
    ok(wallet(m, "deposit", "2eth", *dev(PAYER)))
    message = refused(wallet(m, "withdraw", "1eth", *dev(PAYER)))
    assert message.startswith("withdraw refused: NotUnlocked")
    assert "`gpumarket wallet unlock`" in message

    out = ok(wallet(m, "unlock", *dev(PAYER)))
    unlock_at = m.broker.unlock_at(m.address(PAYER))
    assert f"withdraw possible from {format_utc(unlock_at)} (in 1h 0m)" in out

    message = refused(wallet(m, "withdraw", "1eth", *dev(PAYER)))
    assert message.startswith(f"withdraw refused: StillLocked until {format_utc(unlock_at)}")

    m.advance(WITHDRAW_DELAY_S + 1)
    message = refused(wallet(m, "withdraw", "3eth", *dev(PAYER)))
    assert "InsufficientDeposit: the deposit holds 2000000000000000000 wei (2 ETH)" in message
    assert "3000000000000000000 wei (3 ETH) is needed" in message
    out = ok(wallet(m, "withdraw", "1eth", *dev(PAYER)))
    assert "deposit now 1000000000000000000 wei (1 ETH)" in out
    assert m.broker.balance_of(m.address(PAYER)) == ETH


def test_stake_unstake_withdraw_stake(m: Market) -> None:
    staker = m.address(STAKER)
    out = ok(wallet(m, "stake", "0.1eth", *dev(STAKER)))
    assert "active stake now 100000000000000000 wei (0.1 ETH)" in out
    assert "eligible for jobs: yes" in out

    message = refused(wallet(m, "unstake", "1eth", *dev(STAKER)))
    assert message == (
        "unstake refused: InsufficientStake: active stake is 100000000000000000 wei (0.1 ETH), "
        "1000000000000000000 wei (1 ETH) was asked for"
    )
    message = refused(wallet(m, "withdraw-stake", *dev(STAKER)))
    assert "NothingToWithdraw" in message and "`gpumarket wallet unstake AMOUNT`" in message

    out = ok(wallet(m, "unstake", "40000000gwei", *dev(STAKER)))
    ready_at = m.registry.unbonding_of(staker).ready_at
    assert "unbonding 40000000000000000 wei (0.04 ETH)" in out
    assert f"withdraw-stake` from {format_utc(ready_at)} (in 10m 0s)" in out
    out = ok(wallet(m, "balance", *dev(STAKER)))
    assert re.search(r"stake \(unbonding\)\s+40000000000000000 wei", out), out
    assert "no (active stake below the minimum, stake is unbonding)" in out

    message = refused(wallet(m, "withdraw-stake", *dev(STAKER)))
    assert message.startswith(
        f"withdraw-stake refused: StillUnbonding until {format_utc(ready_at)}"
    )

    m.advance(UNBONDING_DELAY_S + 1)
    out = ok(wallet(m, "withdraw-stake", *dev(STAKER)))
    assert "withdrew 40000000000000000 wei (0.04 ETH) of unbonded stake" in out
    assert m.registry.unbonding_of(staker).amount_wei == 0
    assert m.registry.stake_of(staker) == 6 * ETH // 100


def _voucher_file(m: Market, path: Path, payee: str, cumulative_wei: int) -> Path:
    voucher = Voucher(
        payer=m.address(PAYER), payee=payee, cumulative_amount=cumulative_wei, expiry=FAR_EXPIRY
    )
    signature = sign_voucher(
        DEV_PRIVATE_KEYS[SIGNER], voucher, m.deployment.chain_id, m.deployment.payment_broker
    )
    path.write_text(
        json.dumps({"voucher": voucher.model_dump(mode="json"), "signature": signature})
    )
    return path


def test_redeem_pays_the_payee_minus_the_fee(m: Market, tmp_path: Path) -> None:
    worker, key_file = worker_key_file(tmp_path / "worker.key")
    m.rpc("anvil_setBalance", worker, hex(ETH))  # gas money for the worker's key
    ok(wallet(m, "deposit", "1eth", *dev(PAYER)))
    ok(wallet(m, "authorise", m.address(SIGNER), "0.5eth", *dev(PAYER)))
    voucher_file = _voucher_file(m, tmp_path / "voucher.json", worker, 3 * ETH // 10)
    fee_recipient = m.deployment.fee_recipient
    before = {who: m.chain.balance_wei(who) for who in (worker, fee_recipient)}

    out = ok(wallet(m, "redeem", str(voucher_file), "--key-file", str(key_file)))

    fee = 3 * ETH // 10 * FEE_BPS // 10_000
    paid = 3 * ETH // 10 - fee
    assert f"paid {paid} wei ({format_eth(paid)} ETH) to the payee" in out
    assert f"fee {fee} wei ({format_eth(fee)} ETH) to {fee_recipient}" in out
    tx_hash = re.search(r"\[tx (0x[0-9a-f]{64})", out)
    assert tx_hash is not None, out
    receipt = m.chain.w3.eth.get_transaction_receipt(tx_hash[1])  # type: ignore[arg-type]
    gas_wei = int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])
    assert m.chain.balance_wei(worker) - before[worker] == paid - gas_wei
    assert m.chain.balance_wei(fee_recipient) - before[fee_recipient] == fee
    assert m.broker.balance_of(m.address(PAYER)) == ETH - 3 * ETH // 10

    message = refused(wallet(m, "redeem", str(voucher_file), "--key-file", str(key_file)))
    assert message.startswith("redeem refused: NotIncreasing") and "a replay" in message

    over = _voucher_file(m, tmp_path / "over.json", worker, 9 * ETH // 10)
    message = refused(wallet(m, "redeem", str(over), "--key-file", str(key_file)))
    assert message.startswith("redeem refused: OverCap: the signer's cap is 500000000000000000")


def test_redeem_refuses_a_malformed_voucher_file(m: Market, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"voucher": {"payer": "0x12"}, "signature": "0x00"}))
    message = refused(wallet(m, "redeem", str(bad), *dev(PAYER)), code=2)
    assert "voucher.payer" in message


def test_unfunded_key_is_told_its_address_and_what_it_needs(m: Market, tmp_path: Path) -> None:
    poor, key_file = worker_key_file(tmp_path / "worker.key")
    message = refused(wallet(m, "deposit", "1eth", "--key-file", str(key_file)))
    assert message.startswith(f"deposit: account {poor} holds 0 wei (0 ETH)")
    needed = re.search(r"needs (\d+) wei", message)
    assert needed is not None and int(needed[1]) > ETH

    # The message names the command that funds the key on the dev chain; run as printed, it
    # makes a deposit work.
    command = re.search(r"`(gpumarket chain fund [^`]+)`", message)
    assert command is not None, message
    program, *args = shlex.split(command[1])
    assert program == "gpumarket" and poor in args
    out = ok(_runner().invoke(app, args, env={"COLUMNS": "40"}))
    assert f"sent 1000000000000000000 wei (1 ETH) to {poor}" in out
    assert m.chain.balance_wei(poor) == ETH
    ok(wallet(m, "deposit", "0.5eth", "--key-file", str(key_file)))


def test_chain_fund_reads_the_deployment_file_and_refuses_junk(m: Market) -> None:
    someone = Account.create().address
    fund = ["chain", "fund", someone, "--deployment", str(m.deployment_path)]
    out = ok(_runner().invoke(app, fund, env={"COLUMNS": "200"}))
    assert m.chain.balance_wei(someone) == ETH  # the default amount
    assert re.search(rf"^sent 1000000000000000000 wei \(1 ETH\) to {someone}; it holds", out)
    bad = _runner().invoke(app, ["chain", "fund", "0x12", "--deployment", str(m.deployment_path)])
    assert bad.exit_code == 2 and "not an address" in bad.stderr


def test_signing_key_from_the_environment(m: Market) -> None:
    out = ok(wallet(m, "balance", env={WALLET_KEY_ENV: DEV_PRIVATE_KEYS[STAKER]}))
    assert m.address(STAKER) in out


def test_a_key_file_that_holds_no_key_is_bad_usage(m: Market, tmp_path: Path) -> None:
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    message = refused(wallet(m, "balance", "--key-file", str(junk)), code=2)
    assert (
        message == f"key file {junk} does not hold a hex private key (64 hex digits, 0x optional)"
    )
