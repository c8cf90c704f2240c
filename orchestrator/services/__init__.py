"""Domain services: jobs, workers, leases and dispatch, matching, blobs. Routes call these."""
