"""The gateway: checks each request in the order of spec section 4, then streams it to a backend."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import ClientSession, web

from backends.liveness import LivenessSettings, Watchdog
from backends.manager import CHILD_DRAIN_MARGIN, BackendManager, Generation
from backends.process import http_ready
from backends.rclone_conf import Placement, RenderedConfig
from gateway import __version__
from gateway.cluster import ClusterState, is_trusted_source
from gateway.connections import guarded_protocol_factory
from gateway.credentials import parse_basic, password_digest, verify_digest
from gateway.http_errors import GatewayServer, head_too_large
from gateway.insight.metrics import ReportCollector
from gateway.insight.page import html_page
from gateway.insight.record import Exchange, Recorder
from gateway.insight.report import Report, build_report
from gateway.insight.scan import SCAN_INTERVAL, Layout, Scanner
from gateway.lifecycle import close_after_response, drain_connections
from gateway.logs import AccessLog, access_level, access_line
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import GatewayMetrics
from gateway.paths import PathError, Target, canonicalise
from gateway.peers import PeerGateways, where_served
from gateway.policy import (
    Backend,
    Caller,
    Decision,
    Request,
    decide,
    detect_protocol,
    module_caller,
    node_caller,
)
from gateway.proxy import (
    BACKEND_IDLE_TIMEOUT,
    Transfer,
    UpstreamError,
    forward,
    plain,
    request_body,
)
from gateway.reachability import Reachability
from gateway.redis_source import RedisSource
from gateway.reloader import Reloader
from gateway.repair import (
    COMPLETE,
    REMOVED,
    discard_partial_upload,
    is_restic_upload,
    refused_upload_hook,
)
from gateway.sd_notify import Notifier
from gateway.throttle import LoginThrottle, credential_key
from gateway.uploads import (
    DigestMismatch,
    UploadCheck,
    expected_digest,
    object_exists,
    wait_until_absent,
)
from gateway.upstream import BodyFailed
from gateway.webdav_headers import RULE as REFERENCES_RULE
from gateway.webdav_headers import HeaderRefused, references_of

log = logging.getLogger("rclone_gateway")

REALM = 'Basic realm="ns8-rclone-gateway"'
PROBE_SEGMENT = "_probe_rest_404"
# Seconds a request waits for its backend child to come back from a restart before 503.
CHILD_RESTART_WAIT = 5.0
# Seconds the WebDAV child has to answer OPTIONS when a remote probe through it timed out.
LOCAL_ANSWER_TIMEOUT = 2.0
# Bytes of a request body read ahead per connection: enough for a PUT to keep flowing
# while this process waits for the CPU, small enough for 2048 connections.
READ_BUFSIZE = 512 * 1024


@dataclass
class Settings:
    listen_host: str = "0.0.0.0"
    listen_port: int = 4694
    redis_url: str = "redis://127.0.0.1:6379/0"
    node_id: str = "1"
    local_repo: Path = Path("/srv/repo")
    runtime_dir: Path = Path("/run/rclone-gateway")
    rclone: str = "rclone"
    max_connections: int = 2048
    header_timeout: float = 5.0
    shutdown_grace: float = 30.0
    drain_grace: float = 600.0
    resync_interval: float = 60.0
    probe_interval: float = 2.0  # peer gateways
    probe_timeout: float = 4.0
    remote_probe_interval: float = 10.0  # remote storage served here (costs a listing)
    remote_check_timeout: float = 15.0
    backend_timeout: float = BACKEND_IDLE_TIMEOUT  # backend silence before 504
    liveness: LivenessSettings = field(default_factory=LivenessSettings)
    scan_interval: float = SCAN_INTERVAL  # seconds between full listings of the storage


@dataclass
class Outcome:
    """What the access log says about one request."""

    # Read when the request starts: a connection the client cut has no address by the end.
    source: str | None = None
    user: str = "-"
    caller: str = "anonymous"  # caller group once authenticated: node or module
    protocol: str = "-"
    decision: str = "-"
    rule: str = "-"
    reason: str = "-"
    backend: str = "-"
    path: str = "-"
    transfer: Transfer = field(default_factory=Transfer)
    target: Target | None = None  # once canonical
    is_node: bool = False
    served_here: bool = False  # sent to a backend of this node (not refused, not to a peer)


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.source = RedisSource(settings.redis_url, resync_interval=settings.resync_interval)
        self.backends = BackendManager(
            settings.runtime_dir, settings.rclone, drain_grace=settings.drain_grace,
            # a replaced child keeps its requests until they finish or time out (504)
            child_drain_grace=settings.backend_timeout + CHILD_DRAIN_MARGIN,
        )
        self.watchdog = Watchdog(self.backends, settings.liveness)
        self.placement = Placement()
        self.inflight = 0
        self.throttle = LoginThrottle()
        self.stopping = False
        self.started = time.time()
        self.label_suffix = f"@node{settings.node_id}"
        self.metrics = GatewayMetrics(self.health_document)
        self.access_log = AccessLog()
        self.systemd = Notifier()
        self.reachability = Reachability(probe_interval=settings.remote_probe_interval,
                                         probe_timeout=settings.probe_timeout)
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
        self.scanner = Scanner(settings.rclone, self._layout, self.backends.child_env(),
                               interval=settings.scan_interval,
                               on_scanned=lambda key, _: self.recorder.listed(key))
        self.metrics.registry.register(ReportCollector(self.report))

    # --- configuration -------------------------------------------------------------------

    def _serving_config(self, rendered: RenderedConfig) -> None:
        if rendered.placement.local != self.placement.local:
            self.scanner.scan_all_soon()  # destinations came or went
        self.placement = rendered.placement
        if self.serving():
            self.systemd.serving()

    # --- request handling ----------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        outcome = Outcome()
        response: web.StreamResponse | None = None
        self.inflight += 1
        try:
            response = await self._handle(request, outcome)
            return response
        except asyncio.CancelledError:  # aiohttp cancels the handler of a client that left
            outcome.reason = self._cut_reason()
            raise
        finally:
            self.inflight -= 1
            status = response.status if response is not None else 499
            self.metrics.observe(
                caller=outcome.caller, protocol=outcome.protocol, method=request.method,
                decision=outcome.decision, status=status, duration=time.monotonic() - started,
                bytes_in=outcome.transfer.bytes_in, bytes_out=outcome.transfer.bytes_out,
                reason=outcome.reason,
            )
            if outcome.target is not None:
                self._record(request, outcome, status)
            if self.stopping:
                close_after_response(request)
            self._log(request, outcome, response, started)

    async def _handle(self, request: web.BaseRequest, outcome: Outcome) -> web.StreamResponse:
        state = self.source.state or ClusterState()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        source = outcome.source = peer[0] if peer else None
        if not is_trusted_source(source, state.networks):
            outcome.reason = "source address not allowed"
            return plain(403, "source address not allowed")

        if head_too_large(request):
            outcome.reason = "request head too large"
            return plain(431, "request head too large")

        raw = request.raw_path
        if raw in ("/health", "/health/"):
            outcome.path = raw
            return self._health(request)
        if raw in ("/metrics", "/metrics/"):
            outcome.path = raw
            return self._metrics(request)

        try:
            target = canonicalise(raw)
        except PathError as exc:
            outcome.reason = str(exc)
            return plain(400, f"bad request target: {exc}")
        outcome.path = target.display
        outcome.target = target

        if self._is_probe(request, target):
            outcome.rule = "probe"
            return self._probe(target)

        caller = await self._authenticate(request, source or "", state, outcome)
        if isinstance(caller, web.Response):
            return caller
        outcome.user = caller.user
        outcome.caller = caller.group
        outcome.is_node = caller.is_node
        if raw in ("/status", "/status/"):
            return self._status(request, caller.is_node)

        protocol = detect_protocol(request.headers.get("Accept", ""), target.query)
        outcome.protocol = protocol.value
        described = Request(caller, protocol, request.method, target, request.headers.get("Depth"))
        decision = decide(described)
        self._decided(outcome, decision)
        if not decision.allowed:
            return plain(403, f"forbidden: {decision.reason}")
        assert decision.backend is not None
        try:  # WebDAV: the paths named in Destination (COPY, MOVE) and If
            references = references_of(described, request.headers)
        except HeaderRefused as exc:
            outcome.decision, outcome.rule, outcome.reason = "deny", REFERENCES_RULE, exc.reason
            return plain(exc.status, exc.text)

        upload: UploadCheck | None = None
        if (expected := expected_digest(described)) is not None:
            upload = UploadCheck(expected)
            refusal = _refuse_upload(request, upload, outcome)
            if refusal is not None:
                return refusal

        uuid = target.segments[0] if target.segments else None
        if uuid is not None and not self.served_here(uuid):
            dest = state.destinations.get(uuid)
            if dest is None:
                return plain(404, "unknown destination")
            answer = await self.peers.serve(request, target, dest, source, outcome.transfer,
                                            references)
            outcome.backend = answer.backend
            if answer.refused:
                outcome.reason = answer.reason
            return answer.response

        generation = self.backends.current
        if generation is None or not generation.children[decision.backend].ready:
            generation = await self._ready_generation(decision.backend)
            if generation is None:
                return plain(503, "backend unavailable", {"Retry-After": "2"})

        label = decision.backend.value + self.label_suffix
        outcome.backend = label
        outcome.served_here = True
        # Counted before the first await: a reload now retires this generation only after us.
        with generation.use():
            session = generation.session(decision.backend)
            restic_upload = is_restic_upload(request.method, decision.backend, target)
            on_status = refused_upload_hook(generation, target, outcome) if restic_upload else None
            if upload is not None and await object_exists(session, target):
                return await self._existing_object(request, generation, target, upload, outcome)

            if request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                response = await forward(
                    request, target, generation.pool(decision.backend), label,
                    outcome.transfer, body_filter=upload.filter if upload else None,
                    idle_timeout=self.settings.backend_timeout,
                    on_status=on_status, references=references,
                )
            except BodyFailed as exc:
                if isinstance(exc.cause, DigestMismatch):
                    outcome.reason = "upload does not match its object name"
                    if not await wait_until_absent(session, target):
                        outcome.reason += await discard_partial_upload(generation, target)
                    return plain(400, "body does not match the object name (sha256)")
                outcome.reason = self._cut_reason()
                return web.Response(status=499, reason="Client Closed Request")
            except UpstreamError as exc:
                outcome.reason = exc.reason
                self._observe(uuid, exc.status)
                if exc.status == 502 and restic_upload:
                    outcome.reason += await discard_partial_upload(generation, target)
                return plain(exc.status, exc.reason, {"Retry-After": "2"})
            self._observe(uuid, response.status)
            return response

    async def _existing_object(
        self, request: web.BaseRequest, generation: Generation, target: Target,
        upload: UploadCheck, outcome: Outcome,
    ) -> web.StreamResponse:
        """A module upload over an object that exists: what the append-only server would
        answer, decided without sending it the body."""
        note = await discard_partial_upload(generation, target)
        if note == REMOVED:
            outcome.reason = "object left partial by an earlier upload" + REMOVED
            return plain(503, "partial object removed; retry", {"Retry-After": "1"})
        if note == COMPLETE:
            # restic retries an upload whose answer it lost (a backend or peer died after
            # storing it). Stored bytes and sent bytes both hash to the object's name: they are
            # the same bytes, so the retry succeeds and nothing is written.
            if request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if await upload.body_matches(request_body(request, outcome.transfer)):
                outcome.reason = "object stored already with the same content"
                return plain(200, "object stored already")
        outcome.reason = "object exists already"
        return plain(403, "forbidden: the object exists already (append-only)")

    async def _authenticate(
        self, request: web.BaseRequest, source: str, state: ClusterState, outcome: Outcome
    ) -> Caller | web.Response:
        credentials = parse_basic(request.headers.get("Authorization"))
        if credentials is None:
            outcome.reason = "no credentials"
            return plain(401, "authentication required", {"WWW-Authenticate": REALM})
        user, password = credentials
        outcome.user = user if user in state.users else "unknown"
        now = time.monotonic()
        digest = password_digest(password)
        credential = credential_key(user, digest)
        verdict = self.throttle.check(source, user, now, credential)
        if not verdict.allowed:
            outcome.reason = "too many failed logins"
            return plain(429, "too many failed logins, retry later",
                         {"Retry-After": str(verdict.retry_after)})
        if not verify_digest(state.users, user, digest):
            outcome.reason = "bad credentials"
            delay = self.throttle.failed(source, user, now, credential)
            if delay:
                await asyncio.sleep(delay)
            return plain(401, "authentication required", {"WWW-Authenticate": REALM})
        self.throttle.succeeded(credential)
        if user.startswith("node/"):
            return node_caller(user)
        return module_caller(user, state.module_uuids, state.restore_grants)

    def _cut_reason(self) -> str:
        """Why a request ended before its answer: its client left, or this gateway stops."""
        return "cut: gateway stopping" if self.stopping else "client went away"

    def _record(self, request: web.BaseRequest, outcome: Outcome, status: int) -> None:
        """Insight: what this exchange did to a repository. A request sent on to a peer is
        recorded there, by the node that serves it; a refusal, here."""
        assert outcome.target is not None
        allowed = outcome.decision == "allow"
        if allowed and not outcome.served_here:
            return
        ended = self.recorder.record(Exchange(
            outcome.target, request.method, status, allowed, outcome.reason, outcome.is_node,
            outcome.transfer.bytes_in, outcome.transfer.bytes_out, time.time()))
        if ended is not None:
            self.scanner.scan_soon(ended)

    @staticmethod
    def _decided(outcome: Outcome, decision: Decision) -> None:
        outcome.decision = "allow" if decision.allowed else "deny"
        outcome.rule = decision.rule
        outcome.reason = decision.reason

    # --- probe and health ----------------------------------------------------------------

    @staticmethod
    def _is_probe(request: web.BaseRequest, target: Target) -> bool:
        return (
            request.method in ("GET", "HEAD")
            and len(target.segments) == 2
            and target.segments[1] == PROBE_SEGMENT
            and not target.trailing_slash
            and not target.query
        )

    async def _ready_generation(self, backend: Backend) -> Generation | None:
        """The serving generation once its `backend` child answers, waiting a little.

        A crashed child is back within a second or two; restic gives up on a 503 to the
        first request of a run, so a request for it waits rather than fail at once.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CHILD_RESTART_WAIT
        while True:
            generation = self.backends.current
            if generation is not None and generation.children[backend].ready:
                return generation
            if loop.time() >= deadline or self.stopping:
                return None
            await asyncio.sleep(0.05)

    def destination_healthy(self, uuid: str) -> bool:
        """Served here with every backend answering: what peers ask with the probe."""
        generation = self.backends.current
        return (
            uuid in self.placement.local and generation is not None and generation.healthy
        )

    def served_here(self, uuid: str) -> bool:
        """Whether this node serves `uuid` now; requests for any other go to a peer.

        One child restarting does not move a destination away: the requests for that
        child wait for it (`_ready_generation`), the others go on.
        """
        return (uuid in self.placement.local and self.backends.current is not None
                and self.reachability.reachable(uuid))

    def remote_destinations(self) -> list[str]:
        """Destinations served here whose storage is not this node's own disk."""
        state = self.source.state or ClusterState()
        return [uuid for uuid in self.placement.local
                if uuid in state.destinations and state.destinations[uuid].provider != "cluster"]

    def _observe(self, uuid: str | None, status: int) -> None:
        if uuid is not None and uuid in self.remote_destinations():
            self.reachability.observe(uuid, status)

    def _webdav_session(self) -> ClientSession | None:
        generation = self.backends.current
        if generation is None or not generation.children[Backend.WEBDAV].ready:
            return None
        return generation.session(Backend.WEBDAV)

    async def _webdav_answers(self, session: ClientSession) -> bool:
        """Whether the WebDAV child behind `session` answers (False: it was replaced)."""
        generation = self.backends.current
        if generation is None or generation.sessions.get(Backend.WEBDAV) is not session:
            return False
        child = generation.children[Backend.WEBDAV]
        return child.ready and await http_ready(child.socket_path, LOCAL_ANSWER_TIMEOUT)

    def _probe(self, target: Target) -> web.Response:
        uuid = target.segments[0]
        if self.served_here(uuid) and self.destination_healthy(uuid):
            return plain(404, "not found")
        return plain(503, "destination not served here", {"Retry-After": "5"})

    def serving(self) -> bool:
        generation = self.backends.current
        return generation is not None and generation.healthy

    def health_document(self) -> dict[str, object]:
        generation = self.backends.current
        state = self.source.state
        backends: dict[str, object] = {}
        if generation is not None:
            for backend, child in generation.children.items():
                replaced = self.backends.last_replacement.get(backend)
                backends[backend.value] = {
                    "state": child.state, "pid": child.pid, "restarts": child.restarts,
                    "generation": generation.number,
                    "answering": child.missed_checks == 0,
                    "missed_checks": child.missed_checks,
                    "replacements": self.backends.replacements[backend],
                    "last_replacement": None if replaced is None else {
                        "reason": replaced.reason, "at": replaced.at,
                        "old_pid": replaced.old_pid, "new_pid": replaced.new_pid,
                    },
                }
        destinations: dict[str, object] = {}
        if state is not None:
            for uuid, dest in sorted(state.destinations.items()):
                served = self.served_here(uuid)
                entry = where_served(served, self.placement, self.reachability.reason(uuid), uuid,
                                     None if served else self.peers.route_for(dest))
                if not served and uuid in self.placement.invalid:
                    entry.update(self.reloader.destination_problem(uuid) or {})
                destinations[uuid] = {"name": dest.name, "provider": dest.provider, **entry}
        serving = self.serving()
        if not serving:
            status = "down"
        elif not self.source.status.connected or (generation is not None and any(
                child.missed_checks for child in generation.children.values())):
            status = "degraded"
        else:
            status = "ok"
        return {
            "status": status,
            "node_id": self.settings.node_id,
            "version": __version__,
            "uptime": round(time.time() - self.started, 3),
            "redis": {
                "connected": self.source.status.connected,
                "last_sync": self.source.status.last_sync,
                "last_error": self.source.status.last_error,
                "down_since": self.source.status.down_since,
            },
            "backends": backends,
            "destinations": destinations,
            "peers": self.peers.report(),
            "inflight": self.inflight,
            "reloads": self.backends.reloads,
        }

    def _health(self, request: web.BaseRequest) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return plain(405, "method not allowed", {"Allow": "GET, HEAD"})
        document = self.health_document()
        return web.json_response(document, status=200 if self.serving() else 503)

    def _layout(self) -> Layout | None:
        generation = self.backends.current
        if generation is None:
            return None
        return Layout(generation.directory / "rclone.conf", generation.config.tree_root,
                      dict(generation.config.placement.local))

    def report(self) -> Report:
        state = self.source.state or ClusterState()
        health = self.health_document()
        return build_report(
            node_id=self.settings.node_id, now=time.time(),
            served_here={uuid for uuid in self.placement.local if self.served_here(uuid)},
            activity=self.recorder.repositories, stored=self.scanner.stored,
            spaces=self.scanner.spaces,
            module_ids={uuid: module for module, uuid in state.module_uuids.items()},
            destinations=health["destinations"],  # type: ignore[arg-type]
            last_scan_at=self.scanner.last_full_scan,
        )

    def _status(self, request: web.BaseRequest, is_node: bool) -> web.Response:
        if not is_node:
            return plain(403, "forbidden: /status is for nodes")
        if request.method not in ("GET", "HEAD"):
            return plain(405, "method not allowed", {"Allow": "GET, HEAD"})
        report = self.report()
        if "text/html" in request.headers.get("Accept", ""):
            return web.Response(text=html_page(report), content_type="text/html")
        return web.json_response(report.document())

    def _metrics(self, request: web.BaseRequest) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return plain(405, "method not allowed", {"Allow": "GET, HEAD"})
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": METRICS_CONTENT_TYPE})

    # --- access log ----------------------------------------------------------------------

    def _log(
        self,
        request: web.BaseRequest,
        outcome: Outcome,
        response: web.StreamResponse | None,
        started: float,
    ) -> None:
        status = response.status if response is not None else 499
        level = access_level(status, outcome.decision)
        if not self.access_log.enabled(level):
            return
        self.access_log.write(
            level,
            access_line(
                {
                    "source": outcome.source,
                    "user": outcome.user,
                    "method": request.method,
                    "path": outcome.path,
                    "protocol": outcome.protocol,
                    "decision": outcome.decision,
                    "rule": outcome.rule,
                    "reason": outcome.reason,
                    "status": status,
                    "bytes_in": outcome.transfer.bytes_in,
                    "bytes_out": outcome.transfer.bytes_out,
                    "duration_ms": round((time.monotonic() - started) * 1000, 2),
                    "backend": outcome.backend,
                    # whose answer the status is: a backend's (or a peer's) passed on, or the
                    # gateway's own (a refusal, or a backend that failed to answer)
                    "answered_by": "backend" if response is not None
                    and "X-Gateway-Backend" in response.headers else "gateway",
                },
                time.time(),
            ),
        )

    # --- life cycle ----------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGUSR1, self._on_sigusr1)

        server = GatewayServer(self.handle, handler_cancellation=True, access_log=None,
                               read_bufsize=READ_BUFSIZE)
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
        try:
            await self.source.load()
        except Exception as exc:
            log.warning("first read of Redis failed (%s); retrying", type(exc).__name__)
        self.source.start()
        self.source.request_resync()
        self.peers.start()
        self.reachability.start(self.remote_destinations, self._webdav_session,
                                self._webdav_answers)

        await stop.wait()
        log.info("stopping: no new connections, finishing in-flight requests")
        self.systemd.stopping()
        self.stopping = True
        await drain_connections(listener, server, lambda: self.inflight,
                                self.settings.shutdown_grace)
        await self.reloader.close()
        await self.source.close()
        await self.peers.close()
        await self.reachability.close()
        await self.watchdog.close()
        await self.scanner.close()
        await self.backends.stop()
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


def _refuse_upload(
    request: web.BaseRequest, upload: UploadCheck, outcome: Outcome
) -> web.Response | None:
    """Verified uploads must say their length; an empty one is checked here and now."""
    if request.content_length is None:
        outcome.reason = "upload without Content-Length"
        return plain(411, "Content-Length required for restic object uploads")
    if request.content_length == 0 and not upload.matches_empty_body():
        outcome.reason = "upload does not match its object name"
        return plain(400, "body does not match the object name (sha256)")
    return None


def prepare_runtime_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
