"""Defects seen under real cluster traffic, each with the test that would have caught it.

Real redis-server, rclone children and restic. One gateway for the module, its liveness
checks fast (0.5 s apart, 2 s deadline, 3 misses) so that a wedged child is replaced
within seconds here; the defaults and their bound are in docs/operations.md.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    Cluster,
    GatewayProcess,
    RedisServer,
    fresh_cluster,
    restic,
    running_gateway,
    send_request,
    stop_process,
    wait_for,
)
from identities import NODE, TRAEFIK

DEST = "7e57d00d-8f8b-4c43-a1d3-7f3f5f7c1a01"
REMOTE_DEST = "7e57d00d-1b2a-4d6e-9f70-aa11bb22cc33"
TRAEFIK_UUID = "7e571111-2f87-4e7b-9a34-0a1d9f9e4b01"
LIVENESS = ["--liveness-interval", "0.5", "--liveness-timeout", "2", "--liveness-misses", "3"]
# Requests to a stopped child are served by its replacement within this many seconds:
# 3 missed checks (3 x 2.5 s), a child start, and a loaded machine's margin.
REPLACED_WITHIN = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Env:
    gateway: GatewayProcess
    cluster: Cluster
    remote_dir: Path

    def request(self, method: str, path: str, who: tuple[str, str] | None = None, *,
                headers: dict[str, str] | None = None, body: bytes | None = None,
                rest: bool = False, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=timeout)
        try:
            return send_request(conn, method, path, who, headers=headers, body=body, rest=rest)
        finally:
            conn.close()

    def health(self) -> dict:
        status, _, body = self.request("GET", "/health")
        assert status in (200, 503), body
        return json.loads(body)

    def repo(self, who: tuple[str, str], dest: str, module_uuid: str = TRAEFIK_UUID) -> str:
        user = who[0].replace("/", "%2F")
        return (f"rest:http://{user}:{who[1]}@127.0.0.1:{self.gateway.port}/{dest}/traefik/"
                f"{module_uuid}/")


@pytest.fixture(scope="module")
def env(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("robust")
    remote_dir = workdir / "remote-storage"
    remote_dir.mkdir()
    with fresh_cluster(redis_server) as cluster:
        cluster.add_user(*NODE)
        cluster.add_user(*TRAEFIK)
        cluster.set_module("traefik1", TRAEFIK_UUID)
        cluster.set_node_vpn(1, "10.5.4.1")
        cluster.add_destination(DEST, provider="cluster", url="webdav:http://10.5.4.1:4694")
        cluster.add_destination(REMOTE_DEST, provider="rclone", url="rclone:local",
                                name="remote", basepath=str(remote_dir),
                                rclone_conf=f"[{REMOTE_DEST}]\ntype = local\n")
        # remote probes far apart: only what a request brings forward happens during a test
        with running_gateway(redis_server.url, workdir,
                             extra_args=[*LIVENESS, "--remote-probe-interval", "600"]) as gateway:
            yield Env(gateway, cluster, remote_dir)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


# --------------------------------------------------------------------------- 1: WebDAV child


LOCKINFO = (b'<?xml version="1.0"?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/>'
            b'</D:lockscope><D:locktype><D:write/></D:locktype></D:lockinfo>')
PROPUPDATE = (b'<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:"><D:set><D:prop>'
              b'<x xmlns="urn:x">1</x></D:prop></D:set></D:propertyupdate>')


def node_webdav_mix(env: Env, round_: int) -> list[int]:
    """What a node agent does over WebDAV at a destination's root and below."""
    root = f"/{DEST}"
    d = f"{root}/meta{round_}"
    authority = f"http://127.0.0.1:{env.gateway.port}"
    steps: list[tuple[str, str, dict[str, str], bytes | None]] = [
        ("PROPFIND", f"{root}/", {"Depth": "1"}, None),
        ("MKCOL", f"{d}/", {}, None),
        ("PUT", f"{d}/module.json", {}, b"{}"),
        ("PUT", f"{root}/cluster-backup-{round_}.json.gz.gpg", {}, os.urandom(4096)),
        ("PROPFIND", f"{d}/", {"Depth": "1"}, None),
        ("COPY", f"{d}/module.json", {"Destination": f"{authority}{d}/copy.json"}, None),
        ("MOVE", f"{d}/copy.json", {"Destination": f"{authority}{d}/moved.json"}, None),
        ("PROPPATCH", f"{d}/moved.json", {"Content-Type": "application/xml"}, PROPUPDATE),
        ("LOCK", f"{d}/moved.json", {"Content-Type": "application/xml",
                                     "Timeout": "Second-60"}, LOCKINFO),
        ("DELETE", f"{d}/", {}, None),
        ("PROPFIND", f"{root}/", {"Depth": "1"}, None),
    ]
    return [env.request(method, path, NODE, headers=headers, body=body)[0]
            for method, path, headers, body in steps]


