"""Prometheus metrics, in a registry of the app's own (several apps can live in one test process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from compute_swarm.protocol import JOB_STATES


class _JobCounts(Collector):
    """Jobs per state, read from the database when scraped (the database is the truth, not a counter)."""

    def __init__(self, counts: Callable[[], dict[str, int]]):
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("swarm_jobs", "Jobs by state", labels=["state"])
        counts = self._counts()
        for state in JOB_STATES:
            family.add_metric([state], counts.get(state, 0))
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.nodes_connected = Gauge(
            "swarm_nodes_connected", "Nodes with an open websocket", registry=self.registry
        )
        self.leases_granted = Counter("swarm_leases_granted", "Leases sent to nodes", registry=self.registry)
        self.dispatch_latency = Histogram(
            "swarm_dispatch_latency_seconds",
            "From a job entering the queue to its lease being sent to a node",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )

    def count_jobs_with(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_JobCounts(counts))
