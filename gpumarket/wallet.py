"""``gpumarket wallet``: one account's money on the gpumarket contracts.

    gpumarket wallet balance [ADDRESS] [--signer ADDR]...
    gpumarket wallet deposit AMOUNT          PaymentBroker: fund the deposit vouchers draw on
    gpumarket wallet authorise SIGNER CAP    let SIGNER (the orchestrator) spend up to CAP
    gpumarket wallet unlock                  start the withdraw delay
    gpumarket wallet withdraw AMOUNT         take deposit back once the delay has passed
    gpumarket wallet redeem VOUCHER_FILE     pay a signed voucher to its payee
    gpumarket wallet stake AMOUNT            WorkerRegistry: stake to receive jobs
    gpumarket wallet unstake AMOUNT          start unbonding AMOUNT of active stake
    gpumarket wallet withdraw-stake          take unbonded stake back once the delay has passed

Stake leaves in two steps a delay apart (``unstake``, then ``withdraw-stake``), so they are two
commands rather than one with a flag that would mean a different transaction.

Every command reads the deployment file (``--deployment``, written by ``gpumarket chain up``),
talks to its RPC (or ``--rpc-url``) and signs with ``--key-file`` (a file holding a hex private
key, such as a worker's ``.gpumarket/worker.key``), else the key in ``GPUMARKET_WALLET_KEY``,
or ``--dev-account N``: anvil's well-known dev key N, refused on any chain but 31337.

AMOUNT and CAP: ``123`` (wei), ``1000000000gwei``, ``1.5eth``, ``0.2 ETH``; parsed exactly.

Exit codes: 0 done; 1 the chain refused or could not be reached (one line says why and what to
do); 2 bad usage (an amount, an address, a key or a voucher file that cannot be used).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, Inexact, localcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from gpumarket.output import err_console, out_console, print_fields

if TYPE_CHECKING:
    from contracts.broker import PaymentBroker
    from contracts.chain import Chain, ContractRevert, InsufficientFundsForGas, TxResult
    from contracts.deploy import Deployment
    from contracts.registry import WorkerRegistry
    from protocol.vouchers import Voucher

# Contract and web3 imports wait until a command runs: they cost most of a second, and
# `gpumarket --help` or `gpumarket worker run` should not pay for them.

wallet_app = typer.Typer(
    help="Your deposit, signer caps, stake and vouchers on the gpumarket contracts.",
    no_args_is_help=True,
)

DEFAULT_DEPLOYMENT = Path(".gpumarket/deployment.json")
"""Where ``gpumarket chain up`` writes the deployment (the same default as gpumarket.cli)."""
WALLET_KEY_ENV = "GPUMARKET_WALLET_KEY"
"""Environment variable holding the signing key itself (hex), when no --key-file is given."""
EXIT_REFUSED = 1
EXIT_USAGE = 2

WEI_PER_ETH = 10**18
UNIT_DECIMALS = {"wei": 0, "gwei": 9, "eth": 18, "ether": 18}
"""Power of ten from each accepted unit to wei: 1 gwei = 10**9 wei, 1 ETH = 10**18 wei."""
MAX_UINT256 = 2**256 - 1
MAX_AMOUNT_CHARS = 100
"""Longer amount strings are refused before any arithmetic."""
AMOUNT_PRECISION = 200
"""Decimal digits kept while scaling an amount to wei: more than MAX_AMOUNT_CHARS + 18, so
the scaling is exact (and Inexact is trapped to prove it)."""
_AMOUNT = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[a-z]*)")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
AMOUNT_EXAMPLES = "e.g. 1.5eth, 0.2 ETH, 1000000000gwei, or 123 (wei)"
AMOUNT_CONTEXT: dict[str, Any] = {"ignore_unknown_options": True}
"""For commands with an AMOUNT: "-1eth" reaches the amount parser, which says it is negative,
instead of Click's "No such option: -1"."""


# --- amounts, times, output --------------------------------------------------------------