def test_webdav_child_stays_idle_and_prompt_after_a_node_webdav_mix(env: Env) -> None:
    for round_ in range(5):
        statuses = node_webdav_mix(env, round_)
        assert all(status < 500 for status in statuses), statuses
    pid = env.health()["backends"]["webdav"]["pid"]
    before = cpu_seconds(pid)
    time.sleep(3)
    idle_cpu = cpu_seconds(pid) - before
    # A busy-looping child burns the whole 3 s; an idle one next to nothing.
    assert idle_cpu < 0.5, f"the idle WebDAV child used {idle_cpu:.2f} s of CPU in 3 s"
    status, _, _ = env.request("PROPFIND", f"/{DEST}/", NODE, headers={"Depth": "1"},
                               timeout=10)
    assert status == 207


# --------------------------------------------------------------------------- 2: one 500


@pytest.mark.long(20)
def test_backend_500s_do_not_take_the_destination_away(env: Env, tmp_path: Path) -> None:
    module_uuid = str(uuidlib.uuid4())
    env.cluster.set_module("traefik2", module_uuid)
    env.cluster.add_user("module/traefik2", "traefik2-secret")
    env.cluster.publish("acl-changed")
    # rclone answers 500 to a REST HEAD of a directory: nothing wrong with the storage
    statuses = {env.request("HEAD", f"/{REMOTE_DEST}/", NODE, rest=True)[0] for _ in range(20)}
    assert statuses == {500}, statuses
    assert env.health()["destinations"][REMOTE_DEST]["served"] == "here"
    repo = env.repo(("module/traefik2", "traefik2-secret"), REMOTE_DEST, module_uuid)
    wait_for(lambda: env.request("GET", f"/{REMOTE_DEST}/traefik/{module_uuid}/config",
                                 ("module/traefik2", "traefik2-secret"), rest=True)[0] == 404,
             "the new module to be known", 10)
    data = tmp_path / "data"
    data.mkdir()
    (data / "file").write_bytes(os.urandom(100_000))
    restic(repo, "init")
    restic(repo, "backup", str(data))
    assert (env.remote_dir / "traefik" / module_uuid / "config").is_file()
    assert env.health()["destinations"][REMOTE_DEST]["served"] == "here"


# --------------------------------------------------------------------------- 3: lock-out


def test_wrong_passwords_under_the_node_name_never_lock_out_the_node(env: Env) -> None:
    config = f"/{DEST}/traefik/{TRAEFIK_UUID}/config"
    assert env.request("GET", config, NODE, rest=True)[0] in (200, 404)  # the agent, earlier
    wrong = ("node/1", "guess")
    statuses = [env.request("GET", config, wrong, rest=True)[0] for _ in range(200)]
    assert set(statuses) <= {401, 429} and statuses[-1] == 429, statuses
    # the node agent, right password, same address: served
    for _ in range(3):
        assert env.request("GET", config, NODE, rest=True)[0] in (200, 404)
    # and serving it did not wipe the guesser's record
    status, headers, _ = env.request("GET", config, wrong, rest=True)
    assert status == 429 and int(headers["retry-after"]) >= 1


# --------------------------------------------------------------------------- liveness


KIND_REQUESTS: dict[str, tuple[str, str, tuple[str, str], bool, dict[str, str]]] = {
    "restic": ("GET", f"/{DEST}/traefik/{TRAEFIK_UUID}/config", NODE, True, {}),
    "restic-append-only": ("GET", f"/{DEST}/traefik/{TRAEFIK_UUID}/config", TRAEFIK, True, {}),
    "webdav": ("PROPFIND", f"/{DEST}/", NODE, False, {"Depth": "0"}),
}


