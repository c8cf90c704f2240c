"""Typed readers for PaymentBroker and WorkerRegistry events.

Each record carries ``block_number``, ``block_hash``, ``tx_hash`` and ``log_index``:
``(tx_hash, log_index)`` (``record.key``) names one log for good, so a ledger that stores it can
reconcile with the chain any number of times without counting a payment twice; ``block_hash``
says which chain the log was read from, so a ledger can tell when the chain it read has since
rolled back or reorganised. Amounts are int wei, instants unix seconds.

Reads go through eth_getLogs in pages of ``page_blocks`` blocks; a page the node refuses
(too many results, range too wide) is halved and retried, down to one block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from eth_abi import decode as abi_decode
from eth_utils import event_abi_to_log_topic, to_checksum_address
from hexbytes import HexBytes
from web3.exceptions import Web3RPCError
from web3.types import FilterParams, LogReceipt, TxReceipt

from contracts.chain import Chain

DEFAULT_PAGE_BLOCKS = 2_000
"""Blocks per eth_getLogs request; public RPCs commonly refuse wider ranges."""


@dataclass(frozen=True)
class EventRecord:
    """Where a log sits on the chain. ``block_hash`` and ``tx_hash`` are 0x-hex; ``contract``
    is checksummed."""

    EVENT: ClassVar[str] = ""

    block_number: int
    block_hash: str
    tx_hash: str
    log_index: int
    contract: str

    @property
    def key(self) -> tuple[str, int]:
        """(tx_hash, log_index): unique per log, stable across re-reads of the chain."""
        return (self.tx_hash, self.log_index)


# --- PaymentBroker ---------------------------------------------------------------------


@dataclass(frozen=True)
class Deposited(EventRecord):
    EVENT: ClassVar[str] = "Deposited"
    payer: str
    amount_wei: int


@dataclass(frozen=True)
class Authorized(EventRecord):
    EVENT: ClassVar[str] = "Authorized"
    payer: str
    signer: str
    cap_wei: int


@dataclass(frozen=True)
class UnlockRequested(EventRecord):
    """``unlock_at``: unix seconds from which the payer may withdraw."""

    EVENT: ClassVar[str] = "UnlockRequested"
    payer: str
    unlock_at: int


@dataclass(frozen=True)
class Relocked(EventRecord):
    EVENT: ClassVar[str] = "Relocked"
    payer: str


@dataclass(frozen=True)
class DepositWithdrawn(EventRecord):
    """PaymentBroker's ``Withdrawn``: a payer took ``amount_wei`` of its deposit back."""

    EVENT: ClassVar[str] = "Withdrawn"
    payer: str
    amount_wei: int


@dataclass(frozen=True)
class Redeemed(EventRecord):
    """A voucher paid ``paid_wei`` to the payee and ``fee_wei`` to the fee recipient; the
    payer's deposit fell by their sum, the delta over the previous cumulative amount."""

    EVENT: ClassVar[str] = "Redeemed"
    payer: str
    payee: str
    signer: str
    cumulative_amount_wei: int
    paid_wei: int
    fee_wei: int

    @property
    def delta_wei(self) -> int:
        return self.paid_wei + self.fee_wei


# --- WorkerRegistry --------------------------------------------------------------------


@dataclass(frozen=True)
class Staked(EventRecord):
    EVENT: ClassVar[str] = "Staked"
    worker: str
    amount_wei: int
    total_wei: int


@dataclass(frozen=True)
class UnbondingStarted(EventRecord):
    """``amount_wei`` is this call's amount, not the pending total; ``ready_at`` unix s."""

    EVENT: ClassVar[str] = "UnbondingStarted"
    worker: str
    amount_wei: int
    ready_at: int


@dataclass(frozen=True)
class StakeWithdrawn(EventRecord):
    """WorkerRegistry's ``Withdrawn``: a worker took its unbonded stake."""

    EVENT: ClassVar[str] = "Withdrawn"
    worker: str
    amount_wei: int


@dataclass(frozen=True)
class Slashed(EventRecord):
    """``amount_wei`` actually taken (capped at the worker's stake); ``evidence_hash`` 32 bytes."""

    EVENT: ClassVar[str] = "Slashed"
    worker: str
    amount_wei: int
    evidence_hash: bytes


BROKER_EVENTS: tuple[type[EventRecord], ...] = (
    Deposited,
    Authorized,
    UnlockRequested,
    Relocked,
    DepositWithdrawn,
    Redeemed,
)
REGISTRY_EVENTS: tuple[type[EventRecord], ...] = (
    Staked,
    UnbondingStarted,
    StakeWithdrawn,
    Slashed,
)

R = TypeVar("R", bound=EventRecord)


def _normalize(abi_type: str, value: Any) -> Any:
    if abi_type == "address":
        return to_checksum_address(value)
    return value


def _record_fields(record: type[EventRecord]) -> tuple[str, ...]:
    return tuple(name for name in record.__dataclass_fields__ if name not in _LOCATION)


_LOCATION = frozenset(EventRecord.__dataclass_fields__)


