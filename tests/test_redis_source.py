"""RedisSource against a real redis-server."""

from __future__ import annotations

import asyncio
import time

from harness import RedisServer

from gateway.redis_source import RedisSource


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
