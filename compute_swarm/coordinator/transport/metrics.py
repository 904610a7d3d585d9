"""Prometheus metrics, in a registry of the app's own (several apps can live in one test process)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
        self.leases_on_submission = Counter(
            "swarm_leases_on_submission",
            "Leases written in the transaction that queued their job",
            registry=self.registry,
        )
        self.dispatch_latency = Histogram(
            "swarm_dispatch_latency_seconds",
            "From a job entering the queue to its lease being sent to a node",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )

        self.artifact_bytes_served = Counter(
            "swarm_artifact_bytes_served",
            "Artifact bytes the coordinator sent to nodes: over plain HTTP, or as a swarm's web seed",
            ["route"],
            registry=self.registry,
        )
        self.peers_reported = Counter(
            "swarm_peers_reported",
            "Reports by nodes of a peer whose pieces failed their hash",
            registry=self.registry,
        )

        self.garbage_collection_pauses = Histogram(
            "swarm_garbage_collection_pause_seconds",
            "Python's cyclic garbage collector stopping the event loop, by generation collected",
            ["generation"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self._collection_started = 0.0

    def count_jobs_with(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_JobCounts(counts))

    def watch_garbage_collector(self) -> Callable[[], None]:
        """Time each collection (the collector is the process's: watch from one app at a time). Returns
        what stops watching."""

        def observe(phase: str, info: dict) -> None:
            if phase == "start":
                self._collection_started = time.perf_counter()
            else:
                self.garbage_collection_pauses.labels(str(info["generation"])).observe(
                    time.perf_counter() - self._collection_started
                )

        gc.callbacks.append(observe)
        return lambda: gc.callbacks.remove(observe)


# The routes whose bytes are the coordinator's artifact egress, by path prefix.
ARTIFACT_ROUTES = {"/api/artifacts/": "http", "/swarm/seed/": "web_seed"}


class ServedBytes:
    """ASGI middleware: counts the body bytes the artifact routes send (what a Range answer really
    sent, not the file's size), into Metrics.artifact_bytes_served."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        if scope["type"] == "http":
            path = scope.get("path", "")
            route = next((name for prefix, name in ARTIFACT_ROUTES.items() if path.startswith(prefix)), None)
        if route is None:
            await self.app(scope, receive, send)
            return
        counter = scope["app"].state.services.metrics.artifact_bytes_served.labels(route)

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.body":
                counter.inc(len(message.get("body", b"")))
            await send(message)

        await self.app(scope, receive, counting)
