"""One request on its way through the stages, and what the request path uses of the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

from aiohttp import web

from backends.kinds import Backend
from backends.manager import BackendManager, Generation
from gateway.access.paths import Target
from gateway.access.policy import Caller, Decision, Request
from gateway.access.refusals import Refusal, Refused
from gateway.access.throttle import LoginThrottle
from gateway.access.webdav_headers import References
from gateway.cluster.serving import Serving
from gateway.cluster.state import ClusterState
from gateway.edge.hangup import HangupWatch
from gateway.edge.logs import AccessLog
from gateway.forwarding.peers import PeerGateways
from gateway.forwarding.proxy import (
    NOTHING_ON_THE_WAY,
    BodyFilter,
    BodyHeld,
    Splicing,
    Transfer,
    refuse,
    request_body,
    send_continue,
)
from gateway.insight.backups import BackupInsight
from gateway.limits.limiter import Limiter
from gateway.pipeline.upload import Upload
from gateway.status.metrics import GatewayMetrics
from gateway.status.model import NodeStatus

T = TypeVar("T")


class Services(Protocol):
    """What the request path uses of this node (`app.Gateway` wires it): each stage calls
    one of these, never the parts behind it."""

    stopping: bool  # the gateway stops: cut requests say so, answered connections close
    serving: Serving  # where each destination is served, whether its storage is reached
    backends: LocalBackends  # this node's backend children
    peers: PeerGateways  # requests for a destination served by a peer gateway
    throttle: LoginThrottle  # failed logins
    limits: Limiter  # concurrency caps, quotas, bandwidth
    insight: BackupInsight  # what requests did to each repository, the storage listings
    metrics: GatewayMetrics  # each request counted; the exposition of `/metrics`
    access_log: AccessLog
    hangups: HangupWatch  # a client that hangs up while its body waits unread

    def cluster_state(self) -> ClusterState: ...  # the newest read of Redis
    def node_status(self) -> NodeStatus: ...  # what `/health` says


@dataclass(frozen=True)
class LocalBackends:
    """This node's backend children, as the request path uses them."""

    manager: BackendManager
    label_suffix: str  # of X-Gateway-Backend: "@node<id>"
    timeout: float  # seconds a child may take to start its answer

    @property
    def current(self) -> Generation | None:
        """The generation serving now; None while none is."""
        return self.manager.current

    def label(self, backend: Backend) -> str:
        """What X-Gateway-Backend says of an answer of `backend` here: "restic@node1"."""
        return backend.value + self.label_suffix


@dataclass
class Outcome:
    """What the access log, the metrics and insight say about one request."""

    # Read when the request starts: a connection the client cut has no address by the end.
    source: str | None = None
    user: str = "-"
    caller: str = "anonymous"  # caller group once authenticated: node or module
    protocol: str = "-"
    decision: str = "-"
    rule: str = "-"
    reason: str = "-"
    refusal: Refusal | None = None  # the gateway's own answer, when it refused
    backend: str = "-"
    path: str = "-"
    transfer: Transfer = field(default_factory=Transfer)
    target: Target | None = None  # once canonical
    is_node: bool = False
    served_here: bool = False  # sent to a backend of this node (not refused, not to a peer)


