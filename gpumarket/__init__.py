"""gpumarket: CLI and the Python SDK for job submitters."""

from gpumarket.sdk import AsyncClient, Client, GpumarketAPIError, JobFailed, JobTimeout

__all__ = ["AsyncClient", "Client", "GpumarketAPIError", "JobFailed", "JobTimeout"]
