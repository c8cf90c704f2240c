"""Content-addressed blob store (sha256). The ``BlobStore`` seam; a local folder by default.

Uploads stream to a temporary file while hashing, and are renamed into place only when
complete, so a crash or a too-large upload never leaves a half blob under a real name.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from orchestrator.exceptions import InsufficientStorage, InvalidInput, PayloadTooLarge

# No space left, or the blob folder's owner is over its disk quota: 507 either way.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
STORE_ID_FILE = ".store-id"


class BlobStore(Protocol):
    async def put(
        self, chunks: AsyncIterator[bytes], max_bytes: int, expected_sha256: str | None = None
    ) -> tuple[str, int]: ...

    def path(self, sha256: str) -> Path: ...

    def exists(self, sha256: str) -> bool: ...


class LocalBlobStore:
    """Blobs as files under ``root/ab/abcdef...``; sizes in bytes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def identity(self) -> str:
        """This store's id, made once in the folder: replicas that see the same id share it."""
        marker = self.root / STORE_ID_FILE
        try:
            return marker.read_text().strip()
        except FileNotFoundError:
            pass
        fd, tmp = tempfile.mkstemp(dir=self._tmp)
        with os.fdopen(fd, "w") as out:
            out.write(uuid.uuid4().hex + "\n")
        try:
            os.link(tmp, marker)  # the first replica to get here makes the id; others read it
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        return marker.read_text().strip()

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    async def put(
        self, chunks: AsyncIterator[bytes], max_bytes: int, expected_sha256: str | None = None
    ) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        tmp: Path | None = None
        try:
            # Inside the try: on a full disk even making the empty temporary file can fail.
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
            tmp = Path(tmp_name)
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLarge(
                            f"blob is larger than the limit of {max_bytes} bytes",
                            limit_bytes=max_bytes,
                        )
                    digest.update(chunk)
                    out.write(chunk)
            sha256 = digest.hexdigest()
            if expected_sha256 is not None and expected_sha256 != sha256:
                raise InvalidInput(
                    f"upload's sha256 is {sha256}, not the {expected_sha256} you declared; "
                    "the upload was damaged or the declared hash is wrong"
                )
            final = self.path(sha256)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            return sha256, size
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise InsufficientStorage(
                    "the orchestrator's blob disk is full; try later"
                ) from exc
            raise
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
