"""Redemptions: the orchestrator's copy of the chain's Redeemed events, kept equal to the chain
even when the chain rolls back or reorganises.

The chain is the record; the ``redemptions`` rows are a copy that budgets, ``/metrics``, the
dashboard and ``/v1/settlement`` read. ``reconcile`` reads the Redeemed events of this
orchestrator's signer from where it stopped (``chain_cursors``) to the head, and remembers the
head's hash with the cursor. Each round it first checks that the chain still has that block: a
chain that rolled back (anvil restarted from an older state file, ``evm_revert``) or reorganised
has another block there, or none. Then it walks the rows' own block hashes down to the newest
one the chain still has (blocks hash their parents, so everything below it is the same chain),
drops every row above it, and reads the events from there again. Everything a round changes,
rows and cursor, is one store transaction: a crash leaves the previous round's copy, and
running a round again reads the same events into the same rows.

A row is ``confirmed`` once ``confirmations`` blocks were mined on top of its block; only
confirmed rows count as paid. Unconfirmed ones are kept and checked like the others, so a
short reorg moves nothing that was counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from contracts.chain import BlockRef, Chain
from contracts.events import EventReader, Redeemed
from orchestrator.store import Store
from orchestrator.store.models import ChainCursor, Redemption

log = logging.getLogger("gpumarket.orchestrator.redemptions")

REDEMPTIONS_CURSOR = "broker.redeemed"
ROLLBACK_PROBE_BLOCKS = 64
"""After a rollback, how many of the rows' newest blocks are asked for their hash (one RPC
each) in search of one the chain still has; past that, every event is read again from the
deployment block, which is always right and only slower."""

Pair = tuple[str, str]
"""(payer, payee), checksummed addresses."""


@dataclass(frozen=True)
class PairTotals:
    """Redemptions of one (payer, payee): how many, and their wei. ``cumulative_wei`` is the
    highest voucher total redeemed; ``paid_wei + fee_wei`` is what the payer's deposit lost."""

    count: int = 0
    paid_wei: int = 0
    fee_wei: int = 0
    cumulative_wei: int = 0

    def plus(self, cumulative_wei: int, paid_wei: int, fee_wei: int) -> PairTotals:
        return PairTotals(
            count=self.count + 1,
            paid_wei=self.paid_wei + paid_wei,
            fee_wei=self.fee_wei + fee_wei,
            cumulative_wei=max(self.cumulative_wei, cumulative_wei),
        )


def row_totals(s: Session, *, confirmed_only: bool) -> dict[Pair, PairTotals]:
    """The redemption rows summed per pair (exact ints: summed in Python)."""
    query = select(
        Redemption.payer,
        Redemption.payee,
        Redemption.cumulative_wei,
        Redemption.paid_wei,
        Redemption.fee_wei,
    )
    if confirmed_only:
        query = query.where(Redemption.confirmed.is_(True))
    totals: dict[Pair, PairTotals] = {}
    for payer, payee, cumulative, paid, fee in s.execute(query):
        pair = (payer, payee)
        totals[pair] = totals.get(pair, PairTotals()).plus(cumulative, paid, fee)
    return totals


def event_totals(events: Iterable[Redeemed]) -> dict[Pair, PairTotals]:
    totals: dict[Pair, PairTotals] = {}
    for e in events:
        pair = (e.payer, e.payee)
        totals[pair] = totals.get(pair, PairTotals()).plus(
            e.cumulative_amount_wei, e.paid_wei, e.fee_wei
        )
    return totals


@dataclass(frozen=True)
class RedemptionAudit:
    """Every redemption row against the chain's Redeemed events (this signer's), through
    block ``through_block`` (where the last reconcile stopped; None: nothing read yet).
    ``problems``: one line per disagreement, empty when the rows are the chain's events."""

    through_block: int | None
    rows: dict[Pair, PairTotals]
    unconfirmed: dict[Pair, int]
    chain: dict[Pair, PairTotals]
    problems: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _Scan:
    """What one reconcile round read: the first block read, and the events from there."""

    start: int
    events: list[Redeemed]
    rolled_back_from: int | None  # the cursor's block, when the chain no longer has it


