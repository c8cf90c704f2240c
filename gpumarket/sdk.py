"""Python SDK for job submitters: ``Client`` (sync) and ``AsyncClient`` (asyncio), one surface.

    with Client("http://127.0.0.1:8000", api_key="gmk_...") as client:
        job = client.submit({"type": "inference", "model": "all-MiniLM-L6-v2",
                             "input": {"texts": ["hello"]}, "max_price_wei_per_unit": "1000"})
        result = client.wait(job["id"], timeout_s=60)
        items = client.submit_many([spec_1, spec_2, ...])       # one request, one transaction
        results = client.wait_many([i["job"]["id"] for i in items])  # long-polls over them all

    async with AsyncClient("http://127.0.0.1:8000", api_key="gmk_...") as client:
        job = await client.submit(spec)
        result = await client.wait(job["id"], timeout_s=60)
        async for job in client.list(state="running"):
            ...

Amounts of wei are decimal strings on the wire, times are seconds. Both clients take an httpx
transport (``httpx.MockTransport``, ``httpx.ASGITransport`` for the app in-process). Errors:
see ``gpumarket.exceptions``.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import inspect
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from gpumarket import _calls
from gpumarket._calls import FINAL_STATES, Call
from gpumarket.exceptions import GpumarketAPIError, JobFailed, JobTimeout

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_WAIT_TIMEOUT_S",
    "FINAL_STATES",
    "AsyncClient",
    "Client",
    "GpumarketAPIError",
    "JobFailed",
    "JobTimeout",
]

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
"""Per HTTP request: 30 s to read, 5 s to connect."""
DEFAULT_WAIT_TIMEOUT_S = 300.0
WAIT_POLL_S = 0.2
UPLOAD_CHUNK_BYTES = 1 << 20

Progress = Callable[[dict[str, Any]], object]
"""Called by ``wait`` with the job (as ``get`` returns it) after every poll."""
Messages = list[dict[str, str]]
"""Chat messages: ``[{"role": "user", "content": "..."}]``."""
Stops = list[str]
AsyncProgress = Callable[[dict[str, Any]], Awaitable[object] | object]


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


def _partial(dest: Path) -> Path:
    """Where a download is written before it is renamed to ``dest``: no half files."""
    return dest.with_name(f".{dest.name}.part")


class Client:
    """The REST API for job submitters, synchronous (httpx.Client)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call, **kwargs: Any) -> Any:
        response = self._http.request(
            call.method,
            call.path,
            params=call.params,
            json=call.json,
            headers=call.headers,
            **kwargs,
        )
        return _calls.read(response)

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a job (see ``protocol.jobs.JobSpec``); a repeated idempotency key returns the
        job it first made. Prices in wei per unit."""
        job: dict[str, Any] = self._send(_calls.submit(spec, idempotency_key))
        return job

    def get(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._send(_calls.get_job(job_id))
        return job

    def result(self, job_id: str) -> dict[str, Any]:
        """The signed result of a succeeded job (cost in wei, duration s, energy J)."""
        result: dict[str, Any] = self._send(_calls.get_result(job_id))
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._send(_calls.cancel(job_id))
        return job

    def list(self, state: str | None = None, limit: int = 50) -> Iterator[dict[str, Any]]:
        """Every job of this client, newest first, ``limit`` per page, following pages."""
        cursor: str | None = None
        while True:
            page = self._send(_calls.list_page(state, limit, cursor))
            yield from page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def wait(
        self,
        job_id: str,
        timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
        *,
        on_progress: Progress | None = None,
        poll_s: float = WAIT_POLL_S,
    ) -> dict[str, Any]:
        """Wait until the job is final; returns its result. Raises JobFailed (failed,
        cancelled, expired) or JobTimeout after ``timeout_s`` seconds. The orchestrator holds
        each request until the job's state changes (a long-poll), so ``on_progress`` sees every
        state; ``poll_s`` is the pause between requests should one come back unchanged."""
        waiting = _calls.Waiting(job_id, timeout_s, poll_s)
        outage = _calls.Outage(waiting.deadline)
        job: dict[str, Any] = self._send_riding(outage, lambda: _calls.get_job(job_id))
        while True:
            if on_progress is not None:
                on_progress(job)
            if waiting.succeeded(job):
                result: dict[str, Any] = self._send_riding(
                    outage, lambda: _calls.get_result(job_id)
                )
                return result
            poll = functools.partial(waiting.long_poll, job, self._http.timeout.read)
            changed: dict[str, Any] = self._send_riding(outage, poll)
            if changed["state"] == job["state"]:
                time.sleep(waiting.pause_s())
            job = changed

    def _send_riding(self, outage: _calls.Outage, call: Callable[[], Call]) -> Any:
        """``_send`` of a repeatable read (``call`` builds it anew for each try), riding out
        an orchestrator that is away for a while (``_calls.Outage``)."""
        while True:
            try:
                answer = self._send(call())
            except (httpx.TransportError, GpumarketAPIError) as exc:
                time.sleep(outage.pause_after(exc))
                continue
            outage.over()
            return answer

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        stop: Stops | None = None,
        max_price_wei_per_unit: int | str,
        preference: str | None = None,
        timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Generate text with an LLM (a ``prompt``, or chat ``messages``); returns the result:
        ``output.text``, ``output.usage`` (tokens), ``cost_wei`` (wei, per token priced)."""
        spec = _calls.generate_spec(
            model,
            prompt=prompt,
            messages=messages,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            stop=stop,
            max_price_wei_per_unit=max_price_wei_per_unit,
            preference=preference,
        )
        return self.wait(self.submit(spec)["id"], timeout_s)

    def stream(self, job_id: str) -> Iterator[str]:
        """A generate job's text, piece by piece as its worker produces it; ends when the job
        is final (then ``result(job_id)`` has what was billed). Raises JobFailed if it failed."""
        call = _calls.stream_job(job_id)
        with self._http.stream(call.method, call.path, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                _calls.check(response)
            for line in response.iter_lines():
                event = _calls.stream_event(line)
                if event is None:
                    continue
                if event.get("done"):
                    if event["job"]["state"] != "succeeded":
                        raise JobFailed(event["job"])
                    return
                yield str(event.get("text", ""))

    def submit_many(self, specs: builtins.list[dict[str, Any]]) -> builtins.list[dict[str, Any]]:
        """Submit many jobs, ``SUBMIT_BATCH_MAX`` per request (one transaction each). Returns,
        in order, one item per spec: ``{"job", "created", "error"}``; an item's ``error``
        (status, code, detail) refuses that job alone. Give each spec an ``idempotency_key``
        to make a retry of the whole call safe."""
        items: builtins.list[dict[str, Any]] = []
        for chunk in _calls.chunks(specs, _calls.SUBMIT_BATCH_MAX):
            items.extend(self._send(_calls.submit_batch(chunk))["jobs"])
        return items

    def wait_many(
        self, job_ids: builtins.list[str], timeout_s: float = DEFAULT_WAIT_TIMEOUT_S
    ) -> builtins.list[dict[str, Any]]:
        """Wait until every job is final, with long-polls over many jobs at once (not one
        per job). Returns, in the order given, each succeeded job's signed result (as
        ``result`` returns it) and each other job's final view (``state`` failed, cancelled or
        expired). JobTimeout if some are not final within ``timeout_s`` seconds."""
        waiting = _calls.WaitingMany(job_ids, timeout_s)
        outage = _calls.Outage(waiting.deadline)
        read_s = self._http.timeout.read
        while not waiting.done:
            waiting.take(self._send_riding(outage, lambda: waiting.next_call(read_s)))
        return waiting.in_order()

    def wait_any(
        self, job_ids: builtins.list[str], wait_s: float = _calls.LONG_POLL_S
    ) -> dict[str, Any]:
        """One long-poll over many jobs (at most ``WAIT_BATCH_MAX``), answered as soon as any
        is final or after ``wait_s`` seconds: ``states`` (every job's), ``results`` (the
        succeeded ones, signed), ``jobs`` (the other final ones, whole)."""
        answer: dict[str, Any] = self._send(_calls.wait_jobs(job_ids, wait_s))
        return answer

    def account(self) -> dict[str, Any]:
        """Your payer and, on a paid orchestrator, what it can still be charged (wei)."""
        account: dict[str, Any] = self._send(_calls.account())
        return account

    def link_payer(self, private_key: str | bytes) -> dict[str, Any]:
        """Pay for this client's jobs from the account of ``private_key``: the key signs the
        orchestrator's challenge here, locally; only the signature is sent."""
        from eth_account import Account

        address = Account.from_key(private_key).address
        challenge = self._send(_calls.payer_challenge(address))
        account: dict[str, Any] = self._send(_calls.link_payer(private_key, address, challenge))
        return account

    def upload_blob(self, path: Path) -> str:
        """Stream a file to the blob store; returns its sha256 address."""

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(UPLOAD_CHUNK_BYTES):
                    yield chunk

        info = self._send(_calls.UPLOAD_BLOB, content=chunks())
        return str(info["sha256"])

    def download_blob(self, sha256: str, dest: Path) -> Path:
        """Stream a blob into ``dest`` (written aside, then renamed); returns ``dest``."""
        call = _calls.download_blob(sha256)
        partial = _partial(dest)
        with self._http.stream(call.method, call.path) as response:
            if not response.is_success:
                response.read()
                _calls.check(response)
            with partial.open("wb") as out:
                for chunk in response.iter_bytes(UPLOAD_CHUNK_BYTES):
                    out.write(chunk)
        os.replace(partial, dest)
        return dest


class AsyncClient:
    """The REST API for job submitters, for asyncio (httpx.AsyncClient); the same methods as
    ``Client``, awaited (``list`` is an async iterator)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call, **kwargs: Any) -> Any:
        response = await self._http.request(
            call.method,
            call.path,
            params=call.params,
            json=call.json,
            headers=call.headers,
            **kwargs,
        )
        return _calls.read(response)

    async def submit(
        self, spec: dict[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Submit a job (see ``protocol.jobs.JobSpec``); a repeated idempotency key returns the
        job it first made. Prices in wei per unit."""
        job: dict[str, Any] = await self._send(_calls.submit(spec, idempotency_key))
        return job

    async def get(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = await self._send(_calls.get_job(job_id))
        return job

    async def result(self, job_id: str) -> dict[str, Any]:
        """The signed result of a succeeded job (cost in wei, duration s, energy J)."""
        result: dict[str, Any] = await self._send(_calls.get_result(job_id))
        return result

    async def cancel(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = await self._send(_calls.cancel(job_id))
        return job

    async def list(
        self, state: str | None = None, limit: int = 50
    ) -> AsyncIterator[dict[str, Any]]:
        """Every job of this client, newest first, ``limit`` per page, following pages."""
        cursor: str | None = None
        while True:
            page = await self._send(_calls.list_page(state, limit, cursor))
            for job in page["jobs"]:
                yield job
            cursor = page.get("next_cursor")
            if not cursor:
                return

    async def wait(
        self,
        job_id: str,
        timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
        *,
        on_progress: AsyncProgress | None = None,
        poll_s: float = WAIT_POLL_S,
    ) -> dict[str, Any]:
        """Poll every ``poll_s`` seconds until the job is final; returns its result. Raises
        JobFailed (failed, cancelled, expired) or JobTimeout after ``timeout_s`` seconds.
        ``on_progress`` may be a plain function or a coroutine function. Each request is a
        long-poll held by the orchestrator until the job's state changes."""
        waiting = _calls.Waiting(job_id, timeout_s, poll_s)
        outage = _calls.Outage(waiting.deadline)
        job: dict[str, Any] = await self._send_riding(outage, lambda: _calls.get_job(job_id))
        while True:
            if on_progress is not None:
                shown = on_progress(job)
                if inspect.isawaitable(shown):
                    await shown
            if waiting.succeeded(job):
                result: dict[str, Any] = await self._send_riding(
                    outage, lambda: _calls.get_result(job_id)
                )
                return result
            poll = functools.partial(waiting.long_poll, job, self._http.timeout.read)
            changed: dict[str, Any] = await self._send_riding(outage, poll)
            if changed["state"] == job["state"]:
                await asyncio.sleep(waiting.pause_s())
            job = changed

    async def _send_riding(self, outage: _calls.Outage, call: Callable[[], Call]) -> Any:
        """``_send`` of a repeatable read, riding out an orchestrator that is away for a while
        (see ``Client._send_riding``)."""
        while True:
            try:
                answer = await self._send(call())
            except (httpx.TransportError, GpumarketAPIError) as exc:
                await asyncio.sleep(outage.pause_after(exc))
                continue
            outage.over()
            return answer

    async def generate(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        stop: Stops | None = None,
        max_price_wei_per_unit: int | str,
        preference: str | None = None,
        timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
    ) -> dict[str, Any]:
        """As ``Client.generate``: the result of an LLM generation (tokens priced in wei)."""
        spec = _calls.generate_spec(
            model,
            prompt=prompt,
            messages=messages,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            stop=stop,
            max_price_wei_per_unit=max_price_wei_per_unit,
            preference=preference,
        )
        job = await self.submit(spec)
        return await self.wait(job["id"], timeout_s)

    async def stream(self, job_id: str) -> AsyncIterator[str]:
        """As ``Client.stream``: a generate job's text while it is produced."""
        call = _calls.stream_job(job_id)
        async with self._http.stream(call.method, call.path, timeout=None) as response:
            if response.status_code >= 400:
                await response.aread()
                _calls.check(response)
            async for line in response.aiter_lines():
                event = _calls.stream_event(line)
                if event is None:
                    continue
                if event.get("done"):
                    if event["job"]["state"] != "succeeded":
                        raise JobFailed(event["job"])
                    return
                yield str(event.get("text", ""))

    async def submit_many(
        self, specs: builtins.list[dict[str, Any]]
    ) -> builtins.list[dict[str, Any]]:
        """Submit many jobs in batches; see ``Client.submit_many``."""
        items: builtins.list[dict[str, Any]] = []
        for chunk in _calls.chunks(specs, _calls.SUBMIT_BATCH_MAX):
            items.extend((await self._send(_calls.submit_batch(chunk)))["jobs"])
        return items

    async def wait_many(
        self, job_ids: builtins.list[str], timeout_s: float = DEFAULT_WAIT_TIMEOUT_S
    ) -> builtins.list[dict[str, Any]]:
        """Wait until every job is final; see ``Client.wait_many``."""
        waiting = _calls.WaitingMany(job_ids, timeout_s)
        outage = _calls.Outage(waiting.deadline)
        read_s = self._http.timeout.read
        while not waiting.done:
            waiting.take(await self._send_riding(outage, lambda: waiting.next_call(read_s)))
        return waiting.in_order()

    async def wait_any(
        self, job_ids: builtins.list[str], wait_s: float = _calls.LONG_POLL_S
    ) -> dict[str, Any]:
        """One long-poll over many jobs; see ``Client.wait_any``."""
        answer: dict[str, Any] = await self._send(_calls.wait_jobs(job_ids, wait_s))
        return answer

    async def account(self) -> dict[str, Any]:
        """Your payer and, on a paid orchestrator, what it can still be charged (wei)."""
        account: dict[str, Any] = await self._send(_calls.account())
        return account

    async def link_payer(self, private_key: str | bytes) -> dict[str, Any]:
        """Pay for this client's jobs from the account of ``private_key``: the key signs the
        orchestrator's challenge here, locally; only the signature is sent."""
        from eth_account import Account

        address = Account.from_key(private_key).address
        challenge = await self._send(_calls.payer_challenge(address))
        call = _calls.link_payer(private_key, address, challenge)
        account: dict[str, Any] = await self._send(call)
        return account

    async def upload_blob(self, path: Path) -> str:
        """Stream a file to the blob store; returns its sha256 address."""

        async def chunks() -> AsyncIterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(UPLOAD_CHUNK_BYTES):
                    yield chunk

        info = await self._send(_calls.UPLOAD_BLOB, content=chunks())
        return str(info["sha256"])

    async def download_blob(self, sha256: str, dest: Path) -> Path:
        """Stream a blob into ``dest`` (written aside, then renamed); returns ``dest``."""
        call = _calls.download_blob(sha256)
        partial = _partial(dest)
        async with self._http.stream(call.method, call.path) as response:
            if not response.is_success:
                await response.aread()
                _calls.check(response)
            with partial.open("wb") as out:
                async for chunk in response.aiter_bytes(UPLOAD_CHUNK_BYTES):
                    out.write(chunk)
        os.replace(partial, dest)
        return dest
