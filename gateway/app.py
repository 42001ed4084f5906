"""The gateway's composition root: builds the parts, wires them together, runs and stops.

Each request goes through `gateway.pipeline` (spec section 4, in order); what its stages
use of this node is `pipeline.exchange.Services`, which this class gives them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from pathlib import Path

from backends.liveness import Watchdog
from backends.manager import CHILD_DRAIN_GRACE, CHILD_DRAIN_MARGIN, BackendManager
from backends.rclone_conf import RenderedConfig
from gateway.access.throttle import LoginThrottle
from gateway.cluster.reachability import Reachability
from gateway.cluster.redis_source import RedisSource
from gateway.cluster.reloader import Reloader
from gateway.cluster.serving import Serving
from gateway.cluster.state import ClusterState
from gateway.edge.admission import guarded_protocol_factory
from gateway.edge.hangup import HangupWatch
from gateway.edge.logs import AccessLog
from gateway.edge.sd_notify import Notifier
from gateway.edge.server import GatewayServer
from gateway.edge.shutdown import drain_connections
from gateway.forwarding.peers import PeerGateways
from gateway.forwarding.proxy import HELD_PIECE
from gateway.insight.backups import BackupInsight
from gateway.insight.metrics import ReportCollector
from gateway.insight.record import Recorder
from gateway.insight.scan import Scanner, served_layout
from gateway.limits.limiter import Limiter
from gateway.limits.metrics import LimitsCollector
from gateway.pipeline.exchange import LocalBackends
from gateway.pipeline.handler import Pipeline
from gateway.settings import Settings
from gateway.status.metrics import GatewayMetrics
from gateway.status.node import NodeStatusReader

log = logging.getLogger("rclone_gateway")


class Gateway:
    """The parts of one node's gateway, wired; what the stages use of them (`Services`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = False
        self.source = RedisSource(settings.redis_url, resync_interval=settings.resync_interval)
        manager = self.manager = BackendManager(
            settings.runtime_dir, settings.rclone, drain_grace=settings.drain_grace,
            # a replaced child keeps its requests until they finish or time out (504), but
            # it was replaced because it stopped answering: not for the whole 5 minutes a
            # healthy child gets to answer
            child_drain_grace=min(settings.backend_timeout + CHILD_DRAIN_MARGIN,
                                  CHILD_DRAIN_GRACE),
        )
        self.backends = LocalBackends(manager, f"@node{settings.node_id}",
                                      settings.backend_timeout)
        self.watchdog = Watchdog(manager, settings.liveness)
        self.throttle = LoginThrottle()
        self.access_log = AccessLog()
        self.hangups = HangupWatch()
        self.systemd = Notifier()
        reachability = Reachability(interval=settings.remote_probe_interval,
                                    fast_interval=settings.remote_probe_fast_interval,
                                    probe_timeout=settings.remote_probe_timeout)
        self.serving = Serving(manager, reachability, self._state, rclone=settings.rclone,
                               probe_dir=settings.runtime_dir / "probes")
        self.peers = PeerGateways(settings.node_id, self._state,
                                  probe_interval=settings.probe_interval,
                                  probe_timeout=settings.probe_timeout,
                                  backend_timeout=settings.backend_timeout)
        self.reloader = Reloader(
            manager, node_id=settings.node_id, local_repo=settings.local_repo,
            check_timeout=settings.remote_check_timeout, on_serving=self._serving_config,
        )
        self.source.on_change(self.reloader.on_state)
        self.limits = Limiter(self._state)
        self.source.on_change(self.limits.on_state)
        status = NodeStatusReader(
            settings.node_id, backends=manager, source=self.source, serving=self.serving,
            peers=self.peers, reloader=self.reloader, inflight=lambda: self.pipeline.inflight)
        self.node_status = status.read
        self.metrics = GatewayMetrics(self.node_status)
        scanner = Scanner(settings.rclone, functools.partial(served_layout, manager),
                          manager.child_env(), interval=settings.scan_interval,
                          on_listing=self.limits.listing_started,
                          on_full_scan=self.limits.full_scan_ended)
        self.insight = BackupInsight(
            settings.node_id, Recorder(), scanner, serving=self.serving, state=self._state,
            destinations=status.destinations, quotas=self.limits.quota_views,
            count_listed=self.limits.listed)
        scanner.on_scanned = self.insight.listed
        self.metrics.registry.register(ReportCollector(self.insight.report))
        self.metrics.registry.register(LimitsCollector(self.limits))
        self.pipeline = Pipeline(self)

    def _state(self) -> ClusterState | None:
        return self.source.state

    def cluster_state(self) -> ClusterState:
        return self.source.state or ClusterState()

    def _serving_config(self, rendered: RenderedConfig) -> None:
        """The backends serve a new configuration: its placement is where destinations are
        served from now."""
        if rendered.placement.local != self.serving.placement.local:
            self.insight.scan_all_soon()  # destinations came or went
        self.serving.placement = rendered.placement
        if self.serving.ready():
            self.systemd.serving()

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
        self.insight.scanner.start()
        self.limits.start()
        try:
            await self.source.load()
        except Exception as exc:
            log.warning("first read of Redis failed (%s); retrying", type(exc).__name__)
        self.source.start()
        self.source.request_resync()
        self.peers.start()
        self.serving.start()

        await stop.wait()
        log.info("stopping: no new connections, finishing in-flight requests")
        self.systemd.stopping()
        self.stopping = True
        await drain_connections(listener, server, lambda: self.pipeline.inflight,
                                self.settings.shutdown_grace)
        await self.reloader.close()
        await self.source.close()
        await self.peers.close()
        await self.serving.close()
        await self.watchdog.close()
        await self.insight.scanner.close()
        await self.limits.close()
        await self.manager.stop()
        self.hangups.close()
        self.access_log.flush()
        log.info("stopped")
        return 0

    def _on_sigusr1(self) -> None:
        log.info("SIGUSR1: listing the storage again")
        self.insight.scan_all_soon()

    def _on_sighup(self) -> None:
        log.info("SIGHUP: re-reading Redis and reloading")
        self.reloader.retry_now()
        self.source.request_resync(notify=True)


def prepare_runtime_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
