"""gpumarket: CLI and the Python SDK for job submitters."""

from gpumarket.sdk import Client, GpumarketAPIError, JobFailed, JobTimeout

__all__ = ["Client", "GpumarketAPIError", "JobFailed", "JobTimeout"]
