"""What the gateway learns about each repository from the requests it serves.

Pure bookkeeping, no I/O: the request path hands over each finished exchange with
the canonical target, and the recorder keeps, per module repository
(`/<destination>/<app>/<uuid>`), the last successful snapshot upload, the bytes and
objects uploaded, restores, the locks it saw created and not yet removed, and
refused requests by reason. Memory is bounded by the number of repositories, which
only callers that passed authentication can name inside a served destination.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from gateway.access.paths import Target
from gateway.access.repository import METADATA_SUFFIX, RepositoryAddress, RepositoryKey

# Reasons kept per repository: beyond this many distinct ones, the rest count as "other".
MAX_REASONS = 32
MAX_REPOSITORIES = 10_000
MAX_REMOVED_LOCKS = 1024


def recorded_under(where: RepositoryAddress) -> RepositoryKey:
    """The key a target's exchanges are recorded under: its repository's. A module's
    metadata file `<uuid>.json` is kept, as it was before the address was parsed in one
    place, under a key of its own name: a refusal of it shows as a repository of that
    name in the report. Whether it should count under its repository is still open."""
    key = where.key
    if where.metadata:
        return RepositoryKey(key.destination, key.app, key.uuid + METADATA_SUFFIX)
    return key


@dataclass
class Activity:
    """What requests through this gateway did to one repository since it started."""

    last_snapshot_at: float | None = None  # wall clock of the last snapshot upload answered 2xx
    uploaded_bytes: int = 0
    uploaded_objects: int = 0
    last_upload_at: float | None = None
    restored_bytes: int = 0
    last_restore_at: float | None = None
    # Locks created and removed through this gateway since the storage was last listed.
    locks: dict[str, float] = field(default_factory=dict)  # lock id -> when it was created
    removed_locks: set[str] = field(default_factory=set)
    refused: Counter[str] = field(default_factory=Counter)

    def refuse(self, reason: str) -> None:
        if reason not in self.refused and len(self.refused) >= MAX_REASONS:
            reason = "other"
        self.refused[reason] += 1


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """One finished request, as far as insight cares."""

    target: Target
    method: str
    status: int
    allowed: bool
    reason: str
    is_node: bool
    bytes_in: int
    bytes_out: int
    at: float  # wall clock


class Recorder:
    def __init__(self) -> None:
        self.repositories: dict[RepositoryKey, Activity] = {}

    def activity(self, key: RepositoryKey) -> Activity | None:
        return self.repositories.get(key)

    def listed(self, key: RepositoryKey) -> None:
        """The storage of `key` was just listed: it now tells its locks."""
        entry = self.repositories.get(key)
        if entry is not None:
            entry.locks.clear()
            entry.removed_locks.clear()

    def _entry(self, key: RepositoryKey) -> Activity | None:
        entry = self.repositories.get(key)
        if entry is None:
            if len(self.repositories) >= MAX_REPOSITORIES:
                return None
            entry = self.repositories[key] = Activity()
        return entry

    def record(self, exchange: FinishedRequest) -> RepositoryKey | None:
        """Takes one exchange in; returns the repository it ended a snapshot upload of."""
        where = exchange.target.address
        if where is None:
            return None
        key = recorded_under(where)
        if not exchange.allowed:
            entry = self._entry(key)
            if entry is not None:
                entry.refuse(exchange.reason)
            return None
        if not 200 <= exchange.status < 300:
            return None
        method, kind = exchange.method, where.object_type
        if method == "POST" and (where.object_id is not None or where.is_config):
            entry = self._entry(key)
            if entry is None:
                return None
            entry.uploaded_bytes += exchange.bytes_in
            entry.uploaded_objects += 1
            entry.last_upload_at = exchange.at
            if kind == "locks" and where.object_id is not None:
                entry.locks[where.object_id] = exchange.at
                entry.removed_locks.discard(where.object_id)
            elif kind == "snapshots":
                entry.last_snapshot_at = exchange.at
                return key
        elif method == "DELETE" and kind == "locks" and where.object_id is not None:
            entry = self.repositories.get(key)
            if entry is not None:
                entry.locks.pop(where.object_id, None)
                if len(entry.removed_locks) < MAX_REMOVED_LOCKS:
                    entry.removed_locks.add(where.object_id)
        elif (method == "GET" and kind == "data" and where.object_id is not None
              and not exchange.is_node):
            entry = self._entry(key)
            if entry is not None:
                entry.restored_bytes += exchange.bytes_out
                entry.last_restore_at = exchange.at
        return None
