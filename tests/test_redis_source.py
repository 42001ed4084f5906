"""RedisSource against a real redis-server."""

from __future__ import annotations

import asyncio

from harness import RedisServer

from gateway.redis_source import RedisSource


def test_idle_event_listener_pings_only_once_per_interval(redis_server: RedisServer) -> None:
    """An idle gateway must not spin: its keep-alive PING goes out once per interval."""
    client = redis_server.client()

    async def idle_pings() -> int:
        source = RedisSource(redis_server.url, ping_interval=0.2)
        await source.load()
        source.start()
        try:
            await asyncio.sleep(0.5)  # subscribed, first resync done
            client.config_resetstat()
            await asyncio.sleep(1.0)
            stats = client.info("commandstats")
        finally:
            await source.close()
        return int(stats.get("cmdstat_ping", {}).get("calls", 0))

    try:
        pings = asyncio.run(idle_pings())
    finally:
        client.close()
    assert 1 <= pings <= 10
