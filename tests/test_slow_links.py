"""Real links and real storage (spec section 7): real redis-server, rclone children and
restic objects; the clients pace themselves.

- A proxied answer keeps rclone's `Server: rclone/<version>` (restic reads it).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    Cluster,
    GatewayProcess,
    RedisServer,
    send_request,
)

DEST = "5a0e1000-7c2b-4d1e-9f3a-1b2c3d4e5f60"
NODE = ("node/1", "slow-links-node-secret")
PASSWORD = "slow-links-module-secret"
MODULES = {  # module id -> (app, uuid)
    "traefik1": ("traefik", "5a0e1111-2f87-4e7b-9a34-0a1d9f9e4b01"),
    "dokuwiki1": ("dokuwiki", "5a0e2222-2f87-4e7b-9a34-0a1d9f9e4b02"),
    "mail1": ("mail", "5a0e3333-2f87-4e7b-9a34-0a1d9f9e4b03"),
    "ldap1": ("ldap", "5a0e4444-2f87-4e7b-9a34-0a1d9f9e4b04"),
    "samba1": ("samba", "5a0e5555-2f87-4e7b-9a34-0a1d9f9e4b05"),
}
MiB = 1024 * 1024


# --------------------------------------------------------------------------- fixture


@dataclass
class Env:
    gateway: GatewayProcess
    cluster: Cluster

    def status(self) -> dict:
        conn = http.client.HTTPConnection(self.gateway.host, self.gateway.port, timeout=30)
        try:
            code, _, body = send_request(conn, "GET", "/status", NODE,
                                         headers={"Accept": "application/json"})
        finally:
            conn.close()
        assert code == 200, body
        return json.loads(body)

    def limits(self) -> dict:
        return self.status()["limits"]

    def set_limit(self, key: str, fields: dict[str, str],
                  in_force: Callable[[dict], bool]) -> None:
        """Writes a limits hash, announces it and waits until /status shows it in force."""
        self.cluster.r.hset(key, mapping=fields)
        self.cluster.publish("backup-limits-changed")
        deadline = time.monotonic() + 30
        while not in_force(self.limits()):
            assert time.monotonic() < deadline, f"{key} {fields} not in force: {self.limits()}"
            time.sleep(0.1)

    def base(self, module: str) -> str:
        app, module_uuid = MODULES[module]
        return f"/{DEST}/{app}/{module_uuid}"

    def stored(self, module: str, object_id: str) -> Path:
        app, module_uuid = MODULES[module]
        return (self.gateway.local_repo / app / module_uuid / "data" / object_id[:2]
                / object_id)

    def create_repository(self, module: str) -> None:
        conn = http.client.HTTPConnection(self.gateway.host, self.gateway.port, timeout=30)
        try:
            status, _, body = send_request(conn, "POST", f"{self.base(module)}/?create=true",
                                           who(module), rest=True)
        finally:
            conn.close()
        assert status == 200, (status, body)


def seed(redis_server: RedisServer) -> Cluster:
    cluster = Cluster(redis_server.client())
    cluster.flush()
    cluster.add_user(*NODE)
    for module, (_, module_uuid) in MODULES.items():
        cluster.add_user(f"module/{module}", PASSWORD)
        cluster.set_module(module, module_uuid)
    cluster.set_node_vpn(1, "10.5.9.1")
    cluster.add_destination(DEST, provider="cluster", url="webdav:http://10.5.9.1:4694",
                            name="local disk")
    return cluster


@contextlib.contextmanager
def started(redis_server: RedisServer, workdir: Path, *args: str) -> Iterator[Env]:
    cluster = seed(redis_server)
    gateway = GatewayProcess.start(redis_server.url, "1", workdir, extra_args=args)
    try:
        yield Env(gateway, cluster)
    finally:
        gateway.stop()
        left = gateway.kill_leftovers()
        cluster.r.close()
        assert not left, f"the gateway left children behind: {left}"


@pytest.fixture
def env(redis_server: RedisServer, tmp_path: Path) -> Iterator[Env]:
    """A gateway with the default timeouts."""
    with started(redis_server, tmp_path / "gateway") as gateway_env:
        yield gateway_env


# --------------------------------------------------------------------------- clients


def who(module: str) -> tuple[str, str]:
    return f"module/{module}", PASSWORD


# --------------------------------------------------------------------------- tests


def test_answers_keep_the_backends_server_header(env: Env) -> None:
    """restic tells a listing that failed inside rclone from a missing directory by the
    answer's `Server: rclone/...`: every answer of a backend keeps it."""
    env.create_repository("traefik1")
    gateway = env.gateway
    conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=30)
    try:
        answers = {
            "config": send_request(conn, "GET", f"{env.base('traefik1')}/config",
                                   who("traefik1"), rest=True),
            "listing": send_request(conn, "GET", f"{env.base('traefik1')}/snapshots/",
                                    who("traefik1"), rest=True),
            "missing": send_request(conn, "GET", f"{env.base('traefik1')}/data/{'0' * 64}",
                                    who("traefik1"), rest=True),
            "webdav": send_request(conn, "PROPFIND", f"/{DEST}/", NODE,
                                   headers={"Depth": "0"}),
        }
        refused = send_request(conn, "DELETE", f"{env.base('traefik1')}/config",
                               who("traefik1"), rest=True)
    finally:
        conn.close()
    for what, (status, headers, _) in answers.items():
        print(f"{what}: {status}, Server: {headers.get('server')!r}, "
              f"X-Gateway-Backend: {headers.get('x-gateway-backend')!r}")
        assert "x-gateway-backend" in headers, (what, status, headers)
        assert headers.get("server", "").startswith("rclone/"), (what, status, headers)
    # the gateway's own answers keep what they had
    status, headers, _ = refused
    assert status == 403 and not headers.get("server", "").startswith("rclone/"), refused
