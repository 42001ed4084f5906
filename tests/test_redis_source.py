"""RedisSource against a real redis-server."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from harness import RedisServer

from gateway.cluster.redis_source import RedisSource
from gateway.cluster.state import ClusterState


def test_idle_source_does_not_spin(redis_server: RedisServer) -> None:
    """Idle, the source only sends its periodic pings and uses next to no CPU.

    The keep-alive of the event subscription is shortened so that its PING and PONG
    happen during the test: a PONG read as "no message" once made the listener ping
    again at once, a loop that kept a core busy on an idle gateway.
    """
    client = redis_server.client()

    async def idle() -> tuple[float, int]:
        source = RedisSource(redis_server.url, probe_interval=0.2)
        source._events_client.connection_pool.connection_kwargs["health_check_interval"] = 0.2
        await source.load()
        source.start()
        try:
            # subscribed to the events, and the first periodic probe done
            deadline = time.monotonic() + 20
            while client.execute_command("PUBSUB", "NUMPAT") < 1 or (
                    client.info("commandstats").get("cmdstat_ping", {}).get("calls", 0) < 1):
                assert time.monotonic() < deadline, "the source did not subscribe in time"
                await asyncio.sleep(0.05)
            client.config_resetstat()
            cpu = time.process_time()
            await asyncio.sleep(1.5)
            cpu = time.process_time() - cpu
            stats = client.info("commandstats")
        finally:
            await source.close()
        return cpu, int(stats.get("cmdstat_ping", {}).get("calls", 0))

    try:
        cpu, pings = asyncio.run(idle())
    finally:
        client.close()
    assert 1 <= pings <= 30
    assert cpu < 0.3


GOOD = {  # key -> (how to write its good value, a key of the same kind holding another)
    "cluster/acls": lambda r, v: r.sadd("cluster/acls", f"user node/{v} on #{'ab' * 32} ~* +@all"),
    "cluster/module_uuid": lambda r, v: r.hset("cluster/module_uuid", "traefik1", f"uuid-{v}"),
    "cluster/network": lambda r, v: r.set("cluster/network", f"10.5.{v}.0/24"),
    "cluster/backup_repository/d1": lambda r, v: r.hset(
        "cluster/backup_repository/d1", mapping={"provider": "rclone", "url": f"s3:x/{v}"}),
    "node/1/vpn": lambda r, v: r.hset("node/1/vpn", "ip_address", f"10.5.4.{v}"),
    "rclone-gateway/bwlimit": lambda r, v: r.hset("rclone-gateway/bwlimit", "upload", f"{v}M"),
    "rclone-gateway/concurrency": lambda r, v: r.hset("rclone-gateway/concurrency", "node", v),
    "rclone-gateway/quota/d1": lambda r, v: r.hset("rclone-gateway/quota/d1", "*", f"{v}G"),
}


def what_is_read(state: ClusterState) -> dict[str, object]:
    """What each key of GOOD gave in `state`."""
    return {
        "cluster/acls": sorted(state.users),
        "cluster/module_uuid": state.module_uuids,
        "cluster/network": [str(n) for n in state.networks],
        "cluster/backup_repository/d1": (state.destinations["d1"].url
                                         if "d1" in state.destinations else None),
        "node/1/vpn": state.node_vpn,
        "rclone-gateway/bwlimit": state.limits.bwlimit,
        "rclone-gateway/concurrency": state.limits.concurrency,
        "rclone-gateway/quota/d1": state.limits.quota,
    }


@pytest.mark.parametrize("key", sorted(GOOD))
def test_a_key_of_the_wrong_type_keeps_its_last_good_value_and_the_rest_is_read(
        redis_server: RedisServer, key: str, caplog: pytest.LogCaptureFixture) -> None:
    """Issue "Real links and real storage", 7 (spec section 2): a key of the wrong Redis
    type reads as its last good value, with one warning until it changes; every other
    key is read as usual. A cluster key too: one bad key never takes every ACL away."""
    client = redis_server.client()
    client.flushdb()
    for write in GOOD.values():
        write(client, "1")

    async def reads() -> list[ClusterState]:
        source = RedisSource(redis_server.url)
        try:
            states = [await source.load()]
            client.delete(key)
            client.rpush(key, "not", "a", "hash")
            for other, write in GOOD.items():  # every other key changes
                if other != key:
                    client.delete(other)
                    write(client, "2")
            states += [await source.load(), await source.load()]
            client.delete(key)
            if key == "cluster/acls":  # a set is right there
                client.set(key, "now a string")
            else:
                client.sadd(key, "now a set")
            states.append(await source.load())
            client.delete(key)
            GOOD[key](client, "3")
            states.append(await source.load())
            assert source.status.connected
            return states
        finally:
            await source.close()

    with caplog.at_level(logging.INFO, logger="rclone_gateway"):
        try:
            first, wrong, again, other_type, good_again = asyncio.run(reads())
        finally:
            client.close()
    before = what_is_read(first)
    for state in (wrong, again, other_type):
        seen = what_is_read(state)
        assert seen[key] == before[key], (key, seen[key], before[key])
        for other in GOOD:
            if other != key:
                assert seen[other] != before[other], (key, other, seen[other])
    assert what_is_read(good_again)[key] != before[key]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(key in w for w in warnings), warnings
    assert "holds a list" in warnings[0], warnings
    assert ("holds a string" if key == "cluster/acls" else "holds a set") in warnings[1], warnings
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
