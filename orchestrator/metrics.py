"""Prometheus exposition of the market's figures (``GET /metrics``).

A custom collector reads the store at scrape time (``services/metrics.py``), so every replica
reports the same exact figures, across restarts. Each app gets a registry of its own: nothing
goes to prometheus_client's global ``REGISTRY``.

Metrics (all read from the store):

==========================================  =========  ==========================================
name                                        type       what
==========================================  =========  ==========================================
gpumarket_jobs{state,type}                  gauge      jobs in each state
gpumarket_queue_depth                       gauge      queued jobs, waiting for a worker
gpumarket_jobs_failed{type,fault}           gauge      failed jobs by whose fault: input|worker|none
gpumarket_workers_registered                gauge      workers not deregistered
gpumarket_workers_online                    gauge      of those, seen within the lease TTL
gpumarket_job_cost_wei_total{type}          counter    charged for succeeded jobs (units x price)
gpumarket_wei_owed_total                    counter    owed to workers per the payment ledger
gpumarket_wei_redeemed_total                counter    paid to workers on chain (confirmed)
gpumarket_wei_fees_total                    counter    orchestrator fees taken at redemption
gpumarket_energy_joules_total{type}         counter    energy the workers reported for results
gpumarket_job_latency_seconds{type}         histogram  submission to result, succeeded jobs
gpumarket_dispatch_latency_seconds{type}    histogram  submission to first start on a worker
gpumarket_generated_tokens_total            counter    tokens billed by succeeded generate jobs
gpumarket_time_to_first_token_seconds{type} histogram  submission to a generate job's first text
==========================================  =========  ==========================================

Prometheus samples are float64: wei figures are exact up to 2**53 wei (about 0.009 ETH) and
rounded to 16 significant digits beyond. ``GET /v1/settlement`` has the exact integers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from orchestrator.services.metrics import (
    LATENCY_BUCKETS_S,
    LatencyHistogram,
    MarketSnapshot,
    read_market_snapshot,
)
from orchestrator.wiring import Services

__all__ = ["CONTENT_TYPE", "MarketCollector", "build_registry", "render"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The Prometheus text exposition format's media type."""


class MarketCollector:
    """Turns a fresh :class:`MarketSnapshot` into metric families at every scrape."""

    def __init__(self, snapshot: Callable[[], MarketSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from _job_families(snap)
        yield from _worker_families(snap)
        yield from _money_families(snap)
        yield _by_type(
            CounterMetricFamily(
                "gpumarket_energy_joules",
                "Energy the workers reported for their results, in joules.",
                labels=["type"],
            ),
            snap.energy_j_by_type,
        )
        yield _histogram(
            "gpumarket_job_latency_seconds",
            "Seconds from submission to result, succeeded jobs.",
            snap.job_latency,
        )
        yield _histogram(
            "gpumarket_dispatch_latency_seconds",
            "Seconds from submission to the first start on a worker.",
            snap.dispatch_latency,
        )
        yield CounterMetricFamily(
            "gpumarket_generated_tokens",
            "Tokens (prompt + completion) billed by succeeded generate jobs.",
            value=snap.tokens,
        )
        yield _histogram(
            "gpumarket_time_to_first_token_seconds",
            "Seconds from submission to a generate job's first streamed text.",
            snap.first_token_latency,
        )


def _job_families(snap: MarketSnapshot) -> Iterator[Metric]:
    jobs = GaugeMetricFamily("gpumarket_jobs", "Jobs in each state.", labels=["state", "type"])
    for (state, kind), count in sorted(snap.jobs.items()):
        jobs.add_metric([state, kind], count)
    yield jobs
    yield GaugeMetricFamily(
        "gpumarket_queue_depth", "Queued jobs waiting for a worker.", value=snap.queue_depth
    )
    failed = GaugeMetricFamily(
        "gpumarket_jobs_failed",
        "Failed jobs by whose fault: input (the client's), worker or none.",
        labels=["type", "fault"],
    )
    for (kind, fault), count in sorted(snap.failed.items()):
        failed.add_metric([kind, fault], count)
    yield failed


def _worker_families(snap: MarketSnapshot) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "gpumarket_workers_registered",
        "Workers registered and not deregistered.",
        value=snap.workers_registered,
    )
    yield GaugeMetricFamily(
        "gpumarket_workers_online",
        "Registered workers seen within the lease TTL.",
        value=snap.workers_online,
    )


def _money_families(snap: MarketSnapshot) -> Iterator[Metric]:
    yield _by_type(
        CounterMetricFamily(
            "gpumarket_job_cost_wei",
            "Wei charged for succeeded jobs (units x price), float64.",
            labels=["type"],
        ),
        snap.cost_wei_by_type,
    )
    yield CounterMetricFamily(
        "gpumarket_wei_owed",
        "Wei owed to workers per the payment ledger, float64.",
        value=snap.wei_owed,
    )
    yield CounterMetricFamily(
        "gpumarket_wei_redeemed",
        "Wei paid to workers on chain (confirmed PaymentBroker redemptions), float64.",
        value=snap.wei_redeemed,
    )
    yield CounterMetricFamily(
        "gpumarket_wei_fees",
        "Wei of orchestrator fees taken at confirmed redemptions, float64.",
        value=snap.wei_fees,
    )


def _by_type(
    family: CounterMetricFamily, values: dict[str, int] | dict[str, float]
) -> CounterMetricFamily:
    for kind, value in sorted(values.items()):
        family.add_metric([kind], value)
    return family


def _histogram(name: str, doc: str, by_type: dict[str, LatencyHistogram]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=["type"])
    for kind, hist in sorted(by_type.items()):
        buckets = [
            (floatToGoString(bound), float(n))
            for bound, n in zip(LATENCY_BUCKETS_S, hist.cumulative, strict=True)
        ]
        buckets.append(("+Inf", float(hist.count)))
        family.add_metric([kind], buckets, hist.sum_s)
    return family


def build_registry(services: Services) -> CollectorRegistry:
    """A registry of its own for one app, with the market collector on ``services``."""
    registry = CollectorRegistry()
    registry.register(
        MarketCollector(
            lambda: read_market_snapshot(
                services.store, services.now(), services.settings.lease_ttl_s
            )
        )
    )
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (runs the collectors: blocking I/O)."""
    return generate_latest(registry)