class RedemptionBook:
    """Keeps ``redemptions`` equal to the chain's Redeemed events signed by ``signer``."""

    def __init__(
        self,
        store: Store,
        chain: Chain,
        events: EventReader,
        *,
        signer: str,
        deployed_at_block: int,
        confirmations: int,
    ) -> None:
        if confirmations < 0:
            raise ValueError("confirmations must be >= 0")
        self._store = store
        self._chain = chain
        self._events = events
        self._signer = signer
        self._deployed_at = deployed_at_block
        self.confirmations = confirmations

    def reconcile(self) -> int:
        """One round: detect a rollback, read new events, confirm rows; returns how many rows
        were new (a row dropped by a rollback and read again is not new)."""
        with self._store.transaction() as s:
            cursor = self._locked_cursor(s)
            # The head is read under the cursor's lock: a replica that moved the cursor meanwhile
            # read an older head than this, so a head below the cursor means a rollback.
            head = self._chain.head()
            scan = self._scan(s, cursor, head)
            if scan is None:
                return 0  # the head changed under the scan: the next round reads it again
            dropped = self._drop_from(s, scan.start)
            confirmed_through = head.number - self.confirmations
            new = 0
            for event in scan.events:
                s.add(_row(event, confirmed=event.block_number <= confirmed_through))
                if event.key not in dropped:
                    new += 1
            s.execute(
                update(Redemption)
                .where(Redemption.confirmed.is_(False))
                .where(Redemption.block_number <= confirmed_through)
                .values(confirmed=True)
            )
            cursor.next_block = head.number + 1
            cursor.block_hash = head.hash
            if scan.rolled_back_from is not None or dropped:
                gone = len(dropped.keys() - {e.key for e in scan.events})
                log.warning(
                    "the chain rolled back or reorganised below block %d: re-read Redeemed "
                    "events from block %d; %d redemption rows no longer on chain were dropped",
                    scan.rolled_back_from if scan.rolled_back_from is not None else head.number,
                    scan.start,
                    gone,
                )
        return new

    def audit(self) -> RedemptionAudit:
        """Rows against the chain's events through the cursor's block (reads the chain from
        the deployment block: an operator's check, not a hot path)."""
        with self._store.read() as s:
            cursor = s.get(ChainCursor, REDEMPTIONS_CURSOR)
            rows = list(s.scalars(select(Redemption)))
            kept = (cursor.next_block - 1, cursor.block_hash) if cursor else (None, None)
        through, through_hash = kept
        problems: list[str] = []
        events: list[Redeemed] = []
        if through is not None and through_hash is not None:
            now_hash = self._chain.block_hash(through)
            if now_hash != through_hash:
                problems.append(
                    f"the chain no longer has block {through} as last read (hash "
                    f"{through_hash}, now {now_hash or 'no such block'}): it rolled back or "
                    "reorganised; the next reconcile re-reads the events"
                )
            events = self._read(self._deployed_at, through)
        row_keys = {(r.tx_hash, r.log_index): r for r in rows}
        chain_keys = {e.key: e for e in events}
        for key in sorted(row_keys.keys() - chain_keys.keys()):
            r = row_keys[key]
            problems.append(
                f"redemption row {key[0]} log {key[1]} (block {r.block_number}) is not on chain"
            )
        for key in sorted(chain_keys.keys() - row_keys.keys()):
            e = chain_keys[key]
            problems.append(
                f"Redeemed event {key[0]} log {key[1]} (block {e.block_number}) has no row"
            )
        for key in sorted(row_keys.keys() & chain_keys.keys()):
            r, e = row_keys[key], chain_keys[key]
            if r.block_hash != e.block_hash:
                problems.append(
                    f"redemption row {key[0]} log {key[1]} was read from block {r.block_hash}, "
                    f"the chain has it in block {e.block_hash}"
                )
        unconfirmed: dict[Pair, int] = {}
        for r in rows:
            if not r.confirmed:
                unconfirmed[(r.payer, r.payee)] = unconfirmed.get((r.payer, r.payee), 0) + 1
        by_pair = _totals_of_rows(rows)
        on_chain = event_totals(events)
        for pair in sorted(by_pair.keys() | on_chain.keys()):
            mine, theirs = by_pair.get(pair, PairTotals()), on_chain.get(pair, PairTotals())
            if mine != theirs:
                problems.append(
                    f"{pair[0]} -> {pair[1]}: {mine.count} rows paying {mine.paid_wei} wei "
                    f"(fee {mine.fee_wei}), the chain has {theirs.count} events paying "
                    f"{theirs.paid_wei} wei (fee {theirs.fee_wei})"
                )
        return RedemptionAudit(
            through_block=through,
            rows=by_pair,
            unconfirmed=unconfirmed,
            chain=on_chain,
            problems=problems,
        )

    # -- internals ----------------------------------------------------------------------------

    def _locked_cursor(self, s: Session) -> ChainCursor:
        """The cursor row, made if missing without racing another replica, then locked."""
        insert = pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
        s.execute(
            insert(ChainCursor)
            .values(name=REDEMPTIONS_CURSOR, next_block=self._deployed_at, block_hash=None)
            .on_conflict_do_nothing()
        )
        cursor = s.get(
            ChainCursor, REDEMPTIONS_CURSOR, with_for_update=True, populate_existing=True
        )
        assert cursor is not None
        return cursor

    def _scan(self, s: Session, cursor: ChainCursor, head: BlockRef) -> _Scan | None:
        """Where to read from and the events from there to ``head``; None when the chain's
        block at ``head.number`` changed while reading (read again next round)."""
        start, rolled_back_from = self._resume_block(s, cursor, head)
        events = self._read(start, head.number)
        if self._chain.block_hash(head.number) != head.hash:
            return None
        return _Scan(start, events, rolled_back_from)

    def _resume_block(
        self, s: Session, cursor: ChainCursor, head: BlockRef
    ) -> tuple[int, int | None]:
        """(first block to read, the cursor's block if the chain no longer has it)."""
        if cursor.block_hash is None:
            return self._deployed_at, None  # nothing read yet (or read by a schema before 0005)
        top = cursor.next_block - 1
        if top == head.number and cursor.block_hash == head.hash:
            return cursor.next_block, None
        if top < head.number and self._chain.block_hash(top) == cursor.block_hash:
            return cursor.next_block, None
        return self._last_trusted_block(s, min(top, head.number)) + 1, top

    def _last_trusted_block(self, s: Session, at_most: int) -> int:
        """The newest row block (<= ``at_most``) whose hash the chain still has; below the
        deployment block when none is (found among the newest ``ROLLBACK_PROBE_BLOCKS``)."""
        blocks = s.execute(
            select(Redemption.block_number, Redemption.block_hash)
            .where(Redemption.block_number <= at_most)
            .distinct()
            .order_by(Redemption.block_number.desc())
            .limit(ROLLBACK_PROBE_BLOCKS)
        ).all()
        for number, block_hash in blocks:
            if self._chain.block_hash(number) == block_hash:
                return int(number)
        return self._deployed_at - 1

    def _read(self, start: int, end: int) -> list[Redeemed]:
        if start > end:
            return []
        return [e for e in self._events.read(Redeemed, start, end) if e.signer == self._signer]

    def _drop_from(self, s: Session, start: int) -> dict[tuple[str, int], str]:
        """Delete the rows of blocks >= ``start``; returns their keys (-> block hash)."""
        doomed = {
            (tx, index): block_hash
            for tx, index, block_hash in s.execute(
                select(Redemption.tx_hash, Redemption.log_index, Redemption.block_hash).where(
                    Redemption.block_number >= start
                )
            )
        }
        if doomed:
            s.execute(delete(Redemption).where(Redemption.block_number >= start))
        return doomed


def _row(event: Redeemed, *, confirmed: bool) -> Redemption:
    return Redemption(
        tx_hash=event.tx_hash,
        log_index=event.log_index,
        payer=event.payer,
        payee=event.payee,
        cumulative_wei=event.cumulative_amount_wei,
        paid_wei=event.paid_wei,
        fee_wei=event.fee_wei,
        block_number=event.block_number,
        block_hash=event.block_hash,
        confirmed=confirmed,
    )


def _totals_of_rows(rows: Iterable[Redemption]) -> dict[Pair, PairTotals]:
    totals: dict[Pair, PairTotals] = {}
    for r in rows:
        pair = (r.payer, r.payee)
        totals[pair] = totals.get(pair, PairTotals()).plus(r.cumulative_wei, r.paid_wei, r.fee_wei)
    return totals
