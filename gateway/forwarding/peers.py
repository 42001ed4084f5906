"""Peer gateways: which node can serve a destination this node cannot, and how to reach it.

Spec section 7. A request from a local client for a destination not served
healthily here goes to the hosting node (a `cluster` destination), otherwise to
the leader first and then to the other nodes, skipping peers known to be unable
to serve it. Peer health comes from probing `GET /<destination>/_probe_rest_404`
(404 means healthy, as the gateways of the old design checked each other too)
and from failures seen on real requests.

Requests that came from another node are served or refused, never sent on, so
a request crosses at most one hop: no loop is possible.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from backends.client import BodyFailed, ConnectionPool, HopFailure, NextHopError
from backends.destinations import Destination
from backends.rclone_conf import Placement
from backends.tasks import cancel_and_wait
from gateway.access.paths import Target
from gateway.access.policy import PROBE_SEGMENT, REST_MEDIA_TYPE
from gateway.access.refusals import Refusal, Refused
from gateway.access.webdav_headers import References
from gateway.cluster.state import LOCAL_ADDRESSES, ClusterState, source_ip
from gateway.forwarding.proxy import (
    BodyFilter,
    BodyRefused,
    Splicing,
    Transfer,
    forward,
    refusal_response,
    request_headers,
)

log = logging.getLogger("rclone_gateway.peers")

PEER_PORT = 4694
FORWARDED_HEADER = "X-Gateway-Forwarded"
# A peer answers 504 itself after its own backend timeout: wait a little longer.
PEER_TIMEOUT_MARGIN = 5.0
# Shorter than the time a gateway lets a connection sit idle (5 s), so that a request
# is not sent on a connection the peer is closing.
PEER_KEEPALIVE = 3.0
# Answers meaning "this peer cannot serve it now": the next peer is tried when nothing
# of the request body has been read yet.
PEER_CANNOT_SERVE = frozenset({502, 503})


@dataclass(frozen=True, slots=True)
class Peer:
    node_id: str | None  # None: an address no node announces (a `cluster` url only)
    address: str

    @property
    def name(self) -> str:
        return f"node{self.node_id}" if self.node_id is not None else self.address

    @property
    def base_url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{PEER_PORT}"


# --------------------------------------------------------------------------- decisions


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), node_id) if node_id.isdigit() else (1 << 62, node_id)


def other_nodes(state: ClusterState, own_node_id: str) -> list[Peer]:
    """Every other node with a VPN address: the leader first, then by node id."""
    own_address = state.node_vpn.get(own_node_id)
    peers = [
        Peer(node_id, address)
        for node_id, address in state.node_vpn.items()
        if node_id != own_node_id and address != own_address
    ]
    return sorted(peers, key=lambda p: (p.node_id != state.leader, _node_order(p.node_id or "")))


def hosting_node(dest: Destination, state: ClusterState) -> Peer | None:
    """The node whose local repository a `cluster` destination is."""
    host = dest.cluster_host
    if host is None:
        return None
    for node_id, address in state.node_vpn.items():
        if address == host:
            return Peer(node_id, address)
    return Peer(None, host)


def candidates(dest: Destination, state: ClusterState, own_node_id: str) -> list[Peer]:
    """The peers that could serve `dest`, in the order to try them."""
    if dest.provider == "cluster":
        host = hosting_node(dest, state)
        own_address = state.node_vpn.get(own_node_id)
        if host is None or host.node_id == own_node_id or host.address == own_address:
            return []
        return [host]
    return other_nodes(state, own_node_id)


def is_local_client(source: str | None, own_address: str | None) -> bool:
    """Loopback, or this node's own VPN address (only this host can send from it)."""
    ip = source_ip(source)
    if ip is None:
        return False
    return ip in LOCAL_ADDRESSES or (own_address is not None and str(ip) == own_address)


def may_forward(local_client: bool, forwarded_marker: str | None) -> bool:
    """Only requests of local clients are sent on, and never one marked as forwarded.

    The marker is honoured from any source: it can only make a request get less.
    """
    return local_client and forwarded_marker is None


@dataclass(frozen=True, slots=True)
class Observation:
    ok: bool
    reason: str
    at: float  # wall clock