def parse_amount_wei(text: str) -> int:
    """The amount in ``text``, in wei: ``123`` (wei), ``1000000000gwei``, ``1.5eth``,
    ``0.2 ETH`` (units: wei, gwei, eth, ether; any case). Exact: Decimal, never float.

    ValueError, with a message a person can act on, for negative amounts, fractions of a wei,
    unknown units and anything over 2**256 - 1 wei.
    """
    cleaned = text.strip().lower()
    if cleaned.startswith("-"):
        raise ValueError(f"{text!r} is negative; amounts are 0 or more")
    match = _AMOUNT.fullmatch(cleaned) if len(cleaned) <= MAX_AMOUNT_CHARS else None
    if match is None:
        raise ValueError(f"{text!r} is not a number with a unit ({AMOUNT_EXAMPLES})")
    unit = match["unit"] or "wei"
    if unit not in UNIT_DECIMALS:
        raise ValueError(f"{text!r} has an unknown unit {unit!r}; use wei, gwei or eth")
    with localcontext() as context:
        context.prec = AMOUNT_PRECISION
        context.traps[Inexact] = True
        wei = Decimal(match["number"]).scaleb(UNIT_DECIMALS[unit])
        whole = wei == wei.to_integral_value()
    if not whole:
        raise ValueError(f"{text!r} is {wei:f} wei: not a whole number of wei (1 wei = 1e-18 ETH)")
    if wei > MAX_UINT256:
        raise ValueError(f"{text!r} is more than 2**256 - 1 wei")
    return int(wei)


def format_eth(wei: int) -> str:
    """``wei`` as an exact decimal number of ETH, without trailing zeros: 1.5, 0.000000001."""
    sign = "-" if wei < 0 else ""
    whole, fraction = divmod(abs(wei), WEI_PER_ETH)
    if fraction == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:018d}".rstrip("0")


def wei_and_eth(wei: int) -> str:
    """``1500000000000000000 wei (1.5 ETH)``."""
    return f"{wei} wei ({format_eth(wei)} ETH)"


def format_utc(unix_s: int) -> str:
    """``2026-11-23 04:00:00 UTC``; ``unix_s`` in seconds."""
    try:
        return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):  # past year 9999: a uint64 can hold that
        return f"unix time {unix_s}"


