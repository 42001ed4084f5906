"""The peer decisions alone: who can serve a destination, in which order, and what is sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from backends.destinations import Destination
from backends.rclone_conf import Placement
from gateway.cluster.reachability import Reachability
from gateway.cluster.state import ClusterState
from gateway.forwarding.peers import (
    FORWARDED_HEADER,
    Peer,
    PeerHealth,
    Route,
    candidates,
    is_local_client,
    may_forward,
    peer_request_headers,
    probe_pairs,
    route,
    where_served,
)
from gateway.forwarding.proxy import Splicing
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.stages import bandwidth

HOSTED = Destination("hosted", "cluster", "webdav:http://10.5.4.2:4694")
HOSTED_HERE = Destination("mine", "cluster", "webdav:http://10.5.4.1:4694")
HOSTED_ELSEWHERE = Destination("lost", "cluster", "webdav:http://10.5.4.99:4694")
REMOTE = Destination("remote", "s3", "s3:s3.example.com/bucket/path")


def state(leader: str | None = "3", **nodes: str) -> ClusterState:
    vpn = nodes or {"1": "10.5.4.1", "2": "10.5.4.2", "3": "10.5.4.3", "10": "10.5.4.10"}
    return ClusterState(
        destinations={d.uuid: d for d in (HOSTED, HOSTED_HERE, HOSTED_ELSEWHERE, REMOTE)},
        node_vpn=dict(vpn),
        leader=leader,
    )


def names(peers: list[Peer] | tuple[Peer, ...]) -> list[str]:
    return [p.name for p in peers]


def test_cluster_destination_goes_to_its_hosting_node_only() -> None:
    assert names(candidates(HOSTED, state(), "1")) == ["node2"]
    assert candidates(HOSTED, state(), "2") == []
    assert candidates(HOSTED_HERE, state(), "1") == []


def test_cluster_destination_of_an_unannounced_address_is_still_reachable_by_address() -> None:
    assert candidates(HOSTED_ELSEWHERE, state(), "1") == [Peer(None, "10.5.4.99")]
    assert Peer(None, "10.5.4.99").base_url == "http://10.5.4.99:4694"
    assert Peer("2", "fd00::2").base_url == "http://[fd00::2]:4694"


def test_remote_destination_tries_the_leader_first_then_nodes_by_id() -> None:
    assert names(candidates(REMOTE, state(leader="3"), "1")) == ["node3", "node2", "node10"]
    assert names(candidates(REMOTE, state(leader="1"), "1")) == ["node2", "node3", "node10"]
    assert names(candidates(REMOTE, state(leader=None), "2")) == ["node1", "node3", "node10"]


def test_a_node_sharing_this_node_address_is_not_a_peer() -> None:
    shared = state(**{"1": "10.5.4.1", "2": "10.5.4.1", "3": "10.5.4.3"})
    assert names(candidates(REMOTE, shared, "1")) == ["node3"]


def test_probe_pairs_cover_every_peer_that_could_be_asked() -> None:
    pairs = {(p.name, uuid) for p, uuid in probe_pairs(state(), "1")}
    assert pairs == {
        ("node2", "hosted"), ("10.5.4.99", "lost"),
        ("node3", "remote"), ("node2", "remote"), ("node10", "remote"),
    }


@pytest.mark.parametrize(
    ("source", "own", "local"),
    [
        ("127.0.0.1", None, True),
        ("::1", "10.5.4.1", True),
        ("::ffff:127.0.0.1", None, True),
        ("10.5.4.1", "10.5.4.1", True),  # this node's own VPN address
        ("10.5.4.2", "10.5.4.1", False),  # a peer
        ("127.0.0.2", None, False),
        (None, "10.5.4.1", False),
        ("garbage", None, False),
    ],
)
def test_local_clients(source: str | None, own: str | None, local: bool) -> None:
    assert is_local_client(source, own) is local


def test_only_unmarked_requests_of_local_clients_are_sent_on() -> None:
    assert may_forward(True, None)
    assert not may_forward(True, "node2")  # a local client claiming it: gets less
    assert not may_forward(False, None)  # from a peer: served or refused
    assert not may_forward(False, "node2")


def test_route_tries_peers_not_seen_serving_yet_last_but_tries_them() -> None:
    # right after a boot: every peer's first probe failed, none was seen serving yet
    health = PeerHealth()
    health.record("10.5.4.3", "remote", False, "probe answered 503", 1.0)
    health.record_unreachable("10.5.4.10", "unreachable", 1.0)
    assert names(route(REMOTE, state(), "1", health, forwardable=True).peers) == [
        "node2", "node3", "node10"]
    hosted_by_3 = Destination("hosted3", "cluster", "webdav:http://10.5.4.3:4694")
    health.record("10.5.4.3", "hosted3", False, "unreachable", 1.0)
    assert names(route(hosted_by_3, state(), "1", health, forwardable=True).peers) == ["node3"]


def test_route_skips_peers_known_unable_and_says_why_when_none_is_left() -> None:
    health = PeerHealth()
    assert names(route(REMOTE, state(), "1", health, forwardable=True).peers) == [
        "node3", "node2", "node10"]
    for address in ("10.5.4.3", "10.5.4.2", "10.5.4.10"):
        health.record(address, "remote", True, "serves it", 0.5)
    health.record("10.5.4.3", "remote", False, "probe answered 503", 1.0)
    health.record_unreachable("10.5.4.10", "unreachable", 1.0)
    assert names(route(REMOTE, state(), "1", health, forwardable=True).peers) == ["node2"]
    # node 3 failing for one destination is still asked for another
    hosted_by_3 = Destination("hosted3", "cluster", "webdav:http://10.5.4.3:4694")
    assert names(route(hosted_by_3, state(), "1", health, forwardable=True).peers) == ["node3"]
    health.record("10.5.4.2", "remote", False, "probe timed out", 2.0)
    refused = route(REMOTE, state(), "1", health, forwardable=True)
    assert refused.peers == ()
    assert refused.refusal == (
        "no node can serve this destination (node3: probe answered 503; "
        "node2: probe timed out; node10: unreachable)")
    # any success brings a node back
    health.record("10.5.4.10", "remote", True, "serves it", 3.0)
    assert names(route(REMOTE, state(), "1", health, forwardable=True).peers) == ["node10"]


def test_route_refuses_requests_that_may_not_be_sent_on() -> None:
    refused = route(REMOTE, state(), "1", PeerHealth(), forwardable=False)
    assert refused.peers == ()
    assert "not sent on" in refused.refusal
    assert route(HOSTED_HERE, state(), "1", PeerHealth(), forwardable=True).peers == ()


def test_forget_except_drops_what_no_longer_exists() -> None:
    health = PeerHealth()
    health.record("10.5.4.2", "gone", False, "x", 1.0)
    health.record("10.5.4.2", "remote", False, "x", 1.0)
    health.record_unreachable("10.5.4.9", "unreachable", 1.0)
    health.forget_except({"10.5.4.2"}, {"remote"})
    assert set(health.pairs) == {("10.5.4.2", "remote")}
    assert health.unreachable == {}


def test_peer_gets_the_client_credentials_and_the_forwarded_mark() -> None:
    incoming = CIMultiDictProxy(CIMultiDict([
        ("Authorization", "Basic bW9kdWxlL3g6eQ=="),
        ("Accept", "application/vnd.x.restic.rest.v2"),
        ("Host", "127.0.0.1:4694"),
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("X-Secret-Hop", "1"),
        ("Expect", "100-continue"),
        (FORWARDED_HEADER, "node9"),
        ("Content-Length", "5"),
    ]))
    sent = peer_request_headers(incoming, "1")
    assert sent["Authorization"] == "Basic bW9kdWxlL3g6eQ=="
    assert sent.getall(FORWARDED_HEADER) == ["node1"]
    assert sent["Accept"] == "application/vnd.x.restic.rest.v2"
    assert "Content-Length" not in sent  # the upstream client frames the body itself
    for dropped in ("Host", "Connection", "X-Secret-Hop", "Expect"):
        assert dropped not in sent


def test_health_entry_says_where_a_destination_is_served() -> None:
    placement = Placement(local={"remote": "remote:path"}, peer={"hosted": "10.5.4.2"},
                          invalid={"broken": "no rclone configuration"})
    via2 = Route((Peer("2", "10.5.4.2"),))
    assert where_served(True, placement, None, "remote", None) == {
        "state": "ok", "served": "here"}
    assert where_served(False, placement, None, "hosted", via2) == {
        "state": "forwarded", "served": "peer", "peer": "node2", "peer_address": "10.5.4.2",
        "reason": "hosted by the node at 10.5.4.2"}
    assert where_served(False, placement, "remote did not answer in time", "remote",
                        via2)["reason"] == "remote did not answer in time"
    nowhere = where_served(False, placement, None, "broken", Route((), "no node can serve it"))
    assert nowhere == {"state": "error", "served": "no",
                       "error": "no rclone configuration; no node can serve it"}


def test_reachability_follows_probes_not_single_answers() -> None:
    reach = Reachability()
    assert reach.reachable("remote")
    reach.observe("remote", 404)
    assert reach.reachable("remote")
    # rclone answers 500 to a REST HEAD of a directory: one answer says nothing of the remote
    for status in (500, 502, 504):
        reach.observe("remote", status)
        assert reach.reachable("remote")
    assert reach._wake.is_set()  # but the next probe comes at once
    assert reach.next_due() is not None and reach.next_due() <= time.monotonic()
    reach.mark("remote", "remote did not answer within 4 s")  # the probe's verdict
    assert not reach.reachable("remote")
    assert reach.reason("remote") == "remote did not answer within 4 s"
    reach.mark("remote", None)
    assert reach.reachable("remote")


def test_remote_probe_schedule_follows_the_verdicts() -> None:
    """Spec 7: once an interval while healthy, every few seconds while failing, sooner after
    a failing request (but a second after the last probe at the soonest)."""
    async def failing(uuid: str) -> str | None:
        return "remote did not answer within 4 s"

    async def answering(uuid: str) -> str | None:
        return None

    async def run() -> None:
        reach = Reachability(interval=60, fast_interval=3)
        now = time.monotonic()
        assert reach.schedule(["remote"], now) == []  # its start check listed it just now
        assert reach.next_due() == pytest.approx(now + 60)
        await reach.probe_all(["remote"], failing)
        assert not reach.reachable("remote")
        assert reach.next_due() <= time.monotonic() + 3
        await reach.probe_all(["remote"], answering)
        assert reach.reachable("remote")
        assert reach.next_due() >= time.monotonic() + 59
        reach.probe_soon("remote")
        assert time.monotonic() + 0.5 <= reach.next_due() <= time.monotonic() + 1
        assert reach.schedule([], time.monotonic()) == []
        assert reach.next_due() is None

    asyncio.run(run())


def test_a_confirmation_waits_for_a_probe_started_after_it() -> None:
    probed: list[float] = []

    async def answering(uuid: str) -> str | None:
        probed.append(time.monotonic())
        return None

    async def run() -> None:
        reach = Reachability(interval=60, fast_interval=3)
        reach.start(lambda: ["remote"], answering)
        try:
            asked = time.monotonic()
            assert await reach.confirm("remote", timeout=30)
            assert len(probed) == 1 and probed[0] >= asked
        finally:
            await reach.close()

    asyncio.run(run())


def test_a_destination_served_again_is_not_down_from_before() -> None:
    """Found down, dropped from the served set by a reload, served again: its requests are
    not given up at once on the old verdict."""
    async def run() -> None:
        reach = Reachability(interval=60, fast_interval=3)
        now = time.monotonic()
        reach.schedule(["remote"], now)
        reach.mark("remote", "remote did not answer within 4 s")
        reach.schedule([], now)
        reach.schedule(["remote"], now)
        assert reach.reachable("remote")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reach.went_down("remote"), 0.2)

    asyncio.run(run())


def test_a_probe_brought_forward_does_not_wait_for_another_destinations() -> None:
    """One dark destination, probed every few seconds with each probe taking its whole
    timeout, does not hold up the probe another destination's failed request asks for."""
    async def check(uuid: str) -> str | None:
        if uuid == "dark":
            await asyncio.sleep(2)
            return "remote did not answer within 2 s"
        return "connection refused" if uuid == "lost" else None

    async def run() -> None:
        reach = Reachability(interval=60, fast_interval=0.5)
        reach.start(lambda: ["dark", "lost"], check)
        try:
            await asyncio.sleep(0.05)
            reach.probe_soon("dark")
            await asyncio.sleep(0.2)  # the dark one's probe is under way
            asked = time.monotonic()
            assert not await reach.confirm("lost", timeout=1.0)
            assert time.monotonic() - asked < 0.5
        finally:
            await reach.close()

    asyncio.run(run())


