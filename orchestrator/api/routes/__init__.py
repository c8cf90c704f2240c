"""One module per resource: jobs, blobs, workers, operator, health."""
