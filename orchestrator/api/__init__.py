"""HTTP layer: thin routes over the services, typed dependencies, problem responses."""