def test_a_request_moved_to_a_peer_is_not_shaped_here() -> None:
    """A request this node let in, then moved to a peer (its storage lost here): its body
    keeps its other transforms, but is held to the bandwidth limits on the peer only."""
    shaped: list[bytes] = []

    def shaping(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async def held() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                shaped.append(chunk)
                yield chunk
        return held()

    def upper(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async def transformed() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                yield chunk.upper()
        return transformed()

    async def pace(want: int) -> int:
        return want

    services = SimpleNamespace(cluster_state=ClusterState, limits=SimpleNamespace(
        shaping=lambda direction, module: shaping, holds=lambda direction, module: True,
        pace=lambda direction, module: pace))
    x = Exchange(SimpleNamespace(body_exists=True), services)  # type: ignore[arg-type]
    x._goes_to_peer = False
    x._caller = SimpleNamespace(module_id="m")  # type: ignore[assignment]
    x.body_transforms.append(upper)

    async def run() -> list[bytes]:
        assert await bandwidth(x) is None
        assert x.body_transforms[-1] is shaping  # here, the body is shaped
        to_peer = x.body_filter_for_peer()
        assert to_peer is not None
        # and paced when it moves in the kernel, here only
        assert x.body_splicing is not None and x.body_splicing.pace is pace
        assert x.body_splicing_for_peer() == Splicing()

        async def body() -> AsyncIterator[bytes]:
            yield b"abc"

        return [chunk async for chunk in to_peer(body())]

    assert asyncio.run(run()) == [b"ABC"]
    assert shaped == []
