"""Stake refresh with many registered workers: batched (now) against one call each (before).

    python -m bench.stake_refresh [--workers N]

A fresh anvil with the contracts and an orchestrator store (SQLite) holding N registered,
unstaked workers. Three timings, each the best of ``ROUNDS``:

- **per worker**: what ``refresh_stakes`` did before: one ``isEligible`` eth_call and one
  store transaction per worker;
- **full re-read**: the refresh now, every worker due: one registry event scan, JSON-RPC
  batches of 500 ``isEligible`` reads, one transaction;
- **nothing changed**: the refresh the sweeper runs every reconcile interval between full
  re-reads: the event scan only.

The sweeper does this in the same loop as reconciliation, so its time is how late redemptions
reach ``/v1/settlement`` (and ``available_wei``).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from eth_account import Account

from contracts.anvil import DEV_PRIVATE_KEYS, Anvil
from contracts.chain import Chain
from contracts.deploy import deploy, write_deployment
from orchestrator.config import Settings
from orchestrator.services.workers import REGISTERED
from orchestrator.store import Store
from orchestrator.store.models import Worker
from orchestrator.wiring import Services, build_services

DEFAULT_WORKERS = 2_000
ROUNDS = 3
STAKE_CHECK_INTERVAL_S = 60.0


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _fill(services: Services, workers: int, now: float) -> None:
    """``workers`` registered, unstaked worker rows, as registration leaves them."""
    with services.store.transaction() as s:
        for _ in range(workers):
            s.add(
                Worker(
                    id=Account.create().address[2:34].lower(),
                    address=Account.create().address,
                    hardware={},
                    offers=[],
                    max_concurrency=1,
                    status=REGISTERED,
                    registered_at=now,
                    last_seen_at=now,
                    stake_eligible=False,
                    stake_checked_at=now,
                )
            )


def _per_worker(services: Services, now: float) -> None:
    """The refresh as it was: a chain call and a transaction per worker."""
    with services.store.read() as s:
        rows = list(s.execute(Worker.__table__.select()).all())
    for row in rows:
        staked = services.payments.is_eligible(row.address)
        with services.store.transaction() as s:
            worker = s.get(Worker, row.id, with_for_update=True)
            assert worker is not None
            worker.stake_eligible = staked
            worker.stake_checked_at = now


def _best(run: Callable[[], object]) -> float:
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(workers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="gpumarket-bench-stakes-") as tmp, Anvil() as anvil:
        root = Path(tmp)
        chain = Chain.connect(anvil.url, DEV_PRIVATE_KEYS[0])
        deployment = deploy(chain, min_stake_wei=10**17, withdraw_delay_s=3600)
        write_deployment(deployment, root / "deployment.json")
        settings = Settings(
            data_dir=root / "data",
            admin_token="bench-operator-token-0123456789abcdef0123",
            deployment_file=root / "deployment.json",
            stake_check_interval_s=STAKE_CHECK_INTERVAL_S,
        )
        store = Store(settings.database_url)
        store.migrate()
        clock = _Clock(float(chain.w3.eth.get_block("latest")["timestamp"]))
        services = build_services(settings, store=store, clock=clock, rng=random.Random(1))
        _fill(services, workers, clock.now)
        services.workers.refresh_stakes(clock.now)  # the first event scan

        def full() -> None:
            clock.now += STAKE_CHECK_INTERVAL_S + 1  # every worker due
            assert services.workers.refresh_stakes(clock.now) == workers

        figures = {
            "per_worker_s": _best(lambda: _per_worker(services, clock.now)),
            "full_reread_s": _best(full),
            "nothing_changed_s": _best(lambda: services.workers.refresh_stakes(clock.now)),
        }
        store.dispose()
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    args = parser.parse_args()
    figures = measure(args.workers)
    base = figures["per_worker_s"]
    print(f"stake refresh, {args.workers} registered workers (best of {ROUNDS}):")
    for name, seconds in figures.items():
        print(f"  {name:<18} {seconds:8.3f} s   {base / seconds:8.1f}x faster than per worker")


if __name__ == "__main__":
    main()
