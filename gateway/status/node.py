"""The node's status (gateway.status.model) read from the parts that know it: the backend
children, the Redis source, where each destination is served and through which peer, and
the requests in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from backends.manager import BackendManager
from gateway import __version__
from gateway.cluster.redis_source import RedisSource
from gateway.cluster.reloader import Reloader
from gateway.cluster.serving import Serving
from gateway.forwarding.peers import PeerGateways, where_served
from gateway.status.model import BackendStatus, DestinationHealth, NodeStatus, RedisHealth, Replaced


class NodeStatusReader:
    def __init__(self, node_id: str, *, backends: BackendManager, source: RedisSource,
                 serving: Serving, peers: PeerGateways, reloader: Reloader,
                 inflight: Callable[[], int]) -> None:
        self.node_id = node_id
        self.started = time.time()
        self._backends = backends
        self._source = source
        self._serving = serving
        self._peers = peers
        self._reloader = reloader
        self._inflight = inflight

    def read(self) -> NodeStatus:
        """The node's status now: what `/health`, `/metrics` and `/status` say of it."""
        manager = self._backends
        generation = manager.current
        backends: list[BackendStatus] = []
        if generation is not None:
            for backend, child in generation.children.items():
                replaced = manager.last_replacement.get(backend)
                backends.append(BackendStatus(
                    backend.value, child.state, child.pid, child.restarts, generation.number,
                    child.missed_checks, manager.replacements[backend],
                    None if replaced is None else Replaced(
                        replaced.reason, replaced.at, replaced.old_pid, replaced.new_pid)))
        redis = self._source.status
        if not self._serving.ready():
            status = "down"
        elif not redis.connected or any(b.missed_checks for b in backends):
            status = "degraded"
        else:
            status = "ok"
        return NodeStatus(
            status=status, node_id=self.node_id, version=__version__,
            uptime=round(time.time() - self.started, 3),
            redis=RedisHealth(redis.connected, redis.last_sync, redis.last_error,
                              redis.down_since),
            backends=tuple(backends), destinations=self.destinations(),
            peers=self._peers.report(), inflight=self._inflight(),
            reloads=manager.reloads,
        )

    def destinations(self) -> tuple[DestinationHealth, ...]:
        """Where each destination of the cluster is served: here, by a peer, or not at all."""
        state = self._source.state
        if state is None:
            return ()
        serving, placement = self._serving, self._serving.placement
        found: list[DestinationHealth] = []
        for uuid, dest in sorted(state.destinations.items()):
            served = serving.served_here(uuid)
            entry = where_served(served, placement, serving.unreachable_reason(uuid), uuid,
                                 None if served else self._peers.route_for(dest))
            if not served and uuid in placement.invalid:
                entry.update(self._reloader.destination_problem(uuid) or {})
            found.append(DestinationHealth(uuid, dest.name, dest.provider, entry))
        return tuple(found)
