"""The state of this node's gateway as one typed model: `/health` renders it as JSON, and
`/metrics` (gateway.status.metrics.live_families) and the backup report read its fields, not
the keys of a document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Replaced:
    reason: str
    at: float  # wall clock
    old_pid: int | None
    new_pid: int | None


@dataclass(frozen=True, slots=True)
class BackendStatus:
    name: str  # restic, restic-append-only, webdav
    state: str  # starting, running, restarting, failed, stopped
    pid: int | None
    restarts: int  # of this child (it exited), in the current generation
    generation: int
    missed_checks: int  # liveness checks missed in a row
    replacements: int  # children of this kind replaced since start
    last_replacement: Replaced | None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def answering(self) -> bool:
        return self.missed_checks == 0

    def document(self) -> dict[str, object]:
        last = self.last_replacement
        return {
            "state": self.state, "pid": self.pid, "restarts": self.restarts,
            "generation": self.generation, "answering": self.answering,
            "missed_checks": self.missed_checks, "replacements": self.replacements,
            "last_replacement": None if last is None else {
                "reason": last.reason, "at": last.at, "old_pid": last.old_pid,
                "new_pid": last.new_pid},
        }


@dataclass(frozen=True, slots=True)
class DestinationHealth:
    uuid: str
    name: str
    provider: str
    # where it is served (gateway.forwarding.peers.where_served): state, served, and peer, reason or
    # error, retry details; the keys vary with the case
    where: dict[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> str:
        return str(self.where.get("state", ""))

    @property
    def served(self) -> str:
        return str(self.where.get("served", ""))

    @property
    def served_by_peer(self) -> bool:
        return self.served != "here" and self.state == "forwarded"

    def document(self) -> dict[str, object]:
        return {"name": self.name, "provider": self.provider, **self.where}


@dataclass(frozen=True, slots=True)
class RedisHealth:
    connected: bool
    last_sync: float | None
    last_error: str | None
    down_since: float | None


@dataclass(frozen=True, slots=True)
class NodeStatus:
    status: str  # ok, degraded, down
    node_id: str
    version: str
    uptime: float
    redis: RedisHealth
    backends: tuple[BackendStatus, ...]
    destinations: tuple[DestinationHealth, ...]
    peers: dict[str, object]
    inflight: int
    reloads: int

    @property
    def serving(self) -> bool:
        return self.status in ("ok", "degraded")

    @property
    def generation(self) -> int:
        return max((b.generation for b in self.backends), default=0)

    def document(self) -> dict[str, object]:
        """The JSON of `/health`."""
        redis = self.redis
        return {
            "status": self.status,
            "node_id": self.node_id,
            "version": self.version,
            "uptime": self.uptime,
            "redis": {"connected": redis.connected, "last_sync": redis.last_sync,
                      "last_error": redis.last_error, "down_since": redis.down_since},
            "backends": {b.name: b.document() for b in self.backends},
            "destinations": {d.uuid: d.document() for d in self.destinations},
            "peers": self.peers,
            "inflight": self.inflight,
            "reloads": self.reloads,
        }
