"""The limits as Prometheus families: quotas and their use, bandwidth in force and the
time streams waited for it, requests refused over a cap. Labels are bounded by the
repositories and modules configured, never by a request.

A repository at 80 % of its quota:
    rclone_gateway_quota_used_bytes / rclone_gateway_quota_bytes >= 0.8
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.limits.limiter import Limiter

NAMESPACE = "rclone_gateway"


def limits_families(limiter: Limiter) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    ns = NAMESPACE
    labels = ["destination", "module"]
    quota = GaugeMetricFamily(f"{ns}_quota_bytes",
                              "Bytes a module's repository may hold in a destination.",
                              labels=labels)
    used = GaugeMetricFamily(
        f"{ns}_quota_used_bytes", "Bytes a repository with a quota holds: the last listing "
        "of the storage, kept current with the uploads and deletes passed since.",
        labels=labels)
    level = GaugeMetricFamily(
        f"{ns}_quota_level_percent", "The highest of 80 and 100 % of its quota a repository "
        "has crossed (0: under 80 %).", labels=labels)
    for view in limiter.quota_views():
        if view.quota is None or view.module is None:
            continue
        where = [view.key.destination, view.module]
        quota.add_metric(where, float(view.quota))
        if view.used is not None:
            used.add_metric(where, float(view.used))
        level.add_metric(where, float(view.level))
    yield from (quota, used, level)

    crossings = CounterMetricFamily(
        f"{ns}_quota_crossings", "Times a repository went over 80 % or 100 % of its quota.",
        labels=["level"])
    for percent, count in sorted(limiter.book.crossings.items()):
        crossings.add_metric([str(percent)], float(count))
    yield crossings

    rate = GaugeMetricFamily(
        f"{ns}_bandwidth_limit_bytes_per_second", "The bandwidth limit in force now (absent: "
        "none). scope is `gateway` or `module/<id>`.", labels=["direction", "scope"])
    waited = CounterMetricFamily(
        f"{ns}_bandwidth_wait_seconds", "Seconds transfers waited for a bandwidth limit, "
        "summed over the streams.", labels=["direction", "scope"])
    for name, bucket in sorted(limiter.shaper.buckets.items()):
        scope, _, direction = name.rpartition("/")
        where = [direction, scope or "gateway"]
        if bucket.rate is not None:
            rate.add_metric(where, float(bucket.rate))
        waited.add_metric(where, bucket.waited)
    yield from (rate, waited)

    refused = CounterMetricFamily(
        f"{ns}_concurrency_refused", "Requests answered 503 because their user had as many "
        "requests in flight as its cap allows.", labels=["caller"])
    for group in ("module", "node"):
        refused.add_metric([group], float(limiter.inflight.refused[group]))
    yield refused


class LimitsCollector(Collector):
    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return limits_families(self._limiter)

    def describe(self) -> list[GaugeMetricFamily]:
        return []