@pytest.mark.parametrize("kind", list(KIND_REQUESTS))
def test_a_stopped_child_is_replaced_and_killed(env: Env, kind: str) -> None:
    method, path, who, rest, headers = KIND_REQUESTS[kind]
    backend = env.health()["backends"][kind]
    old_pid, replaced_before = backend["pid"], backend["replacements"]
    stop_process(old_pid)
    try:
        started = time.monotonic()

        def served_again() -> bool:
            try:
                status, answer, _ = env.request(method, path, who, rest=rest, headers=headers,
                                                timeout=3)
            except (TimeoutError, OSError):
                return False
            return status < 500 and answer.get("x-gateway-backend") == f"{kind}@node1"

        wait_for(served_again, f"a replacement of the stopped {kind} child", REPLACED_WITHIN)
        took = time.monotonic() - started
        backend = env.health()["backends"][kind]
        assert backend["pid"] != old_pid, (took, backend, gone(old_pid),
                                           env.gateway.log_text()[-3000:])
        assert backend["replacements"] == replaced_before + 1
        assert backend["answering"] is True
        assert "liveness" in backend["last_replacement"]["reason"]
        assert backend["last_replacement"]["old_pid"] == old_pid
        # the stopped process is gone: SIGTERM cannot reach it, SIGKILL does
        wait_for(lambda: gone(old_pid), f"the stopped {kind} child to be killed", 60)
    finally:
        if not gone(old_pid):
            os.kill(old_pid, signal.SIGCONT)
    print(f"{kind}: served again by a replacement after {took:.1f} s")
    _, _, metrics = env.request("GET", "/metrics")
    line = (f'rclone_gateway_backend_replacements_total{{backend="{kind}",'
            f'reason="unresponsive"}} {replaced_before + 1}.0')
    assert line in metrics.decode()
    assert f"pid {old_pid}) replaced by" in env.gateway.log_text()
    assert env.health()["status"] == "ok"


# --------------------------------------------------------------------------- found by the soak


def test_a_crashed_child_holds_up_only_its_own_requests_and_only_briefly(env: Env) -> None:
    node_config = f"/{DEST}/traefik/{TRAEFIK_UUID}/config"
    module_config = f"/{REMOTE_DEST}/traefik/{TRAEFIK_UUID}/config"
    old_pid = env.health()["backends"]["restic"]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    # the module's own child runs: served at once, whatever the node's child does
    status, headers, _ = env.request("GET", module_config, TRAEFIK, rest=True)
    assert status in (200, 404) and headers["x-gateway-backend"] == "restic-append-only@node1"
    # the node's request waits for its child to come back, rather than a 503 that would
    # end a restic run at its first request
    status, headers, body = env.request("GET", node_config, NODE, rest=True)
    assert status in (200, 404), body
    assert headers["x-gateway-backend"] == "restic@node1"
    assert env.health()["backends"]["restic"]["pid"] != old_pid


def test_a_stuck_webdav_child_does_not_make_a_remote_unreachable(env: Env) -> None:
    module_config = f"/{REMOTE_DEST}/traefik/{TRAEFIK_UUID}/config"
    pid = env.health()["backends"]["webdav"]["pid"]
    stop_process(pid)
    # a request stuck on the stopped child keeps it (and its connections) in service
    # after its replacement, until it times out
    def stuck_request() -> None:
        with contextlib.suppress(OSError):
            env.request("PROPFIND", f"/{DEST}/", NODE, headers={"Depth": "0"}, timeout=60)

    threading.Thread(target=stuck_request, daemon=True).start()
    try:
        # Each 500 brings a probe of the remote forward: the probes go through the stuck
        # child and time out (4 s), before its replacement (about 8 s here) and across it.
        until = time.monotonic() + 14
        while time.monotonic() < until:
            assert env.request("HEAD", f"/{REMOTE_DEST}/", NODE, rest=True)[0] == 500
            status, _, body = env.request("GET", module_config, TRAEFIK, rest=True)
            assert status in (200, 404), body
            time.sleep(1)
        health = env.health()
        assert health["destinations"][REMOTE_DEST]["served"] == "here"
        assert health["backends"]["webdav"]["pid"] != pid  # it was replaced meanwhile
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGCONT)
