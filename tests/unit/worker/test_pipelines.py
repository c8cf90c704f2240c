"""The inference pipeline measures its own throughput at warm-up and offers it."""

from __future__ import annotations

import asyncio

from protocol import Precision
from worker.executors.inference import BUILTIN_EMBEDDING_MODEL, ModelRegistry
from worker.executors.pipelines import InferencePipeline


def test_warm_up_measures_throughput_that_the_offer_carries() -> None:
    pipeline = InferencePipeline(ModelRegistry(device="cpu"), max_batch=8, max_wait_s=0.005)
    before = {(c.model, c.precision): c.units_per_s for c in pipeline.capabilities()}
    assert before[(BUILTIN_EMBEDDING_MODEL, Precision.FP32)] is None  # nothing measured yet

    async def warm() -> None:
        try:
            await pipeline.warm_up()
        finally:
            await pipeline.close()

    asyncio.run(warm())
    after = {(c.model, c.precision): c.units_per_s for c in pipeline.capabilities()}
    measured = after[(BUILTIN_EMBEDDING_MODEL, Precision.FP32)]
    assert measured is not None and measured > 1.0  # texts per second on this machine
    # Only what was timed is claimed: other precisions wait for the orchestrator's figures.
    assert all(v is None for k, v in after.items() if k[1] is not Precision.FP32)
