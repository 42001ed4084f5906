"""Prometheus metrics of the gateway (spec section 8).

Counters and the duration histogram are fed once per request; everything that
describes the current state (backends, destinations, Redis, in-flight
requests) is read from the node's status (gateway.status.model) at scrape time, so a scrape
always tells the truth. Labels have bounded values only: no paths, no user
names, no free text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.access.refusals import Refusal, auth_failure_labels
from gateway.status.model import NodeStatus

NAMESPACE = "rclone_gateway"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Methods a restic or WebDAV client sends; anything else is counted as "other".
KNOWN_METHODS = frozenset({
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PROPFIND", "PROPPATCH", "MKCOL",
    "COPY", "MOVE", "LOCK", "UNLOCK", "PATCH",
})
CALLER_GROUPS = frozenset({"node", "module", "anonymous"})
PROTOCOLS = frozenset({"rest", "webdav"})
DECISIONS = frozenset({"allow", "deny"})
# Restic pack uploads and WebDAV transfers of large files take minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600)

HealthSource = Callable[[], NodeStatus]

# No `*_created` series beside every counter: they double the exposition for nothing a
# scraper of this gateway uses (process_start_time_seconds tells when counting began).
disable_created_metrics()


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


def bounded(value: str, allowed: frozenset[str], fallback: str = "none") -> str:
    return value if value in allowed else fallback


def live_families(node: NodeStatus) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The state gauges, from the node's status (see Gateway.node_status)."""
    ns = NAMESPACE
    yield _gauge(f"{ns}_build_info", "Version of the running gateway.", 1.0,
                 {"version": node.version})
    yield _gauge(f"{ns}_serving", "1 when the gateway serves requests (/health answers 200).",
                 1.0 if node.serving else 0.0)
    yield _gauge(f"{ns}_inflight_requests", "Requests being handled now.", float(node.inflight))

    up = GaugeMetricFamily(f"{ns}_backend_up", "1 when the rclone serve child answers.",
                           labels=["backend"])
    restarts = CounterMetricFamily(
        f"{ns}_backend_restarts",
        "Restarts of the rclone serve child of the current backend generation.",
        labels=["backend"],
    )
    replacements = CounterMetricFamily(
        f"{ns}_backend_replacements",
        "rclone serve children replaced while they still ran, because they stopped "
        "answering the gateway's liveness checks.",
        labels=["backend", "reason"],
    )
    answering = GaugeMetricFamily(
        f"{ns}_backend_answering",
        "1 when the rclone serve child answered its last liveness check.", labels=["backend"])
    for child in sorted(node.backends, key=lambda b: b.name):
        up.add_metric([child.name], 1.0 if child.running else 0.0)
        restarts.add_metric([child.name], float(child.restarts))
        replacements.add_metric([child.name, "unresponsive"], float(child.replacements))
        answering.add_metric([child.name], 1.0 if child.answering else 0.0)
    yield up
    yield restarts
    yield replacements
    yield answering
    yield _gauge(f"{ns}_config_generation",
                 "Number of the backend generation serving new requests (0: none).",
                 float(node.generation))
    yield _counter(f"{ns}_reloads", "Backend generations started for a new configuration.",
                   float(node.reloads))

    dest_up = GaugeMetricFamily(
        f"{ns}_destination_up",
        "1 when a destination is served by this node and healthy, else 0; destinations "
        "served through a peer gateway are left out.",
        labels=["destination"],
    )
    for dest in sorted(node.destinations, key=lambda d: d.uuid):
        if not dest.served_by_peer:
            dest_up.add_metric([dest.uuid], 1.0 if dest.state == "ok" else 0.0)
    yield dest_up

    yield _gauge(f"{ns}_redis_connected", "1 when the last read of Redis succeeded.",
                 1.0 if node.redis.connected else 0.0)
    if node.redis.last_sync is not None:
        yield _gauge(f"{ns}_redis_last_sync_timestamp_seconds",
                     "Unix time of the last full read of the configuration from Redis.",
                     float(node.redis.last_sync))


def _gauge(name: str, doc: str, value: float,
           labels: Mapping[str, str] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc)
    family.add_metric([], value)
    return family


class _LiveCollector(Collector):
    def __init__(self, health: HealthSource) -> None:
        self._health = health

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return live_families(self._health())

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # names are not known before the first scrape; nothing to check


class GatewayMetrics:
    """The gateway's own registry (not the process-global one)."""

    def __init__(self, health: HealthSource) -> None:
        self.registry = CollectorRegistry()
        ns = NAMESPACE
        request_labels = ["caller", "protocol"]
        self.requests = Counter(
            f"{ns}_requests", "Requests handled, by caller group, protocol, method, policy "
            "decision and status class.",
            ["caller", "protocol", "method", "decision", "status_class"],
            registry=self.registry,
        )
        self.duration = Histogram(
            f"{ns}_request_duration_seconds", "Time from request start to the last byte sent.",
            request_labels, buckets=DURATION_BUCKETS, registry=self.registry,
        )
        self.bytes_in = Counter(f"{ns}_received_bytes", "Request body bytes received.",
                                request_labels, registry=self.registry)
        self.bytes_out = Counter(f"{ns}_sent_bytes", "Response body bytes sent from backends.",
                                 request_labels, registry=self.registry)
        self.auth_failures = Counter(
            f"{ns}_auth_failures", "Requests refused with 401, by reason (missing, invalid).",
            ["reason"], registry=self.registry,
        )
        for label in auth_failure_labels():  # from the table of refusals
            self.auth_failures.labels(reason=label)
        ProcessCollector(namespace="", registry=self.registry)
        self._children: dict[tuple[str, ...], tuple[Any, Any, Any, Any]] = {}
        self.registry.register(_LiveCollector(health))

    def observe(
        self,
        *,
        caller: str,
        protocol: str,
        method: str,
        decision: str,
        status: int,
        duration: float,
        bytes_in: int,
        bytes_out: int,
        refusal: Refusal | None,
    ) -> None:
        caller = bounded(caller, CALLER_GROUPS, "anonymous")
        protocol = bounded(protocol, PROTOCOLS)
        key = (caller, protocol, method_label(method), bounded(decision, DECISIONS),
               status_class(status))
        children = self._children.get(key)
        if children is None:
            # Every label is from a bounded set: so is this cache.
            children = self._children[key] = (
                self.requests.labels(*key), self.duration.labels(caller, protocol),
                self.bytes_in.labels(caller, protocol), self.bytes_out.labels(caller, protocol),
            )
        requests, durations, received, sent = children
        requests.inc()
        durations.observe(duration)
        if bytes_in:
            received.inc(bytes_in)
        if bytes_out:
            sent.inc(bytes_out)
        if status == 401:  # the gateway's own 401 says why; a peer's passed on does not
            label = refusal.label if refusal is not None else None
            self.auth_failures.labels(reason=label or "other").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
