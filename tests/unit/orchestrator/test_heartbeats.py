"""Cheap heartbeats: liveness noted in memory and written once per sweep; session tokens
answered from a short cache that forgets a worker's session when it changes."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from orchestrator.exceptions import Unauthorized
from orchestrator.store.models import Worker
from orchestrator.wiring import Services
from tests.conftest import FakeClock
from tests.support import register


def _stored_last_seen(services: Services, worker_id: str) -> float:
    with services.store.read() as s:
        value = s.scalar(select(Worker.last_seen_at).where(Worker.id == worker_id))
        assert value is not None
        return value


def test_a_jobless_heartbeat_is_written_at_the_next_flush(
    services: Services, clock: FakeClock
) -> None:
    worker = register(services)
    registered_at = clock()
    clock.advance(20)
    services.workers.heartbeat(worker.principal, [], clock())
    assert _stored_last_seen(services, worker.id) == registered_at  # not written yet
    [view] = services.workers.list(clock())
    assert view.last_seen_at.timestamp() == clock()  # but already seen
    assert services.workers.flush_seen() == 1
    assert _stored_last_seen(services, worker.id) == clock()
    assert services.workers.flush_seen() == 0  # nothing new since


def test_the_flush_keeps_a_worker_online_past_the_lease_ttl(
    services: Services, clock: FakeClock
) -> None:
    worker = register(services)
    for _ in range(5):  # 5 x 20 s, well past the 30 s TTL, alive all along
        clock.advance(20)
        services.workers.heartbeat(worker.principal, [], clock())
        services.workers.flush_seen()
    assert services.workers.stats(clock()).workers_online == 1
    clock.advance(31)
    assert services.workers.stats(clock()).workers_online == 0


def test_a_session_is_forgotten_when_the_worker_registers_again_or_leaves(
    services: Services,
) -> None:
    worker = register(services)
    assert services.auth.worker(worker.token) == worker.principal  # checked, now cached
    assert services.auth.cached(worker.token) == worker.principal
    services.workers.deregister(worker.principal, services.now())
    assert services.auth.cached(worker.token) is None
    with pytest.raises(Unauthorized):
        services.auth.worker(worker.token)