@dataclass
class PeerHealth:
    """What is known of each peer's ability to serve each destination.

    A failure counts against a peer only once that peer has been seen serving the
    destination since this gateway started. Before that, a failed probe may only say that
    the peer was still starting (every node of a cluster boots at about the same time):
    such a peer is tried, not refused; the request finds out for itself.
    """

    pairs: dict[tuple[str, str], Observation] = field(default_factory=dict)  # (address, uuid)
    unreachable: dict[str, Observation] = field(default_factory=dict)  # address -> failure
    served_before: set[tuple[str, str]] = field(default_factory=set)

    def record(self, address: str, uuid: str, ok: bool, reason: str, now: float) -> None:
        self.pairs[(address, uuid)] = Observation(ok, reason, now)
        if ok:
            self.unreachable.pop(address, None)
            self.served_before.add((address, uuid))

    def record_unreachable(self, address: str, reason: str, now: float) -> None:
        """The node itself did not answer: none of its destinations is usable."""
        self.unreachable[address] = Observation(False, reason, now)

    def known_failure(self, address: str, uuid: str) -> str | None:
        """The last failure seen of this peer for `uuid`, if its last word was a failure."""
        node = self.unreachable.get(address)
        if node is not None:
            return node.reason
        pair = self.pairs.get((address, uuid))
        if pair is not None and not pair.ok:
            return pair.reason
        return None

    def failure(self, address: str, uuid: str) -> str | None:
        """Why this peer is not to be tried for `uuid` now; None when it is to be tried."""
        if (address, uuid) not in self.served_before:
            return None
        return self.known_failure(address, uuid)

    def forget_except(self, addresses: Iterable[str], uuids: Iterable[str]) -> None:
        keep_addresses, keep_uuids = set(addresses), set(uuids)
        self.pairs = {k: v for k, v in self.pairs.items()
                      if k[0] in keep_addresses and k[1] in keep_uuids}
        self.unreachable = {k: v for k, v in self.unreachable.items() if k in keep_addresses}
        self.served_before = {k for k in self.served_before
                              if k[0] in keep_addresses and k[1] in keep_uuids}


@dataclass(frozen=True, slots=True)
class Route:
    """Where to send a request this node does not serve: peers in order, or why nowhere."""

    peers: tuple[Peer, ...]
    refusal: str = ""


def route(
    dest: Destination,
    state: ClusterState,
    own_node_id: str,
    health: PeerHealth,
    *,
    forwardable: bool,
) -> Route:
    if not forwardable:
        return Route((), "destination not served here; requests from peers are not sent on")
    possible = candidates(dest, state, own_node_id)
    if not possible:
        if dest.provider == "cluster":
            return Route((), "destination not served here and no other node hosts it")
        return Route((), "destination not served here and no other node is known")
    # Peers seen failing but never seen serving go last: they may just be starting.
    usable = tuple(sorted(
        (p for p in possible if health.failure(p.address, dest.uuid) is None),
        key=lambda p: health.known_failure(p.address, dest.uuid) is not None))
    if usable:
        return Route(usable)
    reasons = "; ".join(f"{p.name}: {health.failure(p.address, dest.uuid)}" for p in possible)
    return Route((), f"no node can serve this destination ({reasons})")


def peer_request_headers(incoming: CIMultiDictProxy[str], own_node_id: str) -> CIMultiDict[str]:
    """The client's headers as sent to a peer: its own credentials, and the forwarded mark."""
    headers = request_headers(incoming)
    authorization = incoming.get("Authorization")
    if authorization is not None:
        headers["Authorization"] = authorization
    headers[FORWARDED_HEADER] = f"node{own_node_id}"
    return headers


def probe_pairs(state: ClusterState, own_node_id: str) -> list[tuple[Peer, str]]:
    """Every (peer, destination) this node might forward to."""
    pairs = []
    for uuid, dest in sorted(state.destinations.items()):
        pairs.extend((peer, uuid) for peer in candidates(dest, state, own_node_id))
    return pairs


def where_served(
    served_here: bool, placement: Placement, unreachable: str | None, uuid: str,
    chosen: Route | None,
) -> dict[str, object]:
    """A destination's entry in /health: served here, through which peer, or why not at all."""
    if served_here or chosen is None:
        return {"state": "ok", "served": "here"}
    if uuid in placement.peer:
        why = f"hosted by the node at {placement.peer[uuid]}"
    elif uuid in placement.invalid:
        why = placement.invalid[uuid]
    elif uuid not in placement.local:
        why = "not served here"
    else:
        why = unreachable or "backends not ready"
    if chosen.peers:
        first = chosen.peers[0]
        return {"state": "forwarded", "served": "peer", "peer": first.name,
                "peer_address": first.address, "reason": why}
    return {"state": "error" if uuid in placement.invalid else "down", "served": "no",
            "error": f"{why}; {chosen.refusal}"}


