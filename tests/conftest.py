from __future__ import annotations

import signal
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Cluster, GatewayProcess, RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    client = redis_server.client()
    seeded = Cluster(client)
    seeded.flush()
    try:
        yield seeded
    finally:
        client.close()


@pytest.fixture
def gateway_factory(redis_server: RedisServer, tmp_path: Path):
    started: list[GatewayProcess] = []

    def start_gateway(node_id: str | int = "1", *, redis_url: str | None = None,
                      workdir: Path | None = None, **kwargs) -> GatewayProcess:
        workdir = workdir or tmp_path / f"gateway{len(started)}"
        gateway = GatewayProcess.start(redis_url or redis_server.url, node_id, workdir, **kwargs)
        started.append(gateway)
        return gateway

    try:
        yield start_gateway
    finally:
        for gateway in started:
            gateway.stop(signal.SIGTERM, timeout=20)
            if killed := gateway.kill_leftovers():
                warnings.warn(
                    f"gateway {gateway.pid} left children {killed} behind (killed)",
                    stacklevel=1,
                )
