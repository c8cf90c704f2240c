"""Blame: whose fault a failed job is, and who pays for it (docs/TRUST.md, "Blame").

A worker that gives a job up says whose fault it thinks it is (``FailRequest.fault``):

- ``worker``: taken as said. Not retryable: the job fails and the worker's reputation takes a
  failure. Retryable: the job goes to another worker (no reputation change, as before: the
  worker gave it back in time, and loses the pay).
- ``none`` (retryable only): taken as said; the job goes to another worker.
- ``input``: a claim that would cost the client, so it is believed only once confirmed:
  1. the orchestrator's own input checks (services/inputs.py) find the input bad, or the same
     input was already confirmed bad (``refused_inputs``); or
  2. a second, different worker makes the same claim on the job; or
  3. no other worker could run the job at all (a lone worker: nobody to ask).
  Unconfirmed, the job goes to another worker (one extra attempt if the client's are spent)
  and the claimant is kept out of it. If that worker then completes the job, the claim was
  false: every claimant takes a failure, as if it had failed the job itself. A check (a re-run
  of a job that succeeded) cannot fail for its input: such a claim is the claimant's fault.

A confirmed input failure fails the job with ``fault: input``, touches no worker's reputation,
counts against the client (services/throttle.py) and records the input as refused, so the
client's same job is refused at submit for a day (``inputs.REFUSED_INPUT_TTL_S``).
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.config import Settings
from orchestrator.services import reputation, throttle
from orchestrator.services.inputs import InputChecks, input_key, ladder_problem, refused_reason
from orchestrator.services.lifecycle import requeue_or_fail, transition
from orchestrator.services.matching import within_price
from orchestrator.services.verification import CHECK
from orchestrator.services.workers import REGISTERED
from orchestrator.store import Store
from orchestrator.store.models import Client, Job, RefusedInput, Worker
from protocol import FailRequest, Fault, JobState, JobType, Offer, Rendition

log = logging.getLogger("gpumarket.orchestrator.blame")


class Blame:
    def __init__(self, store: Store, settings: Settings, inputs: InputChecks) -> None:
        self._store = store
        self._settings = settings
        self._inputs = inputs

    def recheck(self, job_id: str, now: float) -> str | None:
        """The orchestrator's own verdict on a job's input, made before the caller's
        transaction (a media probe reads the file): what is wrong with it, or None."""
        with self._store.read() as s:
            job = s.get(Job, job_id)
            if job is None:
                return None
            known = refused_reason(s, input_key(job), now)
            if known is not None:
                return known
            if job.type != JobType.TRANSCODE or job.input_blob is None:
                return None
            blob, ladder = job.input_blob, job.spec.get("renditions") or []
        probe = self._inputs.probe(blob)
        if probe.error is not None:
            return probe.error
        return ladder_problem(probe, [Rendition.model_validate(r) for r in ladder])

    def give_up(
        self,
        s: Session,
        job: Job,
        worker: Worker,
        req: FailRequest,
        now: float,
        found: str | None,
    ) -> None:
        """Record ``worker`` giving ``job`` up (both rows locked by the caller); ``found`` is
        what ``recheck`` said about the input."""
        reason = f"worker {worker.address}: {req.reason}"
        if req.retryable:
            requeue_or_fail(s, job, now, reason, fault=req.fault)
        elif req.fault is Fault.INPUT and job.kind != CHECK:
            self._input_claim(s, job, worker, reason, now, found)
        else:
            if req.fault is Fault.INPUT:
                reason += " (a check re-runs a job that already succeeded: its input is fine)"
            self._fail_worker(worker, now)
            job.fault = Fault.WORKER
            transition(s, job, JobState.FAILED, now, detail=reason)

    def _fail_worker(self, worker: Worker, now: float) -> None:
        worker.jobs_failed += 1
        reputation.record(
            worker, reputation.Event.FAILED, now, self._settings.reputation_half_life_s
        )

    def _input_claim(
        self, s: Session, job: Job, worker: Worker, reason: str, now: float, found: str | None
    ) -> None:
        claims = list(job.input_claims or [])
        others = [c for c in claims if c["worker_id"] != worker.id]
        claimants = sorted({worker.id, *(c["worker_id"] for c in claims)})
        if found is not None:
            confirmed = f"the orchestrator's check agrees: {found}"
        elif others:
            confirmed = f"confirmed by a second worker, {others[0]['address']}"
        elif not self._another_worker_offers(s, job, claimants):
            confirmed = "not confirmed: no other worker can run this job"
        else:
            claims.append(
                {"worker_id": worker.id, "address": worker.address, "attempt": job.attempt}
            )
            job.input_claims = claims
            job.excluded_workers = sorted({*job.excluded_workers, *claimants})
            # The confirmation run is the market's cost, not the client's: never its last try.
            job.max_attempts = max(job.max_attempts, job.attempt + 1)
            requeue_or_fail(
                s,
                job,
                now,
                f"{reason}; said to be the input's fault: another worker will confirm or refute it",
            )
            return
        self._fail_for_input(s, job, f"{reason} ({confirmed})", now)

    def _fail_for_input(self, s: Session, job: Job, detail: str, now: float) -> None:
        job.input_claims = None
        job.fault = Fault.INPUT
        transition(s, job, JobState.FAILED, now, detail=detail)
        refused = s.get(RefusedInput, input_key(job))
        if refused is None:
            s.add(RefusedInput(input_key=input_key(job), reason=detail, created_at=now))
        else:  # an old refusal, past its TTL: this one starts a new one
            refused.reason, refused.created_at = detail, now
        client = s.get(Client, job.client_id, with_for_update=True)
        if client is not None:
            throttle.record_input_failure(
                client, now, self._settings.client_input_failure_half_life_s
            )

    def _another_worker_offers(self, s: Session, job: Job, exclude: list[str]) -> bool:
        """Could a registered worker other than ``exclude`` take the job at its price?"""
        rows = s.scalars(
            select(Worker.offers).where(Worker.status == REGISTERED, Worker.id.not_in(exclude))
        )
        offers = (Offer.model_validate(raw) for worker in rows for raw in worker)
        caps = (job.max_price_wei_per_unit, job.max_prompt_price_wei_per_unit)
        return any(
            offer.job_type == job.type
            and offer.model == job.model
            and within_price(offer, *caps) is None
            for offer in offers
        )

    def completed(self, s: Session, job: Job, now: float) -> None:
        """``job`` was just completed (caller's transaction): its input was fine after all, so
        every worker that said otherwise takes a failure."""
        if not job.input_claims:
            return
        for worker_id in sorted({c["worker_id"] for c in job.input_claims}):
            row = s.get(Worker, worker_id, with_for_update=True)
            if row is None:
                continue
            self._fail_worker(row, now)
            log.warning(
                "job %s: worker %s said its input was bad; another worker completed it",
                job.id,
                row.address,
                extra={"job_id": job.id},
            )
        job.input_claims = None
