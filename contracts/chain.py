"""The Chain seam: one JSON-RPC connection and, optionally, one local signing key.

Every transaction is built here, signed locally (the node never holds a key), sent raw and
waited for with a named timeout. Reverts come back as Python exceptions that name the
contract's custom error. The error tree:

    ChainError                    the RPC is unreachable, the chain is not the expected one, ...
    ├── ContractRevert            a call, a gas estimate or a mined transaction reverted;
    │                             .name ("OverCap"), .error_args (ABI order), .named_args (dict)
    ├── InsufficientFundsForGas   the sender cannot pay gas × max fee + value;
    │                             .address, .needed_wei, .balance_wei
    └── ReceiptTimeout            a sent transaction was not mined in time; .tx_hash, .timeout_s

Nonces: sends from one address are serialized by a lock shared by every Chain made with
``with_key`` from the same root, and take the larger of the node's pending count and the
last nonce this process used; a "nonce too low" answer (another process sent first) re-reads
the node and tries again, a bounded number of times. When this process counts past the node
and the node does not know the last transaction it sent (the chain rolled back under it),
the node's count wins.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress, HexStr
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from web3 import HTTPProvider, Web3
from web3.contract import Contract
from web3.exceptions import (
    BlockNotFound,
    ContractLogicError,
    TimeExhausted,
    TransactionNotFound,
    Web3Exception,
    Web3RPCError,
)
from web3.types import Nonce, RPCEndpoint, RPCResponse, TxParams, TxReceipt, Wei

from contracts.abi import Artifact, ErrorTable

RPC_TIMEOUT_S = 10.0
"""Limit on one JSON-RPC request (connect + read)."""
RECEIPT_TIMEOUT_S = 60.0
"""Limit on waiting for a sent transaction to be mined."""
RECEIPT_POLL_INTERVAL_S = 0.1
"""Pause between receipt polls; the first poll is immediate (anvil mines on send)."""
GAS_HEADROOM_PERCENT = 20
"""Gas limit = estimate × (100 + this) / 100: state may move between estimate and mining."""
BASE_FEE_MULTIPLIER = 2
"""Max fee per gas = base fee × this + tip: still valid after several full blocks."""
NONCE_RETRIES = 3
"""How often a send is retried after the node answers "nonce too low"."""
MIN_TX_GAS = 21_000
UNKNOWN_REVERT = "UnknownRevert"


class ChainError(RuntimeError):
    """Something about the chain itself: unreachable RPC, wrong chain id, missing code."""


class ChainUnavailable(ChainError):
    """The JSON-RPC endpoint did not answer (down, restarting, unreachable)."""


class _HTTPProvider(HTTPProvider):
    """web3's HTTP provider, with connection failures raised as ChainUnavailable, so that
    callers handle one exception type for "the chain is not there right now"."""

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        try:
            return super().make_request(method, params)
        except OSError as exc:  # requests' ConnectionError and timeouts are OSErrors
            raise ChainUnavailable(f"no JSON-RPC answer from {self.endpoint_uri}: {exc}") from exc

    def make_batch_request(
        self, requests: list[tuple[RPCEndpoint, Any]]
    ) -> list[RPCResponse] | RPCResponse:
        try:
            return super().make_batch_request(requests)
        except OSError as exc:
            raise ChainUnavailable(f"no JSON-RPC answer from {self.endpoint_uri}: {exc}") from exc


class ContractRevert(ChainError):
    """A contract reverted. ``name`` is the custom error ("NotIncreasing"), or "Error" for
    ``require(cond, "reason")``, "Panic" for assert/overflow, ``UNKNOWN_REVERT`` when the revert
    data matches nothing in the ABI (or there was none, e.g. out of gas).

    ``error_args`` holds the error's arguments in ABI order (int wei, checksummed addresses,
    bytes); ``named_args`` the same by parameter name. (``args`` is Exception's own attribute.)
    """

    def __init__(
        self,
        name: str,
        args: tuple[Any, ...] = (),
        *,
        named_args: Mapping[str, Any] | None = None,
        data: bytes = b"",
        tx_hash: str | None = None,
        detail: str = "",
    ) -> None:
        self.name = name
        self.error_args = tuple(args)
        self.named_args = dict(named_args or {})
        self.data = data
        self.tx_hash = tx_hash
        self.detail = detail
        if self.named_args and len(self.named_args) == len(self.error_args):
            shown = ", ".join(f"{key}={value!r}" for key, value in self.named_args.items())
        else:
            shown = ", ".join(repr(value) for value in self.error_args)
        text = f"{name}({shown})"
        if detail:
            text += f": {detail}"
        if tx_hash:
            text += f" [tx {tx_hash}]"
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickles as cls(*self.args); these keyword arguments would be lost.
        fields = (self.name, self.error_args, self.named_args, self.data, self.tx_hash)
        return (_rebuild_revert, (*fields, self.detail))


def _rebuild_revert(
    name: str,
    args: tuple[Any, ...],
    named_args: Mapping[str, Any],
    data: bytes,
    tx_hash: str | None,
    detail: str,
) -> ContractRevert:
    return ContractRevert(
        name, args, named_args=named_args, data=data, tx_hash=tx_hash, detail=detail
    )


class InsufficientFundsForGas(ChainError):
    """``address`` holds ``balance_wei`` but the transaction needs ``needed_wei``
    (gas limit × max fee per gas + value)."""

    def __init__(self, address: str, needed_wei: int, balance_wei: int, detail: str = "") -> None:
        self.address = address
        self.needed_wei = needed_wei
        self.balance_wei = balance_wei
        self.detail = detail
        text = (
            f"account {address} has {balance_wei} wei but this transaction needs {needed_wei} wei"
        )
        if detail:
            text += f" ({detail})"
        super().__init__(text + f"; send at least {needed_wei - balance_wei} wei to {address}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            self.__class__,
            (self.address, self.needed_wei, self.balance_wei, self.detail),
        )


class ReceiptTimeout(ChainError):
    """Transaction ``tx_hash`` was sent but had no receipt after ``timeout_s`` seconds. It may
    still be mined later: look it up before sending a replacement."""

    def __init__(self, tx_hash: str, timeout_s: float) -> None:
        self.tx_hash = tx_hash
        self.timeout_s = timeout_s
        super().__init__(f"transaction {tx_hash} not mined within {timeout_s}s")

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.tx_hash, self.timeout_s))


@dataclass(frozen=True)
class TxResult:
    """A mined, successful transaction. ``tx_hash`` is 0x-hex; ``gas_used`` in gas units."""

    tx_hash: str
    block: int
    gas_used: int

    @classmethod
    def from_receipt(cls, receipt: TxReceipt) -> TxResult:
        return cls(
            tx_hash=_hex(receipt["transactionHash"]),
            block=int(receipt["blockNumber"]),
            gas_used=int(receipt["gasUsed"]),
        )


@dataclass(frozen=True)
class BlockRef:
    """One block of the chain as read: its height and its 0x-hex hash."""

    number: int
    hash: str


@dataclass(frozen=True)
class SentTx:
    """A transaction accepted by the node, not yet mined. ``params`` replays it on failure."""

    tx_hash: str
    params: TxParams
    errors: ErrorTable


def _hex(value: bytes | str) -> str:
    return HexBytes(value).to_0x_hex()


def _revert_data(exc: ContractLogicError) -> bytes:
    data = exc.data
    if isinstance(data, Mapping):
        # Some nodes nest it: {"data": "0x..."}; take it when present.
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes(HexBytes(data))
        except ValueError:
            return b""
    return b""


def revert_from(
    exc: ContractLogicError, errors: ErrorTable, tx_hash: str | None = None
) -> ContractRevert:
    """The ContractRevert that web3's ``exc`` stands for, decoded through ``errors``."""
    raw = _revert_data(exc)
    decoded = errors.decode(raw) if raw else None
    if decoded is not None:
        return ContractRevert(
            decoded.name, decoded.values, named_args=decoded.named, data=raw, tx_hash=tx_hash
        )
    detail = exc.message or str(exc)
    if raw:
        detail = f"{detail} (undecoded revert data {_hex(raw)})"
    return ContractRevert(UNKNOWN_REVERT, (), data=raw, tx_hash=tx_hash, detail=detail)


def _is_insufficient_funds(exc: Web3RPCError) -> bool:
    return "insufficient funds" in str(exc.message).lower()


def _is_nonce_too_low(exc: Web3RPCError) -> bool:
    message = str(exc.message).lower()
    return "nonce too low" in message or "nonce is too low" in message


class _NonceBook:
    """Per-address send locks, the next nonce this process would use and the hash of the
    last transaction it sent (to tell a lagging node from one that lost the transaction)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._next: dict[str, int] = {}
        self._last_tx: dict[str, str] = {}

    def lock(self, address: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(address, threading.Lock())

    def choose(self, address: str, node_pending: int) -> int:
        return max(node_pending, self._next.get(address, 0))

    def ahead_of(self, address: str, node_pending: int) -> str | None:
        """The last sent transaction's hash when this book counts past the node."""
        return self._last_tx.get(address) if self._next.get(address, 0) > node_pending else None

    def used(self, address: str, nonce: int, tx_hash: str) -> None:
        self._next[address] = nonce + 1
        self._last_tx[address] = tx_hash

    def forget(self, address: str) -> None:
        self._next.pop(address, None)
        self._last_tx.pop(address, None)


class Chain:
    """A web3 connection plus, optionally, the local key that signs this process's sends.

    Read-only use needs no key. ``with_key`` gives a Chain for another key on the same
    connection (and the same nonce book).
    """

    def __init__(
        self,
        w3: Web3,
        account: LocalAccount | None = None,
        *,
        receipt_timeout_s: float = RECEIPT_TIMEOUT_S,
        receipt_poll_interval_s: float = RECEIPT_POLL_INTERVAL_S,
        _nonces: _NonceBook | None = None,
    ) -> None:
        self.w3 = w3
        self._account = account
        self.receipt_timeout_s = receipt_timeout_s
        self.receipt_poll_interval_s = receipt_poll_interval_s
        self._nonces = _nonces or _NonceBook()

    @classmethod
    def connect(
        cls,
        rpc_url: str,
        private_key: str | bytes | None = None,
        *,
        rpc_timeout_s: float = RPC_TIMEOUT_S,
        receipt_timeout_s: float = RECEIPT_TIMEOUT_S,
    ) -> Chain:
        """Connect to an HTTP JSON-RPC endpoint; ChainError if it does not answer."""
        w3 = Web3(_HTTPProvider(rpc_url, request_kwargs={"timeout": rpc_timeout_s}))
        account = Account.from_key(private_key) if private_key is not None else None
        chain = cls(w3, account, receipt_timeout_s=receipt_timeout_s)
        try:
            _ = chain.chain_id
        except (OSError, Web3Exception) as exc:
            raise ChainError(f"no JSON-RPC answer from {rpc_url}: {exc}") from exc
        return chain

    def with_key(self, private_key: str | bytes) -> Chain:
        """The same connection and nonce book, signing with ``private_key``."""
        chain = Chain(
            self.w3,
            Account.from_key(private_key),
            receipt_timeout_s=self.receipt_timeout_s,
            receipt_poll_interval_s=self.receipt_poll_interval_s,
            _nonces=self._nonces,
        )
        if "chain_id" in self.__dict__:
            chain.__dict__["chain_id"] = self.__dict__["chain_id"]
        return chain

    # --- reads -------------------------------------------------------------------------

    @property
    def account(self) -> LocalAccount:
        if self._account is None:
            raise ChainError("this Chain has no signing key; use Chain.with_key(...)")
        return self._account

    @property
    def address(self) -> ChecksumAddress:
        return self.account.address

    @cached_property
    def chain_id(self) -> int:
        return int(self.w3.eth.chain_id)

    @property
    def rpc_url(self) -> str | None:
        endpoint = getattr(self.w3.provider, "endpoint_uri", None)
        return str(endpoint) if endpoint else None

    def block_number(self) -> int:
        return int(self.w3.eth.block_number)

    def head(self) -> BlockRef:
        """The newest block: its number and hash."""
        block = self.w3.eth.get_block("latest")
        return BlockRef(int(block["number"]), _hex(block["hash"]))

    def block_hash(self, number: int) -> str | None:
        """The 0x-hex hash of block ``number`` on the chain as it is now; None when the chain
        has no such block (yet, or any more: it rolled back below it)."""
        try:
            block = self.w3.eth.get_block(number)
        except BlockNotFound:
            return None
        return _hex(block["hash"])

    def balance_wei(self, address: str) -> int:
        return int(self.w3.eth.get_balance(to_checksum_address(address)))

    def code_at(self, address: str) -> bytes:
        return bytes(self.w3.eth.get_code(to_checksum_address(address)))

    def contract(self, address: str, abi: list[dict[str, Any]]) -> Contract:
        return self.w3.eth.contract(address=to_checksum_address(address), abi=abi)

    def call(self, contract: Contract, function: str, *args: Any) -> Any:
        """eth_call of a view (or a dry run of a write); reverts raise ContractRevert."""
        try:
            return contract.functions[function](*args).call()
        except ContractLogicError as exc:
            raise revert_from(exc, ErrorTable.from_abi(contract.abi)) from exc

    # --- writes ------------------------------------------------------------------------

    def transact(
        self, contract: Contract, function: str, *args: Any, value_wei: int = 0
    ) -> TxReceipt:
        """Call ``function(*args)`` in a transaction and wait for it to be mined."""
        data = contract.encode_abi(function, args=list(args))
        errors = ErrorTable.from_abi(contract.abi)
        return self.wait(self.send(contract.address, data, errors, value_wei=value_wei))

    def send_value(self, to: str, value_wei: int) -> TxResult:
        """Send ``value_wei`` to ``to`` (a plain transfer) and wait for it to be mined."""
        sent = self.send(to, HexStr("0x"), ErrorTable.from_abi(), value_wei=value_wei)
        return TxResult.from_receipt(self.wait(sent))

    def deploy(self, artifact: Artifact, *constructor_args: Any) -> SentTx:
        """Send the creation transaction of ``artifact``; ``wait`` gives the receipt, whose
        ``contractAddress`` is the new contract."""
        factory = self.w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
        data = factory.constructor(*constructor_args).data_in_transaction
        return self.send(None, data, artifact.errors)

    def send(
        self, to: str | None, data: HexStr, errors: ErrorTable, *, value_wei: int = 0
    ) -> SentTx:
        """Estimate, check funds, sign locally and send; returns once the node accepted it.

        ``to`` None creates a contract. Raises ContractRevert if the estimate reverts,
        InsufficientFundsForGas if the sender cannot pay gas × max fee + ``value_wei``.
        """
        if value_wei < 0:
            raise ValueError("value_wei must be >= 0")
        sender = self.address
        params: TxParams = {"from": sender, "data": data, "value": Wei(value_wei)}
        if to is not None:
            params["to"] = to_checksum_address(to)
        max_fee, tip = self._fees()
        gas = self._estimate_gas(params, errors, max_fee)
        needed_wei = gas * max_fee + value_wei
        balance_wei = self.balance_wei(sender)
        if balance_wei < needed_wei:
            raise InsufficientFundsForGas(
                sender,
                needed_wei,
                balance_wei,
                f"gas limit {gas} × max fee {max_fee} wei/gas + value {value_wei} wei",
            )
        params.update(
            {
                "gas": gas,
                "maxFeePerGas": Wei(max_fee),
                "maxPriorityFeePerGas": Wei(tip),
                "chainId": self.chain_id,
            }
        )
        tx_hash = self._sign_and_send(params, needed_wei)
        return SentTx(tx_hash=tx_hash, params=params, errors=errors)

    def wait(self, sent: SentTx) -> TxReceipt:
        """The receipt of ``sent``, within ``receipt_timeout_s``; a failed transaction raises
        ContractRevert (decoded by replaying it on the state before its block)."""
        try:
            receipt = self.w3.eth.wait_for_transaction_receipt(
                HexBytes(sent.tx_hash),
                timeout=self.receipt_timeout_s,
                poll_latency=self.receipt_poll_interval_s,
            )
        except TimeExhausted as exc:
            # The tx may be stuck behind a gap; the next send should ask the node afresh.
            self._nonces.forget(str(sent.params["from"]))
            raise ReceiptTimeout(sent.tx_hash, self.receipt_timeout_s) from exc
        if receipt["status"] != 1:
            raise self._explain_failure(sent, receipt)
        return receipt

    # --- internals ---------------------------------------------------------------------

    def _fees(self) -> tuple[int, int]:
        """(max fee per gas, priority fee per gas) in wei, EIP-1559."""
        block = self.w3.eth.get_block("latest")
        base_fee = int(block.get("baseFeePerGas", 0) or 0)
        tip = int(self.w3.eth.max_priority_fee)
        return base_fee * BASE_FEE_MULTIPLIER + tip, tip

    def _estimate_gas(self, params: TxParams, errors: ErrorTable, max_fee: int) -> int:
        try:
            estimate = int(self.w3.eth.estimate_gas(params))
        except ContractLogicError as exc:
            raise revert_from(exc, errors) from exc
        except Web3RPCError as exc:
            if _is_insufficient_funds(exc):
                sender = str(params["from"])
                value = int(params.get("value", 0))
                raise InsufficientFundsForGas(
                    sender,
                    MIN_TX_GAS * max_fee + value,
                    self.balance_wei(sender),
                    f"at least: value {value} wei + gas; the node refused to estimate",
                ) from exc
            raise
        return estimate * (100 + GAS_HEADROOM_PERCENT) // 100

    def _sign_and_send(self, params: TxParams, needed_wei: int) -> str:
        sender = str(params["from"])
        with self._nonces.lock(sender):
            for attempt in range(NONCE_RETRIES + 1):
                pending = int(self.w3.eth.get_transaction_count(self.address, "pending"))
                last_tx = self._nonces.ahead_of(sender, pending)
                if last_tx is not None and not self._node_has(last_tx):
                    # Neither mined nor queued: the chain rolled back under it (or the node
                    # restarted); counting past the node would leave a gap nothing fills.
                    self._nonces.forget(sender)
                params["nonce"] = Nonce(self._nonces.choose(sender, pending))
                unsigned = {key: value for key, value in params.items() if key != "from"}
                signed = self.account.sign_transaction(cast(dict[str, Any], unsigned))
                try:
                    tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
                except Web3RPCError as exc:
                    if _is_insufficient_funds(exc):
                        raise InsufficientFundsForGas(
                            sender, needed_wei, self.balance_wei(sender), str(exc.message)
                        ) from exc
                    self._nonces.forget(sender)
                    if _is_nonce_too_low(exc) and attempt < NONCE_RETRIES:
                        continue
                    raise
                self._nonces.used(sender, int(params["nonce"]), _hex(tx_hash))
                return _hex(tx_hash)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _node_has(self, tx_hash: str) -> bool:
        """Whether the node knows the transaction, mined or waiting in its pool."""
        try:
            self.w3.eth.get_transaction(HexStr(tx_hash))
        except TransactionNotFound:
            return False
        return True

    def _explain_failure(self, sent: SentTx, receipt: TxReceipt) -> ContractRevert:
        """Re-run a failed transaction as an eth_call to read its revert data: first on the
        state after its block (covers a transaction earlier in the same block that changed
        what this one saw), then on the state before it."""
        kept = ("from", "to", "data", "value", "gas")
        replay = cast(TxParams, {k: v for k, v in sent.params.items() if k in kept})
        block = int(receipt["blockNumber"])
        for at_block in (block, max(block - 1, 0)):
            try:
                self.w3.eth.call(replay, block_identifier=at_block)
            except ContractLogicError as exc:
                return revert_from(exc, sent.errors, tx_hash=sent.tx_hash)
        return ContractRevert(
            UNKNOWN_REVERT,
            tx_hash=sent.tx_hash,
            detail=f"failed on-chain (gas used {int(receipt['gasUsed'])} of "
            f"{sent.params.get('gas')}); replaying it did not revert (out of gas?)",
        )
