"""A scripted worker for the benchmarks: the real worker protocol over HTTP, without a model.

It registers with a signed EIP-191 challenge, holds a lease long-poll open with its free
slots, and for each job it receives calls ``start`` and then ``complete`` at once with a
no-op result signed the way a real worker signs (EIP-712 over job id, attempt and the
output's sha256). So the orchestrator does all its real work (dispatch, leases, state
changes, signature recovery) while the worker side costs next to nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount

from protocol.signing import output_sha256, sign_registration, sign_result

MODEL = "all-MiniLM-L6-v2"
PRICE_WEI_PER_UNIT = 1000
NOOP_OUTPUT: dict[str, Any] = {"embeddings": [[1.0]]}
NOOP_DURATION_S = 0.001
LEASE_WAIT_S = 10.0
HTTP_TIMEOUT = httpx.Timeout(LEASE_WAIT_S + 10.0, connect=5.0)


def registration_body(
    account: LocalAccount, nonce: str, message: str, max_concurrency: int
) -> dict[str, Any]:
    """The JSON body of ``POST /v1/workers/register`` for a CPU worker offering MiniLM."""
    return {
        "address": account.address,
        "nonce": nonce,
        "signature": sign_registration(account.key, message),
        "hardware": {"cpu_model": "bench", "cpu_cores": 1, "ram_mb": 1024},
        "offers": [
            {
                "job_type": "inference",
                "model": MODEL,
                "precision": "fp32",
                "price_wei_per_unit": str(PRICE_WEI_PER_UNIT),
            }
        ],
        "max_concurrency": max_concurrency,
    }


async def register(http: httpx.AsyncClient, account: LocalAccount, max_concurrency: int = 1) -> str:
    """Register ``account`` as a worker; returns its session token."""
    response = await http.post("/v1/workers/challenge", json={"address": account.address})
    response.raise_for_status()
    challenge = response.json()
    body = registration_body(account, challenge["nonce"], challenge["message"], max_concurrency)
    response = await http.post("/v1/workers/register", json=body)
    response.raise_for_status()
    return str(response.json()["session_token"])


class ScriptedWorker:
    """One no-op worker with ``slots`` free slots. ``on_lease(job_id)`` is called the moment
    a job arrives in a lease answer (before ``start``)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        slots: int,
        on_lease: Callable[[str], None] = lambda job_id: None,
    ) -> None:
        self.http = http
        self.slots = slots
        self.on_lease = on_lease
        self.account: LocalAccount = Account.create()
        self.completed = 0
        self._token: str | None = None
        self._running: set[asyncio.Task[None]] = set()

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    async def register(self) -> None:
        self._token = await register(self.http, self.account, self.slots)

    async def run(self, stop: asyncio.Event) -> None:
        """Lease and finish jobs until ``stop`` is set (an open long-poll is abandoned)."""
        while not stop.is_set():
            free = self.slots - len(self._running)
            if free <= 0:
                await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                continue
            poll = asyncio.create_task(self._lease(free))
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({poll, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not poll.done():
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll
                break
            for job in poll.result():
                self.on_lease(job["job_id"])
                task = asyncio.create_task(self._finish(job))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        if self._running:
            await asyncio.wait(self._running)

    async def _lease(self, free: int) -> list[dict[str, Any]]:
        response = await self.http.post(
            "/v1/workers/lease",
            json={"max_jobs": free, "wait_s": LEASE_WAIT_S},
            headers=self._auth,
        )
        response.raise_for_status()
        jobs: list[dict[str, Any]] = response.json()["jobs"]
        return jobs

    async def _finish(self, job: dict[str, Any]) -> None:
        job_id, attempt = job["job_id"], job["attempt"]
        items = len(job["input"]["texts"])
        # No /start call: the lease marked the job running.
        output = {"embeddings": NOOP_OUTPUT["embeddings"] * items}
        digest = output_sha256(output)
        body = {
            "attempt": attempt,
            "output": output,
            "output_sha256": digest,
            "signature": sign_result(
                self.account.key, job_id, attempt, digest, items, int(job["price_wei_per_unit"])
            ),
            "duration_s": NOOP_DURATION_S,
            "energy_j": 0.0,
            "energy_source": "estimate",
            "units": items,
        }
        response = await self.http.post(
            f"/v1/workers/jobs/{job_id}/complete", json=body, headers=self._auth
        )
        response.raise_for_status()
        self.completed += 1
