"""The backup report as Prometheus families. Labels: destination uuid and module (its id,
else the repository's uuid): bounded by the repositories served here, never an object name.

"No backup in 26 hours" is one expression:
    time() - rclone_gateway_last_snapshot_timestamp_seconds > 26 * 3600
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.insight.report import Report

NAMESPACE = "rclone_gateway"
LABELS = ["destination", "module"]


def report_families(report: Report) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    ns = NAMESPACE
    last = GaugeMetricFamily(
        f"{ns}_last_snapshot_timestamp_seconds",
        "Unix time of the newest snapshot of a repository served here (uploaded through "
        "this gateway, or found in the storage). Absent: none known.", labels=LABELS)
    stored = GaugeMetricFamily(
        f"{ns}_repository_stored_bytes",
        "Bytes a repository holds in its storage, as last listed.", labels=LABELS)
    snapshots = GaugeMetricFamily(
        f"{ns}_repository_snapshots", "Snapshots in a repository, as last listed.",
        labels=LABELS)
    locks = GaugeMetricFamily(f"{ns}_repository_locks", "Locks present in a repository.",
                              labels=LABELS)
    lock_age = GaugeMetricFamily(
        f"{ns}_repository_oldest_lock_age_seconds",
        "Age of the oldest lock of a repository (0: no lock).", labels=LABELS)
    uploaded = CounterMetricFamily(
        f"{ns}_repository_uploaded_bytes", "Bytes of objects uploaded into a repository "
        "through this gateway since it started.", labels=LABELS)
    restored = CounterMetricFamily(
        f"{ns}_repository_restored_bytes", "Bytes of data read from a repository by modules "
        "(restores) through this gateway since it started.", labels=LABELS)
    refused = CounterMetricFamily(
        f"{ns}_repository_refused_requests", "Requests into a repository refused by the "
        "access policy since the gateway started.", labels=LABELS)
    for repo in report.repositories:
        labels = [repo.destination, repo.label]
        if repo.last_snapshot_at is not None:
            last.add_metric(labels, repo.last_snapshot_at)
        if repo.stored_bytes is not None:
            stored.add_metric(labels, float(repo.stored_bytes))
        if repo.snapshots is not None:
            snapshots.add_metric(labels, float(repo.snapshots))
        locks.add_metric(labels, float(repo.locks))
        lock_age.add_metric(labels, repo.oldest_lock_age or 0.0)
        uploaded.add_metric(labels, float(repo.uploaded_bytes))
        restored.add_metric(labels, float(repo.restored_bytes))
        refused.add_metric(labels, float(sum(repo.refused.values())))
    yield from (last, stored, snapshots, locks, lock_age, uploaded, restored, refused)

    free = GaugeMetricFamily(
        f"{ns}_destination_free_bytes", "Free space of a destination served here, where its "
        "storage tells (absent where it does not).", labels=["destination"])
    total = GaugeMetricFamily(
        f"{ns}_destination_total_bytes", "Total space of a destination served here, where its "
        "storage tells.", labels=["destination"])
    for dest in report.destinations:
        if dest.free_bytes is not None:
            free.add_metric([dest.uuid], float(dest.free_bytes))
        if dest.total_bytes is not None:
            total.add_metric([dest.uuid], float(dest.total_bytes))
    yield free
    yield total
    if report.last_scan_at is not None:
        scan = GaugeMetricFamily(f"{ns}_storage_scan_timestamp_seconds",
                                 "Unix time of the last full listing of the storage.")
        scan.add_metric([], report.last_scan_at)
        yield scan


class ReportCollector(Collector):
    def __init__(self, report: Callable[[], Report]) -> None:
        self._report = report

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return report_families(self._report())

    def describe(self) -> list[GaugeMetricFamily]:
        return []