# --------------------------------------------------------------------------- I/O


@dataclass
class PeerAnswer:
    response: web.StreamResponse
    backend: str  # for the access log
    # No peer could take it, or its body was refused on the way: the response says why.
    refused: Refused | None = None


class PeerGateways:
    """Forwards requests to peer gateways and keeps their health current by probing."""

    def __init__(
        self,
        own_node_id: str,
        state: Callable[[], ClusterState | None],
        *,
        probe_interval: float,
        probe_timeout: float,
        backend_timeout: float,
    ) -> None:
        self.own_node_id = own_node_id
        # A peer with the same `--backend-timeout` answers 504 after it: wait a little
        # longer. Like a backend's, the peer's wait starts once the whole request is sent.
        self.timeout = backend_timeout + PEER_TIMEOUT_MARGIN
        self._state = state
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.health = PeerHealth()
        self._session: aiohttp.ClientSession | None = None
        self._session_address: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing: list[aiohttp.ClientSession] = []
        self._pools: dict[tuple[str, str], ConnectionPool] = {}

    @property
    def own_address(self) -> str | None:
        state = self._state()
        return state.node_vpn.get(self.own_node_id) if state else None

    def _client(self) -> aiohttp.ClientSession | None:
        """A session whose connections leave from this node's VPN address."""
        address = self.own_address
        if address is None:
            return None
        if self._session is None or self._session_address != address:
            if self._session is not None:
                self._closing.append(self._session)
            connector = aiohttp.TCPConnector(
                local_addr=(address, 0), limit=0, keepalive_timeout=PEER_KEEPALIVE
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
            self._session_address = address
        return self._session

    def _pool(self, peer: Peer, own_address: str) -> ConnectionPool:
        """Connections to `peer` for forwarded requests, leaving from `own_address`."""
        key = (own_address, peer.address)
        pool = self._pools.get(key)
        if pool is None:
            pool = ConnectionPool.tcp(peer.address, PEER_PORT, local_address=own_address,
                                    keepalive=PEER_KEEPALIVE)
            self._pools[key] = pool
        return pool

    async def _close_pools(self, keep: str | None) -> None:
        for key in [k for k in self._pools if k[0] != keep]:
            await self._pools.pop(key).close()

    def route_for(self, dest: Destination, forwardable: bool = True) -> Route:
        state = self._state() or ClusterState()
        return route(dest, state, self.own_node_id, self.health, forwardable=forwardable)

    def route_request(
        self, dest: Destination, source: str | None, headers: CIMultiDictProxy[str]
    ) -> Route:
        """The peers to try for a request for `dest` not served here, from `source`: none
        (and why) unless it comes from a local client and not from a peer already."""
        forwardable = may_forward(
            is_local_client(source, self.own_address), headers.get(FORWARDED_HEADER)
        )
        return self.route_for(dest, forwardable)

    async def forward(
        self,
        request: web.BaseRequest,
        target: Target,
        dest: Destination,
        chosen: Route,
        transfer: Transfer,
        references: References | None = None,
        *,
        body_filter: BodyFilter | None = None,
        body_splicing: Splicing | None = None,
    ) -> PeerAnswer:
        """Tries the route's peers in order until one answers; 503 when none can.

        The other resources the request names (`references`) are named at each peer's
        own authority, where that peer checks them again. The body goes through
        `body_filter` on its way (or `body_splicing`, moved in the kernel), as it would to
        a backend of this node. The answer moves in the kernel when it can."""
        own_address = self.own_address
        if own_address is None:
            return unavailable("this node has no VPN address to reach its peers")
        headers = peer_request_headers(request.headers, self.own_node_id)
        failures: list[str] = []
        for peer in chosen.peers:
            if failures and transfer.bytes_in:
                break  # part of the body is gone: the request cannot be sent again
            try:
                response = await forward(
                    request, target, self._pool(peer, own_address), _label_from(peer), transfer,
                    body_filter, headers=headers.copy(),
                    backend_timeout=self.timeout, refuse_statuses=PEER_CANNOT_SERVE,
                    references=references, request_splicing=body_splicing,
                    response_splicing=Splicing(),  # the peer held it to its limits
                )
            except BodyFailed as exc:
                given = (exc.cause.given if isinstance(exc.cause, BodyRefused)
                         else Refusal.CLIENT_CLOSED.given())
                return PeerAnswer(refusal_response(given), peer.name, given)
            except NextHopError as exc:
                reason = self._note_failure(peer, dest.uuid, exc)
                failures.append(f"{peer.name}: {reason}")
                log.warning("peer %s could not serve %s: %s", peer.name, dest.uuid, reason)
                continue
            return PeerAnswer(response, response.headers.get("X-Gateway-Backend", peer.name))
        return unavailable("no node could serve this destination (" + "; ".join(failures) + ")")

    def _note_failure(self, peer: Peer, uuid: str, exc: NextHopError) -> str:
        now = time.time()
        if exc.kind is HopFailure.UNREACHABLE:
            reason = "unreachable"
            self.health.record_unreachable(peer.address, reason, now)
            return reason
        if exc.kind is HopFailure.DECLINED:
            reason = f"answered {exc.status}"
        elif exc.kind is HopFailure.TIMED_OUT:
            reason = "did not answer in time"
        else:
            reason = "connection lost"
        self.health.record(peer.address, uuid, False, reason, now)
        return reason

    # --- probing -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._probe_loop(), name="peer-probes")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for session in [*self._closing, *([self._session] if self._session else [])]:
            await session.close()
        self._closing.clear()
        self._session = None
        await self._close_pools(keep=None)

    async def _probe_loop(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception:
                log.exception("probing peers failed")
            await asyncio.sleep(self.probe_interval)

    async def probe_all(self) -> None:
        state = self._state()
        if state is None:
            return
        for stale in self._closing:
            await stale.close()
        self._closing.clear()
        await self._close_pools(keep=self.own_address)
        pairs = probe_pairs(state, self.own_node_id)
        self.health.forget_except({p.address for p, _ in pairs}, state.destinations)
        session = self._client()
        if session is None or not pairs:
            return
        results = await asyncio.gather(*(self._probe(session, p, u) for p, u in pairs))
        now = time.time()
        unreachable = {p.address for (p, _), (_, r) in zip(pairs, results, strict=True)
                       if r == "unreachable"}
        for (peer, uuid), (ok, reason) in zip(pairs, results, strict=True):
            if peer.address in unreachable:
                continue
            previous = self.health.known_failure(peer.address, uuid)
            self.health.record(peer.address, uuid, ok, reason, now)
            if ok and previous is not None:
                log.info("peer %s serves %s again", peer.name, uuid)
            elif not ok and previous is None:
                log.warning("peer %s cannot serve %s: %s", peer.name, uuid, reason)
        for address in unreachable:
            if address not in self.health.unreachable:
                log.warning("peer at %s is unreachable", address)
            self.health.record_unreachable(address, "unreachable", now)

    async def _probe(
        self, session: aiohttp.ClientSession, peer: Peer, uuid: str
    ) -> tuple[bool, str]:
        url = f"{peer.base_url}/{uuid}/{PROBE_SEGMENT}"
        timeout = aiohttp.ClientTimeout(total=self.probe_timeout)
        try:
            async with session.get(url, headers={"Accept": REST_MEDIA_TYPE},
                                   timeout=timeout, allow_redirects=False) as response:
                await response.read()
                if response.status == 404:
                    return True, "serves it"
                return False, f"probe answered {response.status}"
        except TimeoutError:
            return False, "probe timed out"
        except aiohttp.ClientError:
            return False, "unreachable"

    # --- reporting -----------------------------------------------------------------------

    def report(self) -> dict[str, object]:
        """Per peer: its address and what is known of each destination, for /health."""
        state = self._state() or ClusterState()
        out: dict[str, object] = {}
        for peer in other_nodes(state, self.own_node_id):
            node = self.health.unreachable.get(peer.address)
            destinations = {
                uuid: ("ok" if obs.ok else obs.reason)
                for (address, uuid), obs in sorted(self.health.pairs.items())
                if address == peer.address
            }
            out[peer.name] = {
                "address": peer.address,
                "reachable": node is None,
                "destinations": destinations,
            }
        return out


def _label_from(peer: Peer) -> Callable[[CIMultiDictProxy[str]], str]:
    def label(headers: CIMultiDictProxy[str]) -> str:
        # A peer of the old design sets no backend label of its own.
        return headers.get("X-Gateway-Backend") or f"peer@{peer.name}"

    return label


def unavailable(reason: str) -> PeerAnswer:
    """No peer can take the request: 503, and why."""
    given = Refusal.DESTINATION_NOT_SERVED.given(reason)
    return PeerAnswer(refusal_response(given), "-", given)
