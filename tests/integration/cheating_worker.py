"""A dishonest worker for tests: ``python -m tests.integration.cheating_worker FRACTION ARGS``.

It is the real ``gpumarket worker run`` (ARGS as for that command) with one change: for a
FRACTION of its inference jobs it skips the model and returns plausible junk (random unit
vectors of the right shape), signed like any honest result. A lazy worker saving its compute.
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
from worker.executors.pipelines import InferencePipeline


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


if __name__ == "__main__":
    install(float(sys.argv[1]))
    app(sys.argv[2:], prog_name="gpumarket")
