"""Dishonest workers for tests: ``python -m tests.integration.cheating_worker MODE ARGS``.

Each is the real ``gpumarket worker run`` (ARGS as for that command) with one change:

- MODE a fraction such as ``0.5``: for that share of its inference jobs it skips the model and
  returns plausible junk (random unit vectors of the right shape), signed like any honest
  result. A lazy worker saving its compute.
- MODE ``overbill``: its transcodes ignore the client's frame-rate ceiling, so its renditions
  hold more frames than asked for, and it bills (and signs) every pixel its files hold. The
  orchestrator's own count of the files agrees with the bill; only a re-run on another
  worker shows that the job needed fewer.
- MODE ``makeup``: its generations keep the honest token count (and bill) but make up the
  tokens (the honest ones shuffled) and the text they decode to. It checks others honestly.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gpumarket.cli import app
from worker.executors.base import Execution
from worker.executors.pipelines import GenerationPipeline, InferencePipeline, TranscodePipeline


def _forge(rows: list[list[float]], rng: np.random.Generator) -> list[list[float]]:
    junk = rng.standard_normal((len(rows), len(rows[0]) if rows else 0))
    return (junk / np.linalg.norm(junk, axis=1, keepdims=True)).tolist()


def install(fraction: float, seed: int = 0) -> None:
    honest_run = InferencePipeline.run
    coin = random.Random(seed)
    rng = np.random.default_rng(seed)

    async def run(self: InferencePipeline, job: Any, workdir: Path, fetch: Any) -> Execution:
        execution = await honest_run(self, job, workdir, fetch)
        if execution.output is None or coin.random() >= fraction:
            return execution
        forged = {key: _forge(rows, rng) for key, rows in execution.output.items()}
        print(f"cheating on job {job.job_id}", flush=True)
        return dataclasses.replace(execution, output=forged)

    InferencePipeline.run = run  # type: ignore[method-assign]


def install_overbilling() -> None:
    honest_run = TranscodePipeline.run

    async def run(self: TranscodePipeline, job: Any, workdir: Path, fetch: Any) -> Execution:
        if not any(r.fps for r in job.renditions or []):
            return await honest_run(self, job, workdir, fetch)
        padded = [r.model_copy(update={"fps": None}) for r in job.renditions]
        execution = await honest_run(
            self, job.model_copy(update={"renditions": padded}), workdir, fetch
        )
        print(f"overbilling job {job.job_id}: {execution.units} units", flush=True)
        return execution

    TranscodePipeline.run = run  # type: ignore[method-assign]


def install_made_up_generation(seed: int = 0) -> None:
    honest_run = GenerationPipeline.run
    rng = random.Random(seed)

    async def run(self: GenerationPipeline, job: Any, workdir: Path, fetch: Any) -> Execution:
        execution = await honest_run(self, job, workdir, fetch)
        output = execution.output or {}
        if "token_ids" not in output or len(output["token_ids"]) < 2:
            return execution  # a check, run honestly (or too short to shuffle)
        tokens = list(output["token_ids"])
        while tokens == output["token_ids"]:
            rng.shuffle(tokens)
        model = await self._model(job.model, job.precision)
        made_up = {**output, "token_ids": tokens, "text": model.decode(tokens)}
        print(f"cheating on job {job.job_id}", flush=True)
        return dataclasses.replace(execution, output=made_up)

    GenerationPipeline.run = run  # type: ignore[method-assign]


if __name__ == "__main__":
    if sys.argv[1] == "overbill":
        install_overbilling()
    elif sys.argv[1] == "makeup":
        install_made_up_generation()
    else:
        install(float(sys.argv[1]))
    app(sys.argv[2:], prog_name="gpumarket")
