"""A full blob disk answers 507 ``insufficient_storage``, never 500, wherever the write fails,
leaves no partial file behind, and uploads work again once space frees.

The kernel's ENOSPC is simulated here (any machine, no root); tests/faults/test_blob_disk_full.py
fills a real tmpfs in front of the real orchestrator process.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from typing import IO, Any

import pytest

from tests.api.conftest import Api, RunApi, assert_problem
from tests.api.test_blobs_api import VIDEO, chunks, stored_files


def _no_space(*_: Any, **__: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


class _FullFile:
    """A file on a full disk: opening works, writing does not."""

    def __init__(self, real: IO[Any]) -> None:
        self._real = real

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *_: object) -> None:
        self._real.close()

    write = staticmethod(_no_space)


@pytest.mark.parametrize("fails_at", ["write", "create"])
def test_full_disk_is_507_then_uploads_work_again(
    run_api: RunApi, monkeypatch: pytest.MonkeyPatch, fails_at: str
) -> None:
    real_fdopen = os.fdopen

    async def body(api: Api) -> None:
        client = await api.new_client()
        with monkeypatch.context() as full:
            if fails_at == "write":
                full.setattr(os, "fdopen", lambda fd, *a, **k: _FullFile(real_fdopen(fd, *a, **k)))
            else:  # the temporary file itself cannot be made
                full.setattr(tempfile, "mkstemp", _no_space)
            resp = await api.http.post("/v1/blobs", content=chunks(VIDEO), headers=client)
            assert_problem(resp, 507, "insufficient_storage", "disk is full")
        assert stored_files(api) == []  # no partial blob, no temporary file left

        resp = await api.http.post("/v1/blobs", content=chunks(VIDEO), headers=client)
        assert resp.status_code == 201, resp.text
        assert resp.json()["sha256"] == hashlib.sha256(VIDEO).hexdigest()

    run_api(body)
