"""gpumarket worker daemon: hardware probe, orchestrator client, executors, batching, energy."""
