"""The gateway's composition root: wiring, run and stop, the health document and metrics.

Each request goes through `gateway.pipeline` (spec section 4, in order); this class
builds the parts it uses and keeps the node's state it asks about.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

from backends.liveness import Watchdog
from backends.manager import CHILD_DRAIN_GRACE, CHILD_DRAIN_MARGIN, BackendManager
from backends.rclone_conf import Placement, RenderedConfig, section_body
from backends.remote_check import check_remote
from gateway import __version__
from gateway.access.repository import RepositoryKey
from gateway.access.throttle import LoginThrottle
from gateway.cluster.reachability import Reachability
from gateway.cluster.redis_source import RedisSource
from gateway.cluster.reloader import Reloader
from gateway.cluster.state import ClusterState
from gateway.edge.admission import guarded_protocol_factory
from gateway.edge.hangup import HangupWatch
from gateway.edge.logs import AccessLog
from gateway.edge.sd_notify import Notifier
from gateway.edge.server import GatewayServer
from gateway.edge.shutdown import drain_connections
from gateway.forwarding.peers import PeerGateways, where_served
from gateway.forwarding.proxy import HELD_PIECE
from gateway.insight.metrics import ReportCollector
from gateway.insight.record import Recorder
from gateway.insight.report import Report, build_report
from gateway.insight.scan import Layout, Scanner, StoredFigures
from gateway.limits.limiter import Limiter
from gateway.limits.metrics import LimitsCollector
from gateway.pipeline.handler import Pipeline
from gateway.settings import Settings
from gateway.status.metrics import GatewayMetrics
from gateway.status.model import BackendStatus, DestinationHealth, NodeStatus, RedisHealth, Replaced

log = logging.getLogger("rclone_gateway")



class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.source = RedisSource(settings.redis_url, resync_interval=settings.resync_interval)
        self.backends = BackendManager(
            settings.runtime_dir, settings.rclone, drain_grace=settings.drain_grace,
            # a replaced child keeps its requests until they finish or time out (504), but
            # it was replaced because it stopped answering: not for the whole 5 minutes a
            # healthy child gets to answer
            child_drain_grace=min(settings.backend_timeout + CHILD_DRAIN_MARGIN,
                                  CHILD_DRAIN_GRACE),
        )
        self.watchdog = Watchdog(self.backends, settings.liveness)
        self.placement = Placement()
        self.throttle = LoginThrottle()
        self.stopping = False
        self.started = time.time()
        self.label_suffix = f"@node{settings.node_id}"
        self.metrics = GatewayMetrics(self.node_status)
        self.access_log = AccessLog()
        self.hangups = HangupWatch()
        self.systemd = Notifier()
        self.reachability = Reachability(interval=settings.remote_probe_interval,
                                         fast_interval=settings.remote_probe_fast_interval,
                                         probe_timeout=settings.remote_probe_timeout)
        self.peers = PeerGateways(settings.node_id, lambda: self.source.state,
                                  probe_interval=settings.probe_interval,
                                  probe_timeout=settings.probe_timeout,
                                  backend_timeout=settings.backend_timeout)
        self.reloader = Reloader(
            self.backends, node_id=settings.node_id, local_repo=settings.local_repo,
            check_timeout=settings.remote_check_timeout, on_serving=self._serving_config,
        )
        self.source.on_change(self.reloader.on_state)
        self.recorder = Recorder()
        self.limits = Limiter(lambda: self.source.state)
        self.source.on_change(self.limits.on_state)
        self.scanner = Scanner(settings.rclone, self._layout, self.backends.child_env(),
                               interval=settings.scan_interval,
                               on_scanned=self._listed,
                               on_listing=self.limits.listing_started,
                               on_full_scan=self.limits.full_scan_ended)
        self.metrics.registry.register(ReportCollector(self.report))
        self.metrics.registry.register(LimitsCollector(self.limits))
        self.pipeline = Pipeline(self)

    # --- configuration -------------------------------------------------------------------

    def _serving_config(self, rendered: RenderedConfig) -> None:
        if rendered.placement.local != self.placement.local:
            self.scanner.scan_all_soon()  # destinations came or went
        self.placement = rendered.placement
        if self.serving():
            self.systemd.serving()

    # --- where destinations are served ---------------------------------------------------

    def destination_healthy(self, uuid: str) -> bool:
        """Served here with every backend answering: what peers ask with the probe."""
        generation = self.backends.current
        return (
            uuid in self.placement.local and generation is not None and generation.healthy
        )

    def served_here(self, uuid: str) -> bool:
        """Whether this node serves `uuid` now; requests for any other go to a peer.

        One child restarting does not move a destination away: the requests for that
        child wait for it (`pipeline.dispatch`), the others go on.
        """
        return (uuid in self.placement.local and self.backends.current is not None
                and self.reachability.reachable(uuid))

    def remote_destinations(self) -> list[str]:
        """Destinations served here whose storage is not this node's own disk."""
        state = self.source.state or ClusterState()
        return [uuid for uuid in self.placement.local
                if uuid in state.destinations and state.destinations[uuid].provider != "cluster"]

    def is_remote(self, uuid: str) -> bool:
        """Served here from storage that is not this node's own disk."""
        state = self.source.state or ClusterState()
        dest = state.destinations.get(uuid)
        return uuid in self.placement.local and dest is not None and dest.provider != "cluster"

    def observe_status(self, uuid: str | None, status: int) -> None:
        """A backend's answer (or failure) for `uuid`: whether its remote storage is reached."""
        if uuid is not None and self.is_remote(uuid):
            self.reachability.observe(uuid, status)

    async def _probe_remote(self, uuid: str) -> str | None:
        """One listing of a remote destination's root, alone (a reachability probe): None
        when its storage answered, else why not (no secrets)."""
        state = self.source.state or ClusterState()
        dest = state.destinations.get(uuid)
        if dest is None:
            return None
        return await check_remote(
            self.settings.rclone, uuid, section_body(dest.rclone_section or ""), dest.basepath,
            workdir=self.settings.runtime_dir / "probes", env=self.backends.child_env(),
            timeout=self.settings.remote_probe_timeout)

    # --- health, metrics and status ------------------------------------------------------

    def serving(self) -> bool:
        generation = self.backends.current
        return generation is not None and generation.healthy

    def node_status(self) -> NodeStatus:
        generation = self.backends.current
        state = self.source.state
        backends: list[BackendStatus] = []
        if generation is not None:
            for backend, child in generation.children.items():
                replaced = self.backends.last_replacement.get(backend)
                backends.append(BackendStatus(
                    backend.value, child.state, child.pid, child.restarts, generation.number,
                    child.missed_checks, self.backends.replacements[backend],
                    None if replaced is None else Replaced(
                        replaced.reason, replaced.at, replaced.old_pid, replaced.new_pid)))
        destinations: list[DestinationHealth] = []
        if state is not None:
            for uuid, dest in sorted(state.destinations.items()):
                served = self.served_here(uuid)
                entry = where_served(served, self.placement, self.reachability.reason(uuid), uuid,
                                     None if served else self.peers.route_for(dest))
                if not served and uuid in self.placement.invalid:
                    entry.update(self.reloader.destination_problem(uuid) or {})
                destinations.append(DestinationHealth(uuid, dest.name, dest.provider, entry))
        if not self.serving():
            status = "down"
        elif not self.source.status.connected or any(b.missed_checks for b in backends):
            status = "degraded"
        else:
            status = "ok"
        redis = self.source.status
        return NodeStatus(
            status=status, node_id=self.settings.node_id, version=__version__,
            uptime=round(time.time() - self.started, 3),
            redis=RedisHealth(redis.connected, redis.last_sync, redis.last_error,
                              redis.down_since),
            backends=tuple(backends), destinations=tuple(destinations),
            peers=self.peers.report(), inflight=self.pipeline.inflight,
            reloads=self.backends.reloads,
        )

    def health_document(self) -> dict[str, object]:
        return self.node_status().document()

    def _listed(self, key: RepositoryKey, figures: StoredFigures) -> None:
        self.recorder.listed(key)
        if self.limits.listed(key, figures.stored_bytes):
            self.scanner.scan_soon(key)  # written to while listed: the count may be off

    def _layout(self) -> Layout | None:
        generation = self.backends.current
        if generation is None:
            return None
        return Layout(generation.directory / "rclone.conf", generation.config.tree_root,
                      dict(generation.config.placement.local))

    def report(self) -> Report:
        state = self.source.state or ClusterState()
        return build_report(
            node_id=self.settings.node_id, now=time.time(),
            served_here={uuid for uuid in self.placement.local if self.served_here(uuid)},
            activity=self.recorder.repositories, stored=self.scanner.stored,
            spaces=self.scanner.spaces,
            module_ids={uuid: module for module, uuid in state.module_uuids.items()},
            destinations=self.node_status().destinations,
            last_scan_at=self.scanner.last_full_scan,
            quotas={view.key: view for view in self.limits.quota_views()},
        )

    # --- life cycle ----------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGUSR1, self._on_sigusr1)

        server = GatewayServer(self.pipeline.handle, handler_cancellation=True, access_log=None,
                               read_bufsize=HELD_PIECE)
        factory = guarded_protocol_factory(
            server, max_connections=self.settings.max_connections,
            header_timeout=self.settings.header_timeout,
        )
        listener = await loop.create_server(
            factory, self.settings.listen_host, self.settings.listen_port,
            reuse_address=True, backlog=1024,
        )
        log.info("listening on %s:%d", self.settings.listen_host, self.settings.listen_port)
        self.reloader.start()
        self.watchdog.start()
        self.scanner.start()
        self.limits.start()
        try:
            await self.source.load()
        except Exception as exc:
            log.warning("first read of Redis failed (%s); retrying", type(exc).__name__)
        self.source.start()
        self.source.request_resync()
        self.peers.start()
        self.reachability.start(self.remote_destinations, self._probe_remote)

        await stop.wait()
        log.info("stopping: no new connections, finishing in-flight requests")
        self.systemd.stopping()
        self.stopping = True
        await drain_connections(listener, server, lambda: self.pipeline.inflight,
                                self.settings.shutdown_grace)
        await self.reloader.close()
        await self.source.close()
        await self.peers.close()
        await self.reachability.close()
        await self.watchdog.close()
        await self.scanner.close()
        await self.limits.close()
        await self.backends.stop()
        self.hangups.close()
        self.access_log.flush()
        log.info("stopped")
        return 0

    def _on_sigusr1(self) -> None:
        log.info("SIGUSR1: listing the storage again")
        self.scanner.scan_all_soon()

    def _on_sighup(self) -> None:
        log.info("SIGHUP: re-reading Redis and reloading")
        self.reloader.retry_now()
        self.source.request_resync(notify=True)


def prepare_runtime_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
