"""The backup insight of one node as one typed report: what `/status` (JSON and HTML),
`/metrics` and `rclone-gateway status` all show.

Pure: built from what the recorder saw, what the storage scan found and the cluster
state. It never holds object names (lock ids included) or secrets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from gateway.access.repository import RepositoryKey
from gateway.insight.record import Activity
from gateway.insight.scan import Space, StoredFigures
from gateway.limits.views import QuotaView
from gateway.status.model import DestinationHealth

STALE_AFTER = 26 * 3600.0  # no snapshot for this long: the repository is flagged
OLD_LOCK_AFTER = 3600.0  # a lock older than this: flagged (restic's own stale lock is 30 min)


@dataclass(frozen=True, slots=True)
class RepositoryStatus:
    destination: str
    app: str
    uuid: str
    module: str | None  # the module id, where the cluster names it
    last_snapshot_at: float | None
    snapshots: int | None
    stored_bytes: int | None
    objects: dict[str, int] | None
    locks: int
    oldest_lock_age: float | None
    uploaded_bytes: int
    uploaded_objects: int
    last_upload_at: float | None
    restored_bytes: int
    last_restore_at: float | None
    refused: dict[str, int]
    scanned_at: float | None
    stale: bool  # no snapshot in STALE_AFTER
    old_lock: bool  # a lock older than OLD_LOCK_AFTER
    quota_bytes: int | None = None  # what the repository may hold (gateway.limits)
    quota_used_bytes: int | None = None  # what it holds by the gateway's count
    quota_level: int = 0  # 80 or 100 once it crossed that share of its quota

    @property
    def label(self) -> str:
        """The module id, else the repository's uuid: a bounded metric label."""
        return self.module or self.uuid


@dataclass(frozen=True, slots=True)
class DestinationStatus:
    uuid: str
    name: str
    provider: str
    served: str  # "here", "peer", "no"
    state: str
    peer: str | None  # the node serving it, when not here
    peer_address: str | None
    total_bytes: int | None
    free_bytes: int | None


@dataclass(frozen=True, slots=True)
class Report:
    node_id: str
    generated_at: float
    last_scan_at: float | None
    repositories: tuple[RepositoryStatus, ...]
    destinations: tuple[DestinationStatus, ...]

    def stale(self, older_than: float) -> list[RepositoryStatus]:
        """Repositories without a snapshot in the last `older_than` seconds."""
        return [r for r in self.repositories
                if r.last_snapshot_at is None
                or self.generated_at - r.last_snapshot_at > older_than]

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> Report:
        """The report back from its JSON form (what `rclone-gateway status` reads)."""
        return cls(
            node_id=str(document["node_id"]),
            generated_at=float(document["generated_at"]),
            last_scan_at=document.get("last_scan_at"),
            repositories=tuple(RepositoryStatus(**r) for r in document["repositories"]),
            destinations=tuple(DestinationStatus(**d) for d in document["destinations"]),
        )

    def document(self) -> dict[str, object]:
        return {
            "node_id": self.node_id,
            "generated_at": self.generated_at,
            "last_scan_at": self.last_scan_at,
            "stale_after_seconds": STALE_AFTER,
            "old_lock_after_seconds": OLD_LOCK_AFTER,
            "repositories": [asdict(r) for r in self.repositories],
            "destinations": [asdict(d) for d in self.destinations],
        }


def _latest(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def repository_status(key: RepositoryKey, module: str | None, activity: Activity | None,
                      stored: StoredFigures | None, now: float,
                      quota: QuotaView | None = None) -> RepositoryStatus:
    activity = activity or Activity()
    # the last listing, and what requests did since
    locks = dict(stored.locks) if stored is not None else {}
    locks.update(activity.locks)
    for lock_id in activity.removed_locks:
        locks.pop(lock_id, None)
    oldest = now - min(locks.values()) if locks else None
    last = _latest(activity.last_snapshot_at, stored.newest_snapshot_at if stored else None)
    return RepositoryStatus(
        destination=key.destination, app=key.app, uuid=key.uuid, module=module,
        last_snapshot_at=last,
        snapshots=stored.snapshots if stored else None,
        stored_bytes=stored.stored_bytes if stored else None,
        objects=dict(stored.objects) if stored else None,
        locks=len(locks), oldest_lock_age=oldest,
        uploaded_bytes=activity.uploaded_bytes, uploaded_objects=activity.uploaded_objects,
        last_upload_at=activity.last_upload_at,
        restored_bytes=activity.restored_bytes, last_restore_at=activity.last_restore_at,
        refused=dict(activity.refused),
        scanned_at=stored.scanned_at if stored else None,
        stale=last is None or now - last > STALE_AFTER,
        old_lock=oldest is not None and oldest > OLD_LOCK_AFTER,
        quota_bytes=quota.quota if quota else None,
        quota_used_bytes=quota.used if quota else None,
        quota_level=quota.level if quota and quota.quota is not None else 0,
    )


def build_report(
    *,
    node_id: str,
    now: float,
    served_here: set[str],
    activity: Mapping[RepositoryKey, Activity],
    stored: Mapping[RepositoryKey, StoredFigures],
    spaces: Mapping[str, Space],
    module_ids: Mapping[str, str],  # module uuid -> module id
    destinations: Iterable[DestinationHealth],
    last_scan_at: float | None,
    quotas: Mapping[RepositoryKey, QuotaView] | None = None,
) -> Report:
    quotas = quotas or {}
    keys = sorted(k for k in {*activity, *stored} if k.destination in served_here)
    repositories = tuple(
        repository_status(k, module_ids.get(k.uuid), activity.get(k), stored.get(k), now,
                          quotas.get(k))
        for k in keys)
    dests = []
    for health in sorted(destinations, key=lambda d: d.uuid):
        space = spaces.get(health.uuid)
        dests.append(DestinationStatus(
            uuid=health.uuid, name=health.name, provider=health.provider,
            served=health.served, state=health.state,
            peer=_text(health.where.get("peer")),
            peer_address=_text(health.where.get("peer_address")),
            total_bytes=space.total if space else None,
            free_bytes=space.free if space else None,
        ))
    return Report(node_id, now, last_scan_at, repositories, tuple(dests))


def _text(value: object) -> str | None:
    return None if value is None else str(value)