class Exchange:
    """The request, what the access log will say of it, and what the stages before found.

    A stage reads what an earlier stage found through the properties below; reading one
    before the stage that finds it is a bug in the order of the stages.
    """

    def __init__(self, request: web.BaseRequest, services: Services) -> None:
        self.request = request
        self.services = services
        self.state = services.cluster_state()  # one snapshot for the request
        self.outcome = Outcome()
        self.references: References | None = None  # a WebDAV request's other paths
        self.upload: Upload | None = None  # a POST of a restic object
        # Applied in order to the request body, wherever it goes (see `admit_body`).
        self.body_transforms: list[BodyFilter] = []
        # What a body moved in the kernel goes through instead; None once a transform
        # that needs the bytes in hand was added (`transform_body`).
        self.body_splicing: Splicing | None = NOTHING_ON_THE_WAY
        # The one of them that holds the body to this node's bandwidth limits.
        self.upload_shaping: BodyFilter | None = None
        # Whether a limit holds the request body back now: it is then read in small pieces.
        self.body_held: BodyHeld | None = None
        # Applied to the answer's body when it comes from a backend of this node, or what
        # it goes through when it moves in the kernel.
        self.response_transform: BodyFilter | None = None
        self.response_splicing: Splicing | None = None
        # Called with the status once the request is answered (or cut), whatever the stage.
        self.at_end: list[Callable[[int], None]] = []
        self._goes_to_peer: bool | None = None
        self._body_admitted = False
        self._caller: Caller | None = None
        self._described: Request | None = None
        self._decision: Decision | None = None

    @property
    def source(self) -> str | None:
        return self.outcome.source

    @property
    def target(self) -> Target:
        return _found(self.outcome.target, "target")

    @target.setter
    def target(self, target: Target) -> None:
        self.outcome.target = target
        self.outcome.path = target.display

    @property
    def caller(self) -> Caller:
        return _found(self._caller, "caller")

    @caller.setter
    def caller(self, caller: Caller) -> None:
        self._caller = caller
        self.outcome.user = caller.user
        self.outcome.caller = caller.group
        self.outcome.is_node = caller.is_node

    @property
    def described(self) -> Request:
        """The request as the policy sees it."""
        return _found(self._described, "policy request")

    @property
    def decision(self) -> Decision:
        return _found(self._decision, "decision")

    def decided(self, described: Request, decision: Decision) -> None:
        self._described, self._decision = described, decision
        self.outcome.protocol = described.protocol.value
        self.outcome.decision = "allow" if decision.allowed else "deny"
        self.outcome.rule = decision.rule
        self.outcome.reason = decision.reason

    @property
    def goes_to_peer(self) -> bool:
        """Whether the destination is served by a peer gateway, not here: decided once, so
        the stages before dispatch and dispatch itself agree."""
        if self._goes_to_peer is None:
            segments = self.target.segments
            self._goes_to_peer = (bool(segments)
                                  and not self.services.serving.served_here(segments[0]))
        return self._goes_to_peer

    @property
    def backend(self) -> Backend:
        """The kind of backend child the policy sends an allowed request to."""
        return _found(self.decision.backend, "backend")

    def refuse(self, refusal: Refusal | Refused, *detail: object, note: str = "",
               retry_after: int | None = None) -> web.Response:
        """The gateway's own answer: `refusal` (given with `detail`, and `retry_after` where
        the table says COMPUTED), noted for the access log, `note` after its reason."""
        if isinstance(refusal, Refusal):
            refusal = refusal.given(*detail, retry_after=retry_after)
        return refuse(self.outcome, refusal, note)

    def cut(self) -> Refusal:
        """Why a request ended before its answer: its client left, or this gateway stops."""
        return Refusal.CUT_BY_STOP if self.services.stopping else Refusal.CLIENT_CLOSED

    # --- the body: let in once every check passed, through the same transforms -----------

    def transform_body(self, transform: BodyFilter, splicing: Splicing | None) -> None:
        """Adds a transform of the request body, and what stands for it when the body moves
        in the kernel (None: it needs the bytes in hand, and the body is read into the
        process)."""
        self.body_transforms.append(transform)
        if self.body_splicing is not None:
            self.body_splicing = None if splicing is None else self.body_splicing.with_(splicing)

    async def admit_body(self) -> BodyFilter | None:
        """Lets the client send its body (`Expect: 100-continue`), for whichever dispatch
        sends it on: what it must pass through on the way."""
        await send_continue(self.request)
        if not self._body_admitted and self.request.body_exists:
            # The body may wait unread (a bandwidth limit, a backend that does not take
            # data): a client that leaves meanwhile must still be noticed at once.
            unwatch = self.services.hangups.watch(self.request.transport)
            self.at_end.append(lambda _status: unwatch())
        self._body_admitted = True
        return _chained(self.body_transforms)

    def body_filter_for_peer(self) -> BodyFilter | None:
        """The body's transforms for a request moved to a peer once let in here: without
        this node's bandwidth shaping, as the peer limits what it serves."""
        return _chained([t for t in self.body_transforms if t is not self.upload_shaping])

    def body_splicing_for_peer(self) -> Splicing | None:
        """`body_splicing` for a request sent to a peer: without this node's pace."""
        splicing = self.body_splicing
        if splicing is None or self.upload_shaping is None:
            return splicing
        return replace(splicing, pace=None)

    async def read_body(self) -> AsyncIterator[bytes]:
        """Lets the body in to be read here rather than sent on: through the same transforms."""
        transform = await self.admit_body()
        body = request_body(self.request, self.outcome.transfer, self.body_held)
        return body if transform is None else transform(body)


def _found(value: T | None, what: str) -> T:
    if value is None:
        raise RuntimeError(f"no {what} yet: a stage runs before the one that finds it")
    return value


def _chained(transforms: list[BodyFilter]) -> BodyFilter | None:
    if not transforms:
        return None
    if len(transforms) == 1:
        return transforms[0]

    def chain(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        for transform in transforms:
            chunks = transform(chunks)
        return chunks

    return chain