@dataclass(frozen=True)
class _EventSpec:
    """How one event's log maps onto its record: the record's own fields follow the
    Solidity declaration order of the event's arguments."""

    record: type[EventRecord]
    topic: bytes
    declared: tuple[str, ...]  # argument names, declaration order
    indexed: tuple[tuple[str, str], ...]  # (name, type), topic order
    unindexed: tuple[tuple[str, str], ...]  # (name, type), data order

    @classmethod
    def build(cls, record: type[EventRecord], abi: Iterable[Mapping[str, Any]]) -> _EventSpec:
        matches = [e for e in abi if e.get("type") == "event" and e.get("name") == record.EVENT]
        if len(matches) != 1:
            raise ValueError(f"the ABI has {len(matches)} events named {record.EVENT}, not one")
        event_abi = matches[0]
        inputs = event_abi["inputs"]
        if len(inputs) != len(_record_fields(record)):
            raise ValueError(
                f"{record.EVENT} has {len(inputs)} arguments in the ABI but "
                f"{record.__name__} has {len(_record_fields(record))} fields"
            )
        return cls(
            record=record,
            topic=bytes(event_abi_to_log_topic(dict(event_abi))),  # type: ignore[arg-type]
            declared=tuple(i["name"] for i in inputs),
            indexed=tuple((i["name"], i["type"]) for i in inputs if i.get("indexed")),
            unindexed=tuple((i["name"], i["type"]) for i in inputs if not i.get("indexed")),
        )

    def decode(self, log: LogReceipt) -> EventRecord:
        values: dict[str, Any] = {}
        topics = [bytes(topic) for topic in log["topics"][1:]]
        for (name, abi_type), topic in zip(self.indexed, topics, strict=True):
            values[name] = _normalize(abi_type, abi_decode([abi_type], topic)[0])
        data = abi_decode([abi_type for _, abi_type in self.unindexed], bytes(log["data"]))
        for (name, abi_type), value in zip(self.unindexed, data, strict=True):
            values[name] = _normalize(abi_type, value)
        fields = zip(_record_fields(self.record), self.declared, strict=True)
        return self.record(
            block_number=int(log["blockNumber"]),
            block_hash=HexBytes(log["blockHash"]).to_0x_hex(),
            tx_hash=HexBytes(log["transactionHash"]).to_0x_hex(),
            log_index=int(log["logIndex"]),
            contract=to_checksum_address(log["address"]),
            **{field: values[name] for field, name in fields},
        )


class EventReader:
    """Reads one contract's events as typed records, oldest first."""

    def __init__(
        self,
        chain: Chain,
        address: str,
        abi: Iterable[Mapping[str, Any]],
        records: Sequence[type[EventRecord]],
        *,
        page_blocks: int = DEFAULT_PAGE_BLOCKS,
    ) -> None:
        if page_blocks < 1:
            raise ValueError("page_blocks must be >= 1")
        self.chain = chain
        self.address = to_checksum_address(address)
        self.page_blocks = page_blocks
        abi = list(abi)
        self._specs = {spec.topic: spec for spec in (_EventSpec.build(r, abi) for r in records)}
        self._by_record = {spec.record: spec for spec in self._specs.values()}

    def read(
        self,
        record: type[R],
        from_block: int,
        to_block: int | None = None,
        **indexed: str,
    ) -> Iterator[R]:
        """``record`` events in [from_block, to_block] (to_block None: the current head at
        the call), optionally filtered on indexed addresses, e.g. ``payee=...``."""
        spec = self._by_record[record]
        names = [name for name, _ in spec.indexed]
        unknown = set(indexed) - set(names)
        if unknown:
            raise ValueError(f"{record.EVENT} has no indexed argument {sorted(unknown)}")
        topics: list[Any] = [HexBytes(spec.topic).to_0x_hex()]
        for name in names:
            wanted = indexed.get(name)
            topics.append(None if wanted is None else _address_topic(wanted))
        while topics and topics[-1] is None:
            topics.pop()
        for log in self._logs(topics, from_block, to_block):
            decoded = spec.decode(log)
            assert isinstance(decoded, record)
            yield decoded

    def read_all(self, from_block: int, to_block: int | None = None) -> Iterator[EventRecord]:
        """Every known event of the contract in [from_block, to_block], in chain order."""
        topic0 = [HexBytes(topic).to_0x_hex() for topic in self._specs]
        for log in self._logs([topic0], from_block, to_block):
            yield self._specs[bytes(log["topics"][0])].decode(log)

    def from_receipt(self, receipt: TxReceipt, record: type[R]) -> list[R]:
        """``record`` events this contract emitted in the transaction of ``receipt``."""
        spec = self._by_record[record]
        found: list[R] = []
        for log in receipt["logs"]:
            if to_checksum_address(log["address"]) != self.address or not log["topics"]:
                continue
            if bytes(log["topics"][0]) == spec.topic:
                decoded = spec.decode(log)
                assert isinstance(decoded, record)
                found.append(decoded)
        return found

    def _logs(self, topics: list[Any], from_block: int, to_block: int | None) -> Iterator[Any]:
        last = self.chain.block_number() if to_block is None else to_block
        start, page = max(from_block, 0), self.page_blocks
        while start <= last:
            end = min(start + page - 1, last)
            params: FilterParams = {
                "address": self.address,
                "fromBlock": start,
                "toBlock": end,
                "topics": topics,
            }
            try:
                logs = self.chain.w3.eth.get_logs(params)
            except Web3RPCError:
                if end == start:
                    raise
                page = max(1, (end - start + 1) // 2)
                continue
            for log in logs:
                if not log.get("removed", False):
                    yield log
            start = end + 1


def _address_topic(address: str) -> str:
    return "0x" + "00" * 12 + to_checksum_address(address)[2:].lower()


def broker_events(
    chain: Chain,
    broker_address: str,
    abi: Iterable[Mapping[str, Any]],
    *,
    page_blocks: int = DEFAULT_PAGE_BLOCKS,
) -> EventReader:
    return EventReader(chain, broker_address, abi, BROKER_EVENTS, page_blocks=page_blocks)


def registry_events(
    chain: Chain,
    registry_address: str,
    abi: Iterable[Mapping[str, Any]],
    *,
    page_blocks: int = DEFAULT_PAGE_BLOCKS,
) -> EventReader:
    return EventReader(chain, registry_address, abi, REGISTRY_EVENTS, page_blocks=page_blocks)
