"""Credentials: API keys for clients, session tokens for workers, one token for the operator.

Only sha256 hashes of tokens are stored; a leaked database does not leak credentials.
A token that checked out is remembered for ``TOKEN_CACHE_S`` seconds, so a busy client or a
heartbeating worker does not cost a database read per request. Replacing or revoking a
worker's session here forgets it at once; a key disabled in the database (or a session
replaced through another replica) stops working within ``TOKEN_CACHE_S``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select

from orchestrator.exceptions import Forbidden, Unauthorized
from orchestrator.store import Store
from orchestrator.store.models import Client, Worker

TOKEN_CACHE_S = 60.0  # past the heartbeat interval, so a heartbeating worker never misses
TOKEN_CACHE_MAX = 100_000  # entries; past it the cache starts over (a flood of fake tokens)
CLIENT_KEY_PREFIX = "gmk_"
WORKER_TOKEN_PREFIX = "gmw_"


@dataclass(frozen=True)
class Principal:
    kind: Literal["client", "worker", "operator"]
    id: str

    @property
    def grant(self) -> str:
        return f"{self.kind}:{self.id}"


def new_id() -> str:
    return uuid.uuid4().hex


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def create_client(store: Store, name: str, now: float) -> tuple[str, str]:
    """Make a client account; returns (client id, API key). The key is shown only once."""
    key = new_token(CLIENT_KEY_PREFIX)
    client_id = new_id()
    with store.transaction() as s:
        s.add(Client(id=client_id, name=name, api_key_hash=token_hash(key), created_at=now))
    return client_id, key


class Authenticator:
    def __init__(self, store: Store, operator_token: str) -> None:
        self._store = store
        self._operator_hash = token_hash(operator_token)
        # token hash -> (principal, monotonic time it was checked)
        self._known: dict[str, tuple[Principal, float]] = {}
        self._worker_digest: dict[str, str] = {}  # worker id -> its cached session's hash

    def _cached(self, digest: str) -> Principal | None:
        hit = self._known.get(digest)
        if hit is None or time.monotonic() - hit[1] > TOKEN_CACHE_S:
            return None
        return hit[0]

    def _remember(self, digest: str, principal: Principal) -> Principal:
        if len(self._known) >= TOKEN_CACHE_MAX:
            self._known.clear()
            self._worker_digest.clear()
        self._known[digest] = (principal, time.monotonic())
        if principal.kind == "worker":
            self._worker_digest[principal.id] = digest
        return principal

    def forget_worker(self, worker_id: str) -> None:
        """Drop a worker's cached session (it registered again, or deregistered)."""
        digest = self._worker_digest.pop(worker_id, None)
        if digest is not None:
            self._known.pop(digest, None)

    def cached(self, token: str) -> Principal | None:
        """The principal of a recently checked client or worker token, without I/O."""
        return self._cached(token_hash(token))

    def create_client(self, name: str, now: float) -> tuple[str, str]:
        return create_client(self._store, name, now)

    def client(self, token: str) -> Principal:
        if not token.startswith(CLIENT_KEY_PREFIX):
            raise Unauthorized("expected a client API key (gmk_...) as the bearer token")
        digest = token_hash(token)
        if (known := self._cached(digest)) is not None:
            return known
        with self._store.read() as s:
            row = s.scalar(select(Client).where(Client.api_key_hash == digest))
        if row is None:
            raise Unauthorized("unknown API key; ask the operator for one")
        if row.disabled:
            raise Forbidden("this API key is disabled")
        return self._remember(digest, Principal("client", row.id))

    def worker(self, token: str) -> Principal:
        if not token.startswith(WORKER_TOKEN_PREFIX):
            raise Unauthorized("expected a worker session token (gmw_...); register first")
        digest = token_hash(token)
        if (known := self._cached(digest)) is not None:
            return known
        with self._store.read() as s:
            row = s.scalar(select(Worker).where(Worker.session_token_hash == digest))
        if row is None:
            raise Unauthorized("unknown or replaced session token; register again")
        return self._remember(digest, Principal("worker", row.id))

    def operator(self, token: str) -> Principal:
        if not hmac.compare_digest(token_hash(token), self._operator_hash):
            raise Unauthorized("operator endpoints need the operator token (GPUMARKET_ADMIN_TOKEN)")
        return Principal("operator", "operator")

    def any(self, token: str) -> Principal:
        """Client or worker, told apart by the token's prefix (for the shared blob routes)."""
        if token.startswith(WORKER_TOKEN_PREFIX):
            return self.worker(token)
        return self.client(token)