def format_duration(seconds: int) -> str:
    """``1d 0h``, ``2h 5m``, ``3m 20s``, ``45s``: the two largest units."""
    days, rest = divmod(max(seconds, 0), 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _when(unix_s: int, chain_now_s: int) -> str:
    """An instant and how far it is from the chain's clock (not this machine's)."""
    if unix_s > chain_now_s:
        return f"{format_utc(unix_s)} (in {format_duration(unix_s - chain_now_s)})"
    return f"{format_utc(unix_s)} (passed)"


def _say(text: str) -> None:
    out_console().print(text, markup=False)


def _fail(text: str, code: int = EXIT_REFUSED) -> NoReturn:
    """One red line on stderr, then exit ``code``: no traceback for what a person can fix."""
    err_console().print(text, style="red", markup=False)
    raise typer.Exit(code=code)


def _usage(text: str) -> NoReturn:
    _fail(text, EXIT_USAGE)


def _amount_argument(text: str, name: str, *, positive: bool) -> int:
    try:
        wei = parse_amount_wei(text)
    except ValueError as exc:
        _usage(f"{name} {exc}")
    if positive and wei == 0:
        _usage(f"{name} must be more than 0 ({AMOUNT_EXAMPLES})")
    return wei


def _address_argument(text: str, name: str) -> str:
    from protocol.vouchers import checksum_address

    if not _ADDRESS.fullmatch(text):
        _usage(f"{name}: {text!r} is not an address (0x and 40 hex digits)")
    try:
        return checksum_address(text)
    except ValueError as exc:
        _usage(f"{name}: {exc}")


def _tx(result: TxResult) -> str:
    return f"[tx {result.tx_hash}, block {result.block}, gas {result.gas_used}]"


# --- keys, deployment, connection ---------------------------------------------------------


@dataclass(frozen=True)
class WalletOptions:
    """The options every wallet command takes."""

    deployment: Path
    rpc_url: str | None
    key_file: Path | None
    dev_account: int | None


@dataclass(frozen=True)
class _Wallet:
    chain: Chain
    deployment: Deployment
    broker: PaymentBroker
    registry: WorkerRegistry

    @property
    def address(self) -> str:
        return str(self.chain.address)

    def chain_now_s(self) -> int:
        """The latest block's timestamp: what the contracts compare delays against."""
        return int(self.chain.w3.eth.get_block("latest")["timestamp"])


def _signing_key(options: WalletOptions, *, required: bool) -> bytes | None:
    """The private key chosen by --dev-account, --key-file or GPUMARKET_WALLET_KEY (in that
    order), checked before anything goes over the network."""
    from eth_account import Account

    from contracts.anvil import DEV_PRIVATE_KEYS

    if options.dev_account is not None and options.key_file is not None:
        _usage("give --dev-account or --key-file, not both")
    if options.dev_account is not None:
        if not 0 <= options.dev_account < len(DEV_PRIVATE_KEYS):
            _usage(f"--dev-account must be 0 to {len(DEV_PRIVATE_KEYS) - 1}")
        raw, source = DEV_PRIVATE_KEYS[options.dev_account], "anvil's dev key"
    elif options.key_file is not None:
        raw, source = _read_key_file(options.key_file), f"key file {options.key_file}"
    elif os.environ.get(WALLET_KEY_ENV, "").strip():
        raw, source = os.environ[WALLET_KEY_ENV].strip(), WALLET_KEY_ENV
    elif required:
        _usage(
            f"no signing key: pass --key-file PATH (e.g. .gpumarket/worker.key), set "
            f"{WALLET_KEY_ENV}, or use --dev-account N on the dev chain"
        )
    else:
        return None
    try:
        return bytes(Account.from_key(raw).key)
    except (ValueError, TypeError):
        # Not echoing the text: it may be most of a secret.
        _usage(f"{source} does not hold a hex private key (64 hex digits, 0x optional)")


def _read_key_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        _usage(f"key file {path} not found (`gpumarket worker run` makes .gpumarket/worker.key)")
    except (OSError, UnicodeDecodeError) as exc:
        _usage(f"cannot read key file {path}: {exc}")


def _load_deployment(path: Path) -> Deployment:
    from pydantic import ValidationError

    from contracts.deploy import read_deployment

    try:
        return read_deployment(path)
    except FileNotFoundError:
        _fail(f"no deployment file at {path}: run `gpumarket chain up` or pass --deployment")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "file"
        _fail(f"{path} is not a deployment file ({where}: {first['msg']})")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read deployment file {path}: {exc}")


def _connect(options: WalletOptions, deployment: Deployment, url: str) -> Chain:
    """A read-only Chain on ``url``, checked to serve ``deployment``'s contracts."""
    from contracts.anvil import DEV_CHAIN_ID
    from contracts.chain import Chain, ChainError
    from contracts.deploy import check_deployment

    try:
        chain = Chain.connect(url)
    except ChainError:
        _fail(
            f"no JSON-RPC answer from {url}: is the chain running? (`gpumarket chain up` starts "
            "a local one; --rpc-url picks another endpoint)"
        )
    if options.dev_account is not None and chain.chain_id != DEV_CHAIN_ID:
        _usage(
            f"--dev-account uses anvil's public dev keys, only on the dev chain {DEV_CHAIN_ID}; "
            f"{url} serves chain {chain.chain_id}"
        )
    try:
        check_deployment(chain, deployment)
    except ChainError as exc:
        _fail(
            f"{exc} ({options.deployment} does not describe this chain: rerun `gpumarket chain "
            "up`, or pass the right --deployment / --rpc-url)"
        )
    return chain


@contextmanager
def _session(options: WalletOptions, action: str, *, signing: bool = True) -> Iterator[_Wallet]:
    """The wallet for ``options``; any chain error inside becomes one line and exit 1."""
    from web3.exceptions import Web3Exception

    from contracts.anvil import DEV_CHAIN_ID
    from contracts.broker import PaymentBroker
    from contracts.chain import ChainError, ContractRevert, InsufficientFundsForGas, ReceiptTimeout
    from contracts.registry import WorkerRegistry

    key = _signing_key(options, required=signing)
    deployment = _load_deployment(options.deployment)
    url = options.rpc_url or deployment.rpc_url
    dev_chain = False
    try:
        chain = _connect(options, deployment, url)
        dev_chain = chain.chain_id == DEV_CHAIN_ID
        if key is not None:
            chain = chain.with_key(key)
        yield _Wallet(
            chain,
            deployment,
            PaymentBroker(chain, deployment.payment_broker),
            WorkerRegistry(chain, deployment.worker_registry),
        )
    except ContractRevert as exc:
        _fail(f"{action} refused: {describe_revert(exc, deployment)}")
    except InsufficientFundsForGas as exc:
        _fail(describe_insufficient_funds(action, exc, url if dev_chain else None))
    except ReceiptTimeout as exc:
        _fail(
            f"{action}: transaction {exc.tx_hash} was sent but not mined within "
            f"{exc.timeout_s:g}s; it may still be mined, so check `gpumarket wallet balance` "
            "before sending it again"
        )
    except ChainError as exc:
        _fail(f"{action}: {exc}")
    except (OSError, Web3Exception) as exc:
        first_line = (str(exc).splitlines() or [""])[0]
        _fail(f"{action}: the JSON-RPC at {url} failed ({type(exc).__name__}: {first_line})")


# --- error messages -----------------------------------------------------------------------


def describe_revert(exc: ContractRevert, deployment: Deployment | None = None) -> str:
    """A contract's custom error in words, with what to do about it."""
    args: tuple[Any, ...] = exc.error_args
    match exc.name:
        case "NotUnlocked":
            wait = f" ({format_duration(deployment.withdraw_delay_s)})" if deployment else ""
            return (
                "NotUnlocked: no unlock is pending; start the withdraw delay with "
                f"`gpumarket wallet unlock`, then wait for it{wait}"
            )
        case "StillLocked":
            return (
                f"StillLocked until {format_utc(int(args[0]))} (the withdraw delay after "
                "`gpumarket wallet unlock` is still running; do not unlock again, that "
                "restarts it)"
            )
        case "InsufficientDeposit":
            return (
                f"InsufficientDeposit: the deposit holds {wei_and_eth(int(args[0]))}, "
                f"{wei_and_eth(int(args[1]))} is needed"
            )
        case "OverCap":
            return (
                f"OverCap: the signer's cap is {wei_and_eth(int(args[0]))} and this would bring "
                f"its spending to {wei_and_eth(int(args[1]))} (the payer can raise the cap with "
                "`gpumarket wallet authorise SIGNER CAP`)"
            )
        case "InsufficientStake":
            return (
                f"InsufficientStake: active stake is {wei_and_eth(int(args[0]))}, "
                f"{wei_and_eth(int(args[1]))} was asked for"
            )
        case "StillUnbonding":
            return (
                f"StillUnbonding until {format_utc(int(args[0]))} (the unbonding delay after "
                "`gpumarket wallet unstake` is still running; another unstake restarts it)"
            )
        case "NothingToWithdraw":
            return (
                "NothingToWithdraw: no stake is unbonding (start with "
                "`gpumarket wallet unstake AMOUNT`, then wait the unbonding delay)"
            )
        case "UnauthorizedSigner":
            return (
                f"UnauthorizedSigner: the signature recovers to {args[0]}, which the payer has "
                "not authorised (a wrong signer, or a voucher signed for another chain or broker)"
            )
        case "VoucherExpired":
            return f"VoucherExpired at {format_utc(int(args[0]))}: ask for a fresh voucher"
        case "NotIncreasing":
            return (
                f"NotIncreasing: {wei_and_eth(int(args[0]))} is already redeemed for this payer "
                f"and payee, and the voucher's cumulative {wei_and_eth(int(args[1]))} is not "
                "more (a replay, or an older voucher)"
            )
        case "InvalidSignature":
            return "InvalidSignature: not a valid 65-byte signature (r, s, v with low s)"
        case "ZeroAmount":
            return "ZeroAmount: the amount must be more than 0"
        case "TransferFailed":
            return "TransferFailed: the recipient did not accept the ETH"
        case _:
            return str(exc)


def describe_insufficient_funds(
    action: str, exc: InsufficientFundsForGas, dev_rpc_url: str | None = None
) -> str:
    """The shortfall and, on the dev chain at ``dev_rpc_url``, the command that covers it."""
    from contracts.anvil import fund_command

    short = max(exc.needed_wei - exc.balance_wei, 0)
    text = (
        f"{action}: account {exc.address} holds {wei_and_eth(exc.balance_wei)} but this "
        f"transaction needs {wei_and_eth(exc.needed_wei)} for gas plus value; send it at "
        f"least {wei_and_eth(short)}"
    )
    if dev_rpc_url is not None:
        text += f" (on the dev chain: `{fund_command(exc.address, dev_rpc_url)}`)"
    return text


# --- options shared by every command --------------------------------------------------------

DeploymentOption = Annotated[
    Path,
    typer.Option("--deployment", help="Deployment file written by `gpumarket chain up`."),
]
RpcUrlOption = Annotated[
    str | None,
    typer.Option("--rpc-url", help="JSON-RPC URL (default: the deployment file's)."),
]
KeyFileOption = Annotated[
    Path | None,
    typer.Option(
        "--key-file",
        help=f"File holding the hex private key that signs, e.g. .gpumarket/worker.key "
        f"(else env {WALLET_KEY_ENV}, holding the key itself).",
    ),
]
DevAccountOption = Annotated[
    int | None,
    typer.Option("--dev-account", help="Sign with anvil's dev key N (dev chain 31337 only)."),
]
AmountArgument = Annotated[
    str, typer.Argument(help=f"Amount, {AMOUNT_EXAMPLES}.", show_default=False)
]


# --- PaymentBroker --------------------------------------------------------------------------


@wallet_app.command("balance")
def balance(
    address: Annotated[
        str | None, typer.Argument(help="Account to show (default: the signing key's).")
    ] = None,
    signer: Annotated[
        list[str] | None,
        typer.Option("--signer", help="Also show this signer's allowance (repeatable)."),
    ] = None,
    deployment: DeploymentOption = DEFAULT_DEPLOYMENT,
    rpc_url: RpcUrlOption = None,
    key_file: KeyFileOption = None,
    dev_account: DevAccountOption = None,
) -> None:
    """ETH balance, PaymentBroker deposit and unlock, WorkerRegistry stake and eligibility."""
    shown = _address_argument(address, "ADDRESS") if address else None
    signers = [_address_argument(value, "--signer") for value in signer or []]
    options = WalletOptions(deployment, rpc_url, key_file, dev_account)
    with _session(options, "balance", signing=shown is None) as wallet:
        address_shown = shown or wallet.address
        fields = _balance_fields(wallet, address_shown, signers)
    console = out_console()
    console.print(f"{address_shown} on chain {wallet.chain.chain_id}", markup=False)
    print_fields(console, fields)


def _balance_fields(wallet: _Wallet, address: str, signers: list[str]) -> list[tuple[str, str]]:
    """(what, value) lines: balances, deposit, allowances, stake and eligibility."""
    broker, registry, now = wallet.broker, wallet.registry, wallet.chain_now_s()
    fields: list[tuple[str, str]] = []
    fields.append(("ETH balance", wei_and_eth(wallet.chain.balance_wei(address))))
    fields.append(("broker deposit", wei_and_eth(broker.balance_of(address))))
    fields.append(("deposit unlockAt", _unlock_status(broker.unlock_at(address), now, wallet)))
    for signer in signers:
        allowance = broker.allowance(address, signer)
        fields.append(("signer", signer))
        fields.append(("  cap", wei_and_eth(allowance.cap_wei)))
        fields.append(("  spent", wei_and_eth(allowance.spent_wei)))
        fields.append(("  remaining", wei_and_eth(allowance.remaining_wei)))
    stake = registry.stake_of(address)
    unbonding = registry.unbonding_of(address)
    fields.append(("stake (active)", wei_and_eth(stake)))
    fields.append(("stake (unbonding)", wei_and_eth(unbonding.amount_wei)))
    if unbonding.amount_wei:
        fields.append(("  withdrawable", _when(unbonding.ready_at, now)))
    fields.append(("minimum stake", wei_and_eth(wallet.deployment.min_stake_wei)))
    fields.append(("eligible for jobs", _eligibility(wallet, address, stake, unbonding.amount_wei)))
    return fields


def _unlock_status(unlock_at: int, now: int, wallet: _Wallet) -> str:
    if unlock_at == 0:
        delay = format_duration(wallet.deployment.withdraw_delay_s)
        return f"none (locked; `gpumarket wallet unlock` starts the {delay} withdraw delay)"
    if unlock_at > now:
        return _when(unlock_at, now)
    return f"{format_utc(unlock_at)} (withdraw possible now)"


def _eligibility(wallet: _Wallet, address: str, stake_wei: int, unbonding_wei: int) -> str:
    if wallet.registry.is_eligible(address):
        return "yes"
    reasons = []
    if stake_wei < wallet.deployment.min_stake_wei:
        reasons.append("active stake below the minimum")
    if unbonding_wei:
        reasons.append("stake is unbonding")
    if wallet.registry.is_slashed(address):
        reasons.append("slashed")
    return "no (" + ", ".join(reasons or ["see the WorkerRegistry"]) + ")"


@wallet_app.command("deposit", context_settings=AMOUNT_CONTEXT)
def deposit(
    amount: AmountArgument,
    deployment: DeploymentOption = DEFAULT_DEPLOYMENT,
    rpc_url: RpcUrlOption = None,
    key_file: KeyFileOption = None,
    dev_account: DevAccountOption = None,
) -> None:
    """Add AMOUNT to your PaymentBroker deposit, which the vouchers you authorise draw on."""
    amount_wei = _amount_argument(amount, "AMOUNT", positive=True)
    options = WalletOptions(deployment, rpc_url, key_file, dev_account)
    with _session(options, "deposit") as wallet:
        result = wallet.broker.deposit(amount_wei)
        total = wallet.broker.balance_of(wallet.address)
    _say(f"deposited {wei_and_eth(amount_wei)}; deposit now {wei_and_eth(total)} {_tx(result)}")


@wallet_app.command("authorise", context_settings=AMOUNT_CONTEXT)
def authorise(
    signer: Annotated[str, typer.Argument(help="Address that signs vouchers on your behalf.")],
    cap: Annotated[
        str,
        typer.Argument(help=f"Total it may ever spend, {AMOUNT_EXAMPLES}; 0 revokes."),
    ],
    deployment: DeploymentOption = DEFAULT_DEPLOYMENT,
    rpc_url: RpcUrlOption = None,
    key_file: KeyFileOption = None,
    dev_account: DevAccountOption = None,
) -> None:
    """Let SIGNER (an orchestrator) spend up to CAP of your deposit in total.

    Replaces the cap and keeps what SIGNER already spent; CAP 0 revokes it."""
    signer_address = _address_argument(signer, "SIGNER")
    cap_wei = _amount_argument(cap, "CAP", positive=False)
    options = WalletOptions(deployment, rpc_url, key_file, dev_account)
    with _session(options, "authorise") as wallet:
        result = wallet.broker.authorize(signer_address, cap_wei)
        allowance = wallet.broker.allowance(wallet.address, signer_address)
    _say(
        f"authorised {signer_address}: cap {wei_and_eth(allowance.cap_wei)}, spent "
        f"{wei_and_eth(allowance.spent_wei)}, remaining {wei_and_eth(allowance.remaining_wei)} "
        f"{_tx(result)}"
    )


wallet_app.command("authorize", hidden=True, context_settings=AMOUNT_CONTEXT)(authorise)


@wallet_app.command("unlock")
def unlock(
    deployment: DeploymentOption = DEFAULT_DEPLOYMENT,
    rpc_url: RpcUrlOption = None,
    key_file: KeyFileOption = None,
    dev_account: DevAccountOption = None,
) -> None:
    """Start the withdraw delay; `withdraw` works once it has passed.

    Vouchers stay redeemable meanwhile. Unlocking again restarts the delay."""
    options = WalletOptions(deployment, rpc_url, key_file, dev_account)
    with _session(options, "unlock") as wallet:
        pending_before = wallet.broker.unlock_at(wallet.address)
        result = wallet.broker.unlock()
        unlock_at = wallet.broker.unlock_at(wallet.address)
        now = wallet.chain_now_s()
    restarted = " (this restarted the pending unlock)" if pending_before else ""
    _say(f"unlocked: withdraw possible from {_when(unlock_at, now)}{restarted} {_tx(result)}")


@wallet_app.command("withdraw", context_settings=AMOUNT_CONTEXT)
def withdraw(
    amount: AmountArgument,
    deployment: DeploymentOption = DEFAULT_DEPLOYMENT,
    rpc_url: RpcUrlOption = None,
    key_file: KeyFileOption = None,
    dev_account: DevAccountOption = None,
) -> None:
    """Take AMOUNT of your deposit back, once the delay after `unlock` has passed."""
    amount_wei = _amount_argument(amount, "AMOUNT", positive=True)
    options = WalletOptions(deployment, rpc_url, key_file, dev_account)
    with _session(options, "withdraw") as wallet:
        result = wallet.broker.withdraw(amount_wei)
        left = wallet.broker.balance_of(wallet.address)
    _say(
        f"withdrew {wei_and_eth(amount_wei)}; deposit now {wei_and_eth(left)}; another "
        f"withdrawal needs a new `gpumarket wallet unlock` {_tx(result)}"
    )


@wallet_app.command("redeem")
def redeem(
    voucher_file: Annotated[
        Path,
        typer.Argument(
            help='JSON: {"voucher": {payer, payee, cumulative_amount, expiry}, '
            '"signature": "0x..."}.',
        ),
    ],
    deployment: DeploymentOption = DEFAULT_DEPLOYMENT,
    rpc_url: RpcUrlOption = None,
    key_file: KeyFileOption = None,
    dev_account: DevAccountOption = None,
) -> None:
    """Pay a signed voucher to its payee, minus the broker's fee.

    The payee gets the increase over what that payer already paid it.
    Anyone may send it; the sender pays the gas."""
    voucher, signature = read_voucher_file(voucher_file)
    options = WalletOptions(deployment, rpc_url, key_file, dev_account)
    with _session(options, "redeem") as wallet:
        result = wallet.broker.redeem(voucher, signature)
    _say(
        f"redeemed {voucher.payer} -> {voucher.payee} (cumulative "
        f"{wei_and_eth(voucher.cumulative_amount)}): paid {wei_and_eth(result.paid_wei)} to "
        f"the payee, fee {wei_and_eth(result.fee_wei)} to "
        f"{wallet.deployment.fee_recipient} {_tx(result)}"
    )


def read_voucher_file(path: Path) -> tuple[Voucher, str]:
    """The voucher and its 0x-hex signature in ``path``; bad usage (exit 2) if unusable."""
    from pydantic import ValidationError

    from protocol.vouchers import SIGNATURE_BYTES, Voucher

    shape = '{"voucher": {"payer", "payee", "cumulative_amount", "expiry"}, "signature": "0x..."}'
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        _usage(f"voucher file {path} not found")
    except json.JSONDecodeError as exc:
        _usage(f"voucher file {path} is not JSON ({exc.msg} at line {exc.lineno})")
    except (OSError, UnicodeDecodeError) as exc:
        _usage(f"cannot read voucher file {path}: {exc}")
    if not isinstance(document, dict) or not {"voucher", "signature"} <= document.keys():
        _usage(f"voucher file {path} must hold {shape}")
    try:
        voucher = Voucher.model_validate(document["voucher"])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "voucher"
        _usage(f"voucher file {path}: voucher.{where}: {first['msg']}")
    signature = document["signature"]
    hex_digits = 2 * SIGNATURE_BYTES
    if not isinstance(signature, str) or not re.fullmatch(
        rf"(0x)?[0-9a-fA-F]{{{hex_digits}}}", signature
    ):
        _usage(f"voucher file {path}: signature must be {SIGNATURE_BYTES} bytes of 0x-hex")
    return voucher, signature


# --- WorkerRegistry -------------------------------------------------------------------------


@wallet_app.command("stake", context_settings=AMOUNT_CONTEXT)
def stake(
    amount: AmountArgument,
    deployment: DeploymentOption = DEFAULT_DEPLOYMENT,
    rpc_url: RpcUrlOption = None,
    key_file: KeyFileOption = None,
    dev_account: DevAccountOption = None,
) -> None:
    """Add AMOUNT to your active stake in the WorkerRegistry (workers stake to get jobs)."""
    amount_wei = _amount_argument(amount, "AMOUNT", positive=True)
    options = WalletOptions(deployment, rpc_url, key_file, dev_account)
    with _session(options, "stake") as wallet:
        result = wallet.registry.stake(amount_wei)
        active = wallet.registry.stake_of(wallet.address)
        eligible = wallet.registry.is_eligible(wallet.address)
    _say(
        f"staked {wei_and_eth(amount_wei)}; active stake now {wei_and_eth(active)} (minimum "
        f"{wei_and_eth(wallet.deployment.min_stake_wei)}); eligible for jobs: "
        f"{'yes' if eligible else 'no'} {_tx(result)}"
    )


@wallet_app.command("unstake", context_settings=AMOUNT_CONTEXT)
def unstake(
    amount: AmountArgument,
    deployment: DeploymentOption = DEFAULT_DEPLOYMENT,
    rpc_url: RpcUrlOption = None,
    key_file: KeyFileOption = None,
    dev_account: DevAccountOption = None,
) -> None:
    """Start unbonding AMOUNT of active stake; `withdraw-stake` takes it after the delay.

    WorkerRegistry.unbond: restarts the delay of any stake already unbonding."""
    amount_wei = _amount_argument(amount, "AMOUNT", positive=True)
    options = WalletOptions(deployment, rpc_url, key_file, dev_account)
    with _session(options, "unstake") as wallet:
        before = wallet.registry.unbonding_of(wallet.address)
        result = wallet.registry.unbond(amount_wei)
        unbonding = wallet.registry.unbonding_of(wallet.address)
        active = wallet.registry.stake_of(wallet.address)
        now = wallet.chain_now_s()
    restarted = " (the delay restarted for all of it)" if before.amount_wei else ""
    _say(
        f"unbonding {wei_and_eth(unbonding.amount_wei)}{restarted}; `gpumarket wallet "
        f"withdraw-stake` from {_when(unbonding.ready_at, now)}; active stake now "
        f"{wei_and_eth(active)} {_tx(result)}"
    )


@wallet_app.command("withdraw-stake")
def withdraw_stake(
    deployment: DeploymentOption = DEFAULT_DEPLOYMENT,
    rpc_url: RpcUrlOption = None,
    key_file: KeyFileOption = None,
    dev_account: DevAccountOption = None,
) -> None:
    """Take back all unbonded stake, once the delay after `unstake` has passed."""
    options = WalletOptions(deployment, rpc_url, key_file, dev_account)
    with _session(options, "withdraw-stake") as wallet:
        unbonding = wallet.registry.unbonding_of(wallet.address)
        result = wallet.registry.withdraw()
    _say(f"withdrew {wei_and_eth(unbonding.amount_wei)} of unbonded stake {_tx(result)}")


# --- the dev chain ----------------------------------------------------------------------------

DEFAULT_DEV_RPC_URL = "http://127.0.0.1:8545"
DEFAULT_FUND = "1eth"


def chain_fund(
    address: Annotated[str, typer.Argument(help="The account to fund, e.g. a new worker's.")],
    amount: Annotated[
        str, typer.Argument(help=f"Amount, {AMOUNT_EXAMPLES}.", show_default=True)
    ] = DEFAULT_FUND,
    rpc_url: Annotated[
        str | None,
        typer.Option(
            "--rpc-url",
            help=f"The dev chain's JSON-RPC URL (default: the deployment file's, else "
            f"{DEFAULT_DEV_RPC_URL}).",
        ),
    ] = None,
    deployment: Annotated[
        Path, typer.Option("--deployment", help="Deployment file naming the chain.")
    ] = DEFAULT_DEPLOYMENT,
) -> None:
    """Send ETH to ADDRESS from one of anvil's dev accounts (dev chain 31337 only), e.g. so a
    new worker key can pay its stake and gas."""
    from contracts.anvil import DEV_CHAIN_ID, DEV_FUND_FROM, DEV_PRIVATE_KEYS
    from contracts.chain import Chain, ChainError

    shown = _address_argument(address, "ADDRESS")
    amount_wei = _amount_argument(amount, "AMOUNT", positive=True)
    if rpc_url is not None:
        url = rpc_url
    elif deployment.exists():
        url = _load_deployment(deployment).rpc_url
    else:
        url = DEFAULT_DEV_RPC_URL
    try:
        chain = Chain.connect(url, DEV_PRIVATE_KEYS[DEV_FUND_FROM])
    except ChainError:
        _fail(
            f"no JSON-RPC answer from {url}: is the dev chain running? (`gpumarket up` or "
            "`gpumarket chain up`; --rpc-url picks another endpoint)"
        )
    if chain.chain_id != DEV_CHAIN_ID:
        _usage(
            f"{url} serves chain {chain.chain_id}, not the dev chain {DEV_CHAIN_ID}: "
            "fund accounts there from a wallet of your own"
        )
    try:
        result = chain.send_value(shown, amount_wei)
    except ChainError as exc:
        _fail(f"fund: {exc}")
    _say(
        f"sent {wei_and_eth(amount_wei)} to {shown}; it holds "
        f"{wei_and_eth(chain.balance_wei(shown))} {_tx(result)}"
    )
