"""Reporting results: those ready together go to the orchestrator in one request.

Jobs that ran in one batch of the model finish together. Each job's task hands its result to
``ResultReporter.report`` and waits; the reporter gathers what arrives within
``RESULT_GATHER_S`` and sends it as one ``POST /v1/workers/results`` under one EIP-712
signature over the results' hashes (protocol/signing.py), or, for a lone result, the single
``POST /v1/workers/jobs/{id}/complete`` with its own signature. Each job still gets its own
answer: its result, or its own error (a 409 for a stale attempt fails that job alone).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from protocol import CompleteRequest, JobState
from protocol.batches import MAX_RESULT_BATCH, BatchCompleteRequest, BatchResult
from protocol.problems import ProblemError
from protocol.signing import result_hash, sign_result, sign_result_batch
from worker.client import OrchestratorClient

RESULT_GATHER_S = 0.002
"""How long the first ready result waits for others (seconds): the jobs of one model batch
finish within microseconds of each other, so a few milliseconds gathers them all."""


@dataclass
class _Ready:
    result: BatchResult
    answer: asyncio.Future[JobState] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ResultReporter:
    def __init__(
        self,
        client: OrchestratorClient,
        *,
        gather_s: float = RESULT_GATHER_S,
        max_batch: int = MAX_RESULT_BATCH,
    ) -> None:
        self._client = client
        self._gather_s = gather_s
        self._max_batch = max_batch
        self._ready: list[_Ready] = []
        self._sender: asyncio.Task[None] | None = None
        self.requests = 0  # reports sent, single or batch (for tests and metrics)

    async def report(self, result: BatchResult) -> JobState:
        """Send ``result`` (with whatever else is ready); returns the job's state as recorded
        (succeeded or verifying); raises its error for this job (ProblemError) or the
        request's (transport)."""
        ready = _Ready(result)
        self._ready.append(ready)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_soon())
        try:
            return await asyncio.shield(ready.answer)
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._ready.remove(ready)  # not sent yet: leave it out
            raise

    async def _send_soon(self) -> None:
        await asyncio.sleep(self._gather_s)
        while self._ready:
            batch, self._ready = self._ready[: self._max_batch], self._ready[self._max_batch :]
            try:
                answers = await self._send(batch)
            except ProblemError as exc:
                if exc.retryable or len(batch) == 1:
                    _fail_all(batch, exc)
                    continue
                # Refused whole (one result the orchestrator cannot read spoils the request):
                # each on its own, so only the bad one fails.
                answers = []
                for ready in batch:
                    try:
                        answers.extend(await self._send([ready]))
                    except Exception as single:
                        answers.append(single)
            except Exception as exc:  # the whole request failed: each job decides on retries
                _fail_all(batch, exc)
                continue
            for ready, answer in zip(batch, answers, strict=True):
                if ready.answer.done():
                    continue
                if isinstance(answer, Exception):
                    ready.answer.set_exception(answer)
                else:
                    ready.answer.set_result(answer)

    async def _send(self, batch: list[_Ready]) -> list[JobState | Exception]:
        self.requests += 1
        key = self._client.account.key
        if len(batch) == 1:
            r = batch[0].result
            signature = sign_result(
                key,
                r.job_id,
                r.attempt,
                r.output_sha256,
                r.units,
                r.price_wei_per_unit,
                prompt_units=r.prompt_units,
                prompt_price_wei_per_unit=r.prompt_price_wei_per_unit,
            )
            fields = r.model_dump(
                exclude={"job_id", "price_wei_per_unit", "prompt_price_wei_per_unit"}
            )
            request = CompleteRequest.model_validate({**fields, "signature": signature})
            try:
                return [(await self._client.complete(r.job_id, request)).state]
            except ProblemError as exc:
                if exc.retryable:
                    raise
                return [exc]
        results = [ready.result for ready in batch]
        hashes = [
            result_hash(
                r.job_id,
                r.attempt,
                r.output_sha256,
                r.units,
                r.price_wei_per_unit,
                prompt_units=r.prompt_units,
                prompt_price_wei_per_unit=r.prompt_price_wei_per_unit,
            )
            for r in results
        ]
        request_ = BatchCompleteRequest(results=results, signature=sign_result_batch(key, hashes))
        items = await self._client.complete_batch(request_)
        return [
            item.state
            if item.error is None and item.state is not None
            else ProblemError(
                item.error.status if item.error else 500,
                item.error.code if item.error else "error",
                item.error.detail if item.error else "no answer for this job",
            )
            for item in items
        ]


def _fail_all(batch: list[_Ready], exc: Exception) -> None:
    for ready in batch:
        if not ready.answer.done():
            ready.answer.set_exception(exc)
