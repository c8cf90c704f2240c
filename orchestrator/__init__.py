"""gpumarket orchestrator: REST API, matching, leases, store, blob store."""
