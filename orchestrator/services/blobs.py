"""Blob access: uploads (streamed, size-limited) and who may read what."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.blobs import BlobStore
from orchestrator.exceptions import NotFound, PayloadTooLarge
from orchestrator.services.auth import Principal
from orchestrator.store import Store
from orchestrator.store.models import Blob, BlobGrant, Job
from protocol.jobs import LEASED_STATES


class BlobService:
    def __init__(self, store: Store, blobs: BlobStore, max_bytes: int) -> None:
        self._store = store
        self._blobs = blobs
        self.max_bytes = max_bytes

    async def upload(
        self,
        principal: Principal,
        chunks: AsyncIterator[bytes],
        now: float,
        content_length: int | None = None,
        expected_sha256: str | None = None,
    ) -> tuple[str, int]:
        """Store a blob and grant ``principal`` read access; returns (sha256, size in bytes)."""
        if content_length is not None and content_length > self.max_bytes:
            raise PayloadTooLarge(
                f"blob of {content_length} bytes is larger than the limit of {self.max_bytes}",
                limit_bytes=self.max_bytes,
            )
        sha256, size = await self._blobs.put(chunks, self.max_bytes, expected_sha256)
        await run_in_threadpool(self._record, principal, sha256, size, now)
        return sha256, size

    def _record(self, principal: Principal, sha256: str, size: int, now: float) -> None:
        with self._store.transaction() as s:
            if s.get(Blob, sha256) is None:
                s.add(Blob(sha256=sha256, size=size, created_at=now))
                s.flush()
            if s.get(BlobGrant, (sha256, principal.grant)) is None:
                s.add(BlobGrant(sha256=sha256, principal=principal.grant))

    def readable_path(self, principal: Principal, sha256: str) -> tuple[Path, int]:
        """The file behind a blob ``principal`` may read, and its size; else NotFound."""
        with self._store.read() as s:
            blob = s.get(Blob, sha256)
            allowed = blob is not None and (
                s.get(BlobGrant, (sha256, principal.grant)) is not None
                or (principal.kind == "worker" and self._leased_input(s, principal, sha256))
            )
        if not allowed or blob is None or not self._blobs.exists(sha256):
            raise NotFound(f"no blob {sha256} among the blobs you may read")
        return self._blobs.path(sha256), blob.size

    @staticmethod
    def _leased_input(s: Session, worker: Principal, sha256: str) -> bool:
        """Workers may read the input of a job they hold a lease on."""
        return (
            s.scalar(
                select(Job.id).where(
                    Job.input_blob == sha256,
                    Job.worker_id == worker.id,
                    Job.state.in_([st.value for st in LEASED_STATES]),
                )
            )
            is not None
        )
