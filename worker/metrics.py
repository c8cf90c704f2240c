"""The worker's own Prometheus metrics, served on a loopback port when asked.

Off by default; ``GPUMARKET_WORKER_METRICS_PORT`` (or ``gpumarket worker run --metrics-port``)
turns it on, bound to ``GPUMARKET_WORKER_METRICS_HOST`` (default 127.0.0.1: the worker needs no
inbound port, and this one is for a local Prometheus or node agent). Each daemon has a registry
of its own, so several daemons in one process (tests) do not collide.

==================================================  =========  ==================================
name                                                type       what
==================================================  =========  ==================================
gpumarket_worker_jobs_completed_total{type}         counter    results the orchestrator accepted
gpumarket_worker_jobs_failed_total{type,retryable}  counter    failures reported
gpumarket_worker_job_execution_seconds{type}        histogram  executor run time, finished jobs
gpumarket_worker_energy_joules_total{source}        counter    energy of finished jobs (our share)
gpumarket_worker_jobs_in_flight                     gauge      jobs leased and not yet done
gpumarket_worker_batch_size{model,precision}        histogram  items per inference model call
gpumarket_worker_voucher_cumulative_wei             gauge      latest vouchers, summed over payers
==================================================  =========  ==================================

The voucher gauge is a float64 (exact up to 2**53 wei) and is there only while payments run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from worker.batching import BatcherPool, BatcherStats

__all__ = ["BATCH_SIZE_BUCKETS", "EXECUTION_BUCKETS_S", "MetricsServer", "WorkerMetrics"]

EXECUTION_BUCKETS_S: tuple[float, ...] = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)
"""Upper bounds (seconds) of the execution-time histogram's buckets."""
BATCH_SIZE_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Upper bounds (items) of the batch-size histogram's buckets; 4096 is the largest max_batch."""


@dataclass
class MetricsServer:
    """A running metrics HTTP server; ``port`` is the bound one (useful when asked for 0)."""

    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5.0)


class _BatchSizeCollector:
    """Batch sizes from the batchers' own counters, read at scrape time."""

    def __init__(self) -> None:
        self.pools: list[BatcherPool] = []

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "gpumarket_worker_batch_size",
            "Items per inference model call (dynamic batching).",
            labels=["model", "precision"],
        )
        for pool in self.pools:
            for (model, precision), stats in sorted(pool.stats().items()):
                family.add_metric([model, precision], _size_buckets(stats), float(stats.items))
        yield family


def _size_buckets(stats: BatcherStats) -> list[tuple[str, float]]:
    buckets = []
    for bound in BATCH_SIZE_BUCKETS:
        within = sum(n for size, n in stats.batch_sizes.items() if size <= bound)
        buckets.append((floatToGoString(bound), float(within)))
    buckets.append(("+Inf", float(stats.batches)))
    return buckets


class WorkerMetrics:
    """The daemon's instruments, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs_completed = Counter(
            "gpumarket_worker_jobs_completed",
            "Jobs whose result the orchestrator accepted.",
            ["type"],
            registry=self.registry,
        )
        self.jobs_failed = Counter(
            "gpumarket_worker_jobs_failed",
            "Jobs reported as failed; retryable=false when the job itself is bad.",
            ["type", "retryable"],
            registry=self.registry,
        )
        self.execution_seconds = Histogram(
            "gpumarket_worker_job_execution_seconds",
            "Seconds the executor took for a finished job.",
            ["type"],
            buckets=EXECUTION_BUCKETS_S,
            registry=self.registry,
        )
        self.energy_joules = Counter(
            "gpumarket_worker_energy_joules",
            "Joules of finished jobs (this job's share of the device), by meter.",
            ["source"],
            registry=self.registry,
        )
        self.jobs_in_flight = Gauge(
            "gpumarket_worker_jobs_in_flight",
            "Jobs leased to this worker and not finished.",
            registry=self.registry,
        )
        self._batches = _BatchSizeCollector()
        self.registry.register(self._batches)
        self._voucher_wei: Gauge | None = None
        # Plain totals for the status line (worker/status.py): exact ints, no float64.
        self.completed_total = 0
        self.failed_total = 0
        self.earned_wei = 0
        self.redeemed_wei = 0

    def start_at_zero(self, job_types: Iterable[str], energy_source: str) -> None:
        """Show every series this worker can produce from the start (at 0), not from its first
        job: a rate over a series that appears mid-way misses that first increase."""
        for job_type in job_types:
            self.jobs_completed.labels(job_type)
            self.execution_seconds.labels(job_type)
            for retryable in ("true", "false"):
                self.jobs_failed.labels(job_type, retryable)
        self.energy_joules.labels(energy_source)

    def count_in_flight(self, jobs: Callable[[], int]) -> None:
        """Read the in-flight count from ``jobs()`` at every scrape."""
        self.jobs_in_flight.set_function(lambda: float(jobs()))

    def watch_batchers(self, pools: Iterable[BatcherPool]) -> None:
        self._batches.pools.extend(pools)

    def job_finished(self, job_type: str, duration_s: float, energy_j: float, source: str) -> None:
        """An executor returned a result after ``duration_s`` seconds using ``energy_j``."""
        self.execution_seconds.labels(job_type).observe(duration_s)
        self.energy_joules.labels(source).inc(energy_j)

    def job_completed(self, job_type: str) -> None:
        self.jobs_completed.labels(job_type).inc()
        self.completed_total += 1

    def job_failed(self, job_type: str, *, retryable: bool) -> None:
        self.jobs_failed.labels(job_type, str(retryable).lower()).inc()
        self.failed_total += 1

    def redeemed(self, paid_wei: int) -> None:
        """A redemption this worker sent paid it ``paid_wei`` (after the broker's fee)."""
        self.redeemed_wei += paid_wei

    def vouchers_seen(self, cumulative_wei: int) -> None:
        """The sum over payers of the latest cumulative voucher each has signed to us, in wei."""
        if self._voucher_wei is None:
            self._voucher_wei = Gauge(
                "gpumarket_worker_voucher_cumulative_wei",
                "Latest cumulative vouchers to this worker, summed over payers (wei, float64).",
                registry=self.registry,
            )
        self._voucher_wei.set(cumulative_wei)
        self.earned_wei = cumulative_wei

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve ``/metrics`` on ``host:port`` (0: any free port) from a daemon thread."""
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(httpd, thread)
