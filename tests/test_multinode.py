"""Three nodes on one machine: routing to the hosting node and failover to peers (spec 7).

Each node is a network namespace with its own gateway on port 4694; a fourth
namespace ("svc") holds the Redis all nodes read and a plain `rclone serve s3`
that is the remote storage of one destination (S3 like most remotes: an
interrupted upload leaves no partial object). A blackhole route in a node's
namespace makes that storage unreachable from that node only. A second destination
on the same storage is reached by each node through a fault proxy of its own
(`tests/faultproxy.py`, on 127.0.0.1:9000 inside the node's namespace): blackholing one
node's proxy takes that storage from that node alone, with nothing else changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from faultproxy import FaultProxy
from harness import (
    RESTIC_BINARIES,
    Cluster,
    GatewayProcess,
    _register,
    _stop_popen,
    basic,
    restic,
    restic_process,
    send_request,
    stop_gateways,
    wait_for,
    wait_listening,
)
from identities import TRAEFIK, TRAEFIK_UUID
from identities import node as node_user
from netns import Topology, inside, netns_exec, unavailable_reason

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

PORT = 4694
NODES = (1, 2, 3)
LEADER = 2
REDIS_HOST = 10
STORAGE_HOST = 20
HOSTED_BY_2 = "aa000002-1b2a-4d6e-9f70-aa11bb22cc33"
REMOTE = "bb000020-1b2a-4d6e-9f70-aa11bb22cc33"
LINKED = "cc000020-1b2a-4d6e-9f70-aa11bb22cc33"  # the same storage, through each node's link
LINK_PORT = 9000
S3_KEY = "MESHACCESSKEY"
S3_SECRET = "mesh-storage-secret-5b1f"
RCLONE = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "rclone")


@dataclass
class Mesh:
    topology: Topology
    workdir: Path
    storage: Path  # the remote storage's directory, as `rclone serve s3` serves it
    gateways: dict[int, GatewayProcess] = field(default_factory=dict)
    links: dict[int, FaultProxy] = field(default_factory=dict)  # node -> its proxy to storage

    def ns(self, node: int) -> str:
        return self.topology.name(f"n{node}")

    def vpn(self, node: int) -> str:
        return self.topology.address(node)

    def request(self, node: int, method: str, path: str, who: tuple[str, str] | None = None, *,
                headers: dict[str, str] | None = None, body: bytes | None = None,
                rest: bool = False, to: str = "127.0.0.1", source: str | None = None,
                ) -> tuple[int, dict[str, str], bytes]:
        """One request from inside node `node`'s namespace (to its own gateway by default)."""
        conn = http.client.HTTPConnection(
            to, PORT, timeout=30, source_address=(source, 0) if source else None)
        try:
            with inside(self.ns(node)):
                conn.connect()
            return send_request(conn, method, path, who, headers=headers, body=body, rest=rest)
        finally:
            conn.close()

    def health(self, node: int) -> dict:
        status, _, body = self.request(node, "GET", "/health")
        assert status in (200, 503), body
        return json.loads(body)

    def served(self, node: int, dest: str) -> tuple[str, str | None]:
        """("here", None), ("peer", "node2") or ("no", None), as node's /health says."""
        entry = self.health(node)["destinations"][dest]
        return entry["served"], entry.get("peer")

    def wait_served(self, node: int, dest: str, expected: tuple[str, str | None],
                    timeout: float = 20) -> None:
        wait_for(lambda: self.served(node, dest) == expected,
                 lambda: f"node{node} serving {dest} as {expected}: "
                         f"{self.health(node)['destinations'][dest]}", timeout)

    def repo(self, node: int, who: tuple[str, str], dest: str,
             app: str = "traefik", module_uuid: str = TRAEFIK_UUID) -> str:
        user = who[0].replace("/", "%2F")
        return f"rest:http://{user}:{who[1]}@127.0.0.1:{PORT}/{dest}/{app}/{module_uuid}/"

    def restic(self, node: int, repo: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return restic(repo, *args, netns=self.ns(node), **kwargs)

    def access(self, node: int) -> list[dict]:
        """The access log lines of node's gateway, oldest first."""
        entries = []
        for line in self.gateways[node].log_text().splitlines():
            if line.startswith("{"):  # access lines are bare JSON objects
                entries.append(json.loads(line))
        return entries

    @contextlib.contextmanager
    def cluster(self) -> Iterator[Cluster]:
        client = redis.Redis(unix_socket_path=str(self.workdir / "redis" / "redis.sock"),
                             decode_responses=True)
        try:
            yield Cluster(client)
        finally:
            client.close()

    @contextlib.contextmanager
    def storage_unreachable_from(self, *nodes: int) -> Iterator[None]:
        try:
            for node in nodes:
                self.topology.blackhole(f"n{node}", STORAGE_HOST)
            yield
        finally:
            for node in nodes:
                self.topology.blackhole(f"n{node}", STORAGE_HOST, on=False)
            for node in nodes:
                if node in self.gateways and self.gateways[node].proc.poll() is None:
                    # both reach the storage host: its proxy, in the node's namespace, too
                    for dest in (REMOTE, LINKED):
                        self.wait_served(node, dest, ("here", None), timeout=30)


def start_in(namespace: str, argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen([*netns_exec(namespace), *argv], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, process_group=0)
    _register(proc)
    return proc


def make_files(directory: Path, count: int, size: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (directory / f"file{i}.bin").write_bytes(os.urandom(size))
    return directory


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("mesh")
    topology = Topology()
    services: list[subprocess.Popen] = []
    mesh = Mesh(topology, workdir, workdir / "storage")
    try:
        topology.create_bridge()
        svc = topology.add_member("svc", REDIS_HOST, STORAGE_HOST)
        for node in NODES:
            topology.add_member(f"n{node}", node)

        redis_dir = workdir / "redis"
        redis_dir.mkdir()
        socket_path = redis_dir / "redis.sock"
        services.append(start_in(svc, [
            shutil.which("redis-server") or "redis-server",
            "--bind", topology.address(REDIS_HOST), "--port", "6379",
            "--unixsocket", str(socket_path), "--unixsocketperm", "700",
            "--protected-mode", "no",  # reachable only inside the test namespaces
            "--save", "", "--appendonly", "no", "--dir", str(redis_dir)], redis_dir / "log"))
        wait_listening(topology.address(REDIS_HOST), 6379, services[-1], netns=svc)

        (mesh.storage / "backups").mkdir(parents=True)
        services.append(start_in(svc, [
            RCLONE, "serve", "s3", str(mesh.storage), "--auth-key", f"{S3_KEY},{S3_SECRET}",
            "--addr", f"{topology.address(STORAGE_HOST)}:8080"], workdir / "storage.log"))
        wait_listening(topology.address(STORAGE_HOST), 8080, services[-1], netns=svc)
        for node in NODES:
            mesh.links[node] = FaultProxy((topology.address(STORAGE_HOST), 8080),
                                          port=LINK_PORT, netns=mesh.ns(node))

        client = redis.Redis(unix_socket_path=str(socket_path), decode_responses=True)
        cluster = Cluster(client)
        cluster.set_network(topology.cidr)
        cluster.set_leader(LEADER)
        for node in NODES:
            cluster.set_node_vpn(node, topology.address(node))
            cluster.add_user(*node_user(node))
        cluster.add_user(*TRAEFIK)
        cluster.set_module("traefik1", TRAEFIK_UUID, node_id=1)
        cluster.add_destination(HOSTED_BY_2, provider="cluster", name="node 2 disk",
                                url=f"webdav:http://{topology.address(2)}:{PORT}")
        cluster.add_destination(
            REMOTE, provider="rclone", url="rclone:s3", name="shared storage",
            basepath="backups",  # the bucket
            rclone_conf=(f"[{REMOTE}]\ntype = s3\nprovider = Rclone\n"
                         f"endpoint = http://{topology.address(STORAGE_HOST)}:8080\n"
                         f"access_key_id = {S3_KEY}\nsecret_access_key = {S3_SECRET}\n"))
        cluster.add_destination(
            LINKED, provider="aws", url=f"s3:127.0.0.1:{LINK_PORT}/backups/linked",
            name="shared storage, through each node's link",
            rclone_conf=(f"[{LINKED}]\ntype = s3\nprovider = Other\n"
                         f"endpoint = http://127.0.0.1:{LINK_PORT}\nforce_path_style = true\n"
                         f"access_key_id = {S3_KEY}\nsecret_access_key = {S3_SECRET}\n"))
        client.close()

        redis_url = f"redis://{topology.address(REDIS_HOST)}:6379/0"
        for node in NODES:
            mesh.gateways[node] = GatewayProcess.start(
                redis_url, node, workdir / f"node{node}", listen_host="0.0.0.0", port=PORT,
                netns=mesh.ns(node),
                extra_args=["--probe-interval", "1", "--remote-probe-interval", "3",
                            "--probe-timeout", "3"])
        for node in NODES:
            wait_for(lambda node=node: all(p["reachable"] and "ok" in p["destinations"].values()
                                           for p in mesh.health(node)["peers"].values()),
                     lambda node=node: f"node{node} to see its peers: "
                                       f"{mesh.health(node)['peers']}", 20)
        yield mesh
    finally:
        try:
            stop_gateways(*mesh.gateways.values())
        finally:
            for link in mesh.links.values():
                link.close()
            for proc in services:
                _stop_popen(proc, signal.SIGTERM, 10)
            topology.destroy()


# --------------------------------------------------------------------------- tests


def test_backup_to_a_destination_hosted_by_another_node(mesh: Mesh, tmp_path: Path) -> None:
    assert mesh.served(1, HOSTED_BY_2) == ("peer", "node2")
    assert mesh.served(2, HOSTED_BY_2) == ("here", None)
    repo = mesh.repo(1, TRAEFIK, HOSTED_BY_2)
    data = make_files(tmp_path / "data", count=4, size=300_000)
    mesh.restic(1, repo, "init")
    mesh.restic(1, repo, "backup", str(data))

    stored = mesh.gateways[2].local_repo / "traefik" / TRAEFIK_UUID
    assert (stored / "config").is_file()
    assert len(list((stored / "snapshots").iterdir())) == 1
    assert list((stored / "data").rglob("*")), "no pack files on node 2"
    assert not (mesh.gateways[1].local_repo / "traefik").exists()

    status, headers, _ = mesh.request(
        1, "GET", f"/{HOSTED_BY_2}/traefik/{TRAEFIK_UUID}/config", TRAEFIK, rest=True)
    assert status == 200
    assert headers["x-gateway-backend"] == "restic-append-only@node2"
    # node 2 saw the module itself, coming from node 1's VPN address
    seen = [e for e in mesh.access(2) if e["user"] == TRAEFIK[0] and e["method"] == "POST"]
    assert seen and all(e["source"] == mesh.vpn(1) for e in seen)


def test_a_forwarded_backup_is_recorded_once_by_the_node_that_serves_it(
        mesh: Mesh, tmp_path: Path) -> None:
    module_uuid = str(uuidlib.uuid4())
    who = ("module/traefik4", "traefik4-secret")
    with mesh.cluster() as cluster:
        cluster.add_user(*who)
        cluster.set_module("traefik4", module_uuid, node_id=1)
        cluster.publish("acl-changed")
    wait_for(lambda: mesh.request(1, "GET", f"/{HOSTED_BY_2}/traefik/{module_uuid}/config",
                                  who, rest=True)[0] == 404,
             "the new module user to be known", 10)
    repo = mesh.repo(1, who, HOSTED_BY_2, module_uuid=module_uuid)
    mesh.restic(1, repo, "init")
    mesh.restic(1, repo, "backup", str(make_files(tmp_path / "data", count=2, size=50_000)))

    def status(node: int, html: bool = False) -> tuple[int, bytes]:
        accept = "text/html" if html else "application/json"
        code, _, body = mesh.request(node, "GET", "/status", node_user(node),
                                     headers={"Accept": accept})
        return code, body

    def repositories(node: int) -> dict[str, dict]:
        code, body = status(node)
        assert code == 200, body
        return {r["uuid"]: r for r in json.loads(body)["repositories"]}

    # node 2 serves it and recorded it; node 1 only passed it on
    recorded = repositories(2)[module_uuid]
    assert recorded["module"] == "traefik4" and recorded["last_snapshot_at"] is not None
    assert recorded["uploaded_objects"] >= 4
    assert module_uuid not in repositories(1)
    # node 1's page names the node that serves that destination
    code, page = status(1, html=True)
    assert code == 200
    assert f'href="http://{mesh.vpn(2)}:4694/status">node2</a>'.encode() in page


def test_limits_apply_once_on_the_node_that_serves(mesh: Mesh) -> None:
    """A module's upload sent on to a peer is shaped and held to its quota by the node that
    stores it; the node that sends it on neither waits for a bandwidth share nor counts it."""
    module_uuid = str(uuidlib.uuid4())
    who = ("module/traefik5", "traefik5-secret")
    base = f"/{HOSTED_BY_2}/traefik/{module_uuid}"
    scope = '{direction="upload",scope="module/traefik5"}'

    def waited(node: int) -> float:
        _, _, body = mesh.request(node, "GET", "/metrics")
        for line in body.decode().splitlines():
            if line.startswith("rclone_gateway_bandwidth_wait_seconds_total" + scope):
                return float(line.split()[-1])
        return -1.0  # no such bucket: the limit is not in force there

    def quota_entry(node: int) -> dict | None:
        _, _, body = mesh.request(node, "GET", "/status", node_user(node),
                                  headers={"Accept": "application/json"})
        return next((q for q in json.loads(body)["limits"]["quotas"]
                     if q["module"] == "traefik5"), None)

    with mesh.cluster() as cluster:
        cluster.add_user(*who)
        cluster.set_module("traefik5", module_uuid, node_id=1)
        cluster.r.hset("rclone-gateway/bwlimit", "module/traefik5/upload", "4M")
        cluster.publish("backup-limits-changed")
    try:
        wait_for(lambda: waited(1) == 0.0 and waited(2) == 0.0,
                 lambda: f"the limit in force on both nodes: {waited(1)}, {waited(2)}", 10)
        assert mesh.request(1, "POST", f"{base}/?create=true", who, rest=True)[0] == 200
        content = os.urandom(8 * 1024 * 1024)  # 2 s at 4 MiB/s
        path = f"{base}/data/{hashlib.sha256(content).hexdigest()}"
        assert mesh.request(1, "POST", path, who, rest=True, body=content)[0] == 200
        assert waited(2) >= 1.0, waited(2)
        assert waited(1) == 0.0

        wait_for(lambda: (quota_entry(2) or {}).get("used_bytes") == len(content),
                 lambda: f"node 2 to count the upload: {quota_entry(2)}", 120)
        assert quota_entry(1) is None  # node 1 stores nothing of it
        with mesh.cluster() as cluster:
            cluster.r.hset(f"rclone-gateway/quota/{HOSTED_BY_2}", "traefik5",
                           str(len(content) + 1000))
            cluster.publish("backup-limits-changed")
        wait_for(lambda: (quota_entry(2) or {}).get("quota_bytes") == len(content) + 1000,
                 lambda: f"the quota in force on node 2: {quota_entry(2)}", 10)
        more = os.urandom(5000)
        over = f"{base}/data/{hashlib.sha256(more).hexdigest()}"
        status, headers, _ = mesh.request(1, "POST", over, who, rest=True, body=more)
        assert status == 507 and headers.get("x-gateway-backend") == "peer@node2"

        def refused() -> list[tuple[int, str]]:  # node 2's access line is written after
            return [(e["status"], e["reason"]) for e in mesh.access(2) if e["path"] == over]

        wait_for(lambda: bool(refused()), "node 2's access line of the 507", 10)
        assert refused() == [(507, "over quota")]
    finally:
        with mesh.cluster() as cluster:
            cluster.r.delete("rclone-gateway/bwlimit", f"rclone-gateway/quota/{HOSTED_BY_2}")
            cluster.publish("backup-limits-changed")


def test_an_upload_cut_short_through_a_peer_leaves_nothing(mesh: Mesh) -> None:
    mesh.request(1, "POST", f"/{HOSTED_BY_2}/traefik/{TRAEFIK_UUID}/?create=true", TRAEFIK,
                 rest=True)  # the repository may exist already: any answer will do
    content = os.urandom(4 * 1024 * 1024)
    object_id = hashlib.sha256(content).hexdigest()
    path = f"/{HOSTED_BY_2}/traefik/{TRAEFIK_UUID}/data/{object_id}"
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(*TRAEFIK)}\r\n"
            f"Accept: application/vnd.x.restic.rest.v2\r\n"
            f"Content-Length: {len(content)}\r\n\r\n").encode()
    with inside(mesh.ns(1)):
        sock = socket.create_connection(("127.0.0.1", PORT))
    with sock:
        sock.sendall(head + content[: len(content) // 2])
        time.sleep(0.5)

    def cut() -> list[dict]:
        return [e for e in mesh.access(1) if e["path"] == path]

    wait_for(lambda: bool(cut()), lambda: f"node 1 to log the cut upload: {cut()}", 10)
    assert (cut()[0]["status"], cut()[0]["reason"]) == (499, "client went away")
    stored = mesh.gateways[2].local_repo / "traefik" / TRAEFIK_UUID / "data"
    wait_for(lambda: not list(stored.rglob(object_id + "*")),
             lambda: f"node 2 to drop the partial object: {list(stored.rglob(object_id + '*'))}",
             5)
    status, _, _ = mesh.request(1, "HEAD", path, TRAEFIK, rest=True)
    assert status == 404


def test_unreachable_remote_is_served_through_the_leader(mesh: Mesh, tmp_path: Path) -> None:
    probe = f"/{REMOTE}/_probe_rest_404"
    assert mesh.served(1, REMOTE) == ("here", None)
    # a peer's health check of node 1 (the same probe the old gateways use)
    assert mesh.request(2, "GET", probe, rest=True, to=mesh.vpn(1), source=mesh.vpn(2))[0] == 404

    with mesh.storage_unreachable_from(1):
        mesh.wait_served(1, REMOTE, ("peer", f"node{LEADER}"))
        status, headers, _ = mesh.request(2, "GET", probe, rest=True, to=mesh.vpn(1),
                                          source=mesh.vpn(2))
        assert status == 503 and "retry-after" in headers

        repo = mesh.repo(1, TRAEFIK, REMOTE)
        data = make_files(tmp_path / "data", count=4, size=300_000)
        mesh.restic(1, repo, "init", check=False)  # another test may have made it already
        mesh.restic(1, repo, "backup", str(data))

        stored = mesh.storage / "backups" / "traefik" / TRAEFIK_UUID
        assert (stored / "config").is_file()
        leader_saw = [e for e in mesh.access(LEADER) if e["user"] == TRAEFIK[0]]
        assert any(e["method"] == "POST" and "/data/" in e["path"] for e in leader_saw)
        assert all(e["source"] == mesh.vpn(1) for e in leader_saw)

        check = mesh.restic(3, mesh.repo(3, node_user(3), REMOTE), "check", "--read-data")
        assert "no errors were found" in check.stdout


def test_a_node_that_loses_its_route_to_a_remote_backs_up_through_a_peer(
        mesh: Mesh, tmp_path: Path) -> None:
    """Node 1's link to the storage goes dark (its proxy forwards nothing, connects time
    out) as a backup through node 1 starts: nothing tells node 1 beforehand. The backup
    succeeds through a peer (restic's own retries allowed); the other destinations are
    served as before."""
    module_uuid = str(uuidlib.uuid4())
    who = ("module/traefik6", "traefik6-secret")
    with mesh.cluster() as cluster:
        cluster.add_user(*who)
        cluster.set_module("traefik6", module_uuid, node_id=1)
        cluster.publish("acl-changed")
    wait_for(lambda: mesh.request(1, "GET", f"/{LINKED}/traefik/{module_uuid}/config",
                                  who, rest=True)[0] == 404,
             "the new module user to be known", 10)
    assert mesh.served(1, LINKED) == ("here", None)
    repo = mesh.repo(1, who, LINKED, module_uuid=module_uuid)
    data = make_files(tmp_path / "data", count=4, size=300_000)
    restic_018 = RESTIC_BINARIES["restic-0.18"]
    leader_seen = len(mesh.access(LEADER))
    with mesh.links[1].blackholed():
        started = time.monotonic()
        mesh.restic(1, repo, "init", binary=restic_018, timeout=240)
        mesh.restic(1, repo, "backup", str(data), binary=restic_018, timeout=240)
        took = time.monotonic() - started
        print(f"\ninit and backup through node 1, its link to the storage dark: {took:.1f} s")

        stored = mesh.storage / "backups" / "linked" / "traefik" / module_uuid
        assert (stored / "config").is_file()
        assert len(list((stored / "snapshots").iterdir())) == 1
        leader_saw = [e for e in mesh.access(LEADER)[leader_seen:] if e["user"] == who[0]]
        assert any(e["method"] == "POST" and "/data/" in e["path"] and e["status"] == 200
                   for e in leader_saw)
        # the other destinations: the remote node 1 reaches directly, and node 2's disk
        assert mesh.served(1, REMOTE) == ("here", None)
        assert mesh.served(1, HOSTED_BY_2) == ("peer", "node2")
        status, headers, _ = mesh.request(1, "PROPFIND", f"/{REMOTE}/", node_user(1),
                                          headers={"Depth": "1"})
        assert (status, headers["x-gateway-backend"]) == (207, "webdav@node1")
        for node in (2, 3):
            assert mesh.served(node, LINKED) == ("here", None)
    # The requests that met the dark link were moved on by node 1 itself, not left to hang
    # until the backend timeout (504), as they were while the children ran with rclone's
    # defaults and only later requests went to a peer.
    seen_by_1 = [e for e in mesh.access(1) if e["user"] == who[0] and LINKED in e["path"]]
    print("node 1's answers: " + ", ".join(
        f"{e['method']} {e['status']} {e['backend']}" for e in seen_by_1 if e["status"] >= 500
        or not e["backend"].endswith("@node1")))
    assert not [e for e in seen_by_1 if e["status"] == 504], seen_by_1
    mesh.wait_served(1, LINKED, ("here", None), timeout=30)
    check = mesh.restic(1, mesh.repo(1, node_user(1), LINKED, module_uuid=module_uuid),
                        "check", "--read-data", binary=restic_018)
    assert "no errors were found" in check.stdout


def test_killed_peer_moves_requests_to_the_next_one(mesh: Mesh) -> None:
    """Node 2 is killed in the middle of a backup it serves; node 3 takes over.

    The backup reads stdin, so it can be held between two pack uploads: killed
    with an upload in flight, a peer may have stored the object without
    answering, and restic's retry of it is then refused by the append-only
    backend, which is not what this test is about.
    """
    module_uuid = str(uuidlib.uuid4())
    who = ("module/traefik2", "traefik2-secret")
    with mesh.cluster() as cluster:
        cluster.add_user(*who)
        cluster.set_module("traefik2", module_uuid, node_id=1)
        cluster.publish("acl-changed")
    repo = mesh.repo(1, who, REMOTE, module_uuid=module_uuid)
    node2 = mesh.gateways[2]

    def uploads(node: int, since: int = 0) -> int:
        return sum(1 for e in mesh.access(node)[since:] if e["user"] == who[0]
                   and e["method"] == "POST" and "/data/" in e["path"] and e["status"] == 200)

    try:
        with mesh.storage_unreachable_from(1):
            mesh.wait_served(1, REMOTE, ("peer", "node2"))
            known = f"/{HOSTED_BY_2}/traefik/{module_uuid}/config"  # known on nodes 1 and 2
            wait_for(lambda: mesh.request(1, "GET", known, who, rest=True)[0] == 404,
                     "the new module user to be known", 10)
            mesh.restic(1, repo, "init")

            backup = restic_process(repo, "backup", "--stdin", "--stdin-filename", "big.bin",
                                    "--pack-size", "4", netns=mesh.ns(1))
            try:
                assert backup.stdin is not None
                backup.stdin.write(os.urandom(16 << 20))
                backup.stdin.flush()
                wait_for(lambda: uploads(2) >= 1, "node 2 to store a pack", 60)
                wait_for(lambda: mesh.health(2)["inflight"] == 1,  # /health counts itself
                         "node 2 to be idle", 10)
                seen_by_3 = len(mesh.access(3))
                node2.stop(signal.SIGKILL, timeout=5)
                # at once, before any probe could tell: the request moves on by itself
                status, headers, _ = mesh.request(
                    1, "GET", f"/{REMOTE}/traefik/{module_uuid}/config", who, rest=True)
                assert (status, headers["x-gateway-backend"]) == (
                    200, "restic-append-only@node3")
                _, stderr = backup.communicate(os.urandom(12 << 20), timeout=120)
            finally:
                _stop_popen(backup, signal.SIGKILL, 5)
            assert backup.returncode == 0, stderr.decode(errors="replace")
            assert uploads(3, since=seen_by_3) >= 2, "node 3 did not take over the uploads"
            assert mesh.served(1, REMOTE) == ("peer", "node3")
            assert not mesh.health(1)["peers"]["node2"]["reachable"]

            check = mesh.restic(3, mesh.repo(3, node_user(3), REMOTE, module_uuid=module_uuid),
                                "check", "--read-data")
            assert "no errors were found" in check.stdout
    finally:
        if node2.proc is not None and node2.proc.poll() is not None:
            node2.kill_leftovers()
            node2.restart()
        mesh.wait_served(1, HOSTED_BY_2, ("peer", "node2"))


def test_backup_right_after_a_cluster_boot(mesh: Mesh, tmp_path: Path) -> None:
    """Node 1 starts before node 2, as a cluster boot may order them: its first probe finds
    node 2 down. A backup through node 1 to node 2's disk, started as soon as node 2 is
    up, must not be refused on the strength of that probe (spec 7: a peer not seen serving
    yet is tried, not refused)."""
    module_uuid = str(uuidlib.uuid4())
    who = ("module/traefik3", "traefik3-secret")
    with mesh.cluster() as cluster:
        cluster.add_user(*who)
        cluster.set_module("traefik3", module_uuid, node_id=1)
    node1, node2 = mesh.gateways[1], mesh.gateways[2]
    argv = list(node1.argv)
    try:
        node1.stop()
        node2.stop()
        # a probe interval longer than the test: node 1 probes node 2 once, at its start
        node1.argv = [*argv, "--probe-interval", "600"]
        node1._launch()
        wait_for(lambda: mesh.health(1)["peers"]["node2"]["reachable"] is False,
                 lambda: f"node 1 to find node 2 down: {mesh.health(1)['peers']}", 20)
        node2._launch()
        repo = mesh.repo(1, who, HOSTED_BY_2, module_uuid=module_uuid)
        mesh.restic(1, repo, "init")
        mesh.restic(1, repo, "backup", str(make_files(tmp_path / "data", count=2, size=10_000)))
        assert (node2.local_repo / "traefik" / module_uuid / "config").is_file()
    finally:
        node1.stop()
        node1.argv = argv
        node1._launch()
        if node2.proc is None or node2.proc.poll() is not None:
            node2._launch()
        mesh.wait_served(1, HOSTED_BY_2, ("peer", "node2"))


def test_no_loop_a_forwarded_request_is_never_sent_on(mesh: Mesh) -> None:
    path = f"/{REMOTE}/traefik/{TRAEFIK_UUID}/config"
    node = node_user(1)
    with mesh.storage_unreachable_from(1, 2):
        mesh.wait_served(2, REMOTE, ("peer", "node3"))
        mesh.wait_served(1, REMOTE, ("peer", "node3"))
        seen_before = {n: len(mesh.access(n)) for n in NODES}

        # node 1 sending to node 2 (which cannot serve it): refused, not sent on to node 3
        for marker in ({"X-Gateway-Forwarded": "node1"}, {}):
            status, headers, body = mesh.request(1, "GET", path, node, rest=True, headers=marker,
                                                 to=mesh.vpn(2), source=mesh.vpn(1))
            assert status == 503, body
            assert "retry-after" in headers
            assert b"not sent on" in body
        # a local client of node 2 claiming to be forwarded only gets less
        status, _, body = mesh.request(2, "GET", path, node_user(2), rest=True,
                                       headers={"X-Gateway-Forwarded": "node9"})
        assert status == 503, body
        for n in (1, 3):
            sent_on = [e for e in mesh.access(n)[seen_before[n]:] if e["path"] == path]
            assert sent_on == [], f"node{n} received a forwarded request"

        # while node 2's own clients are sent on to node 3
        status, headers, _ = mesh.request(2, "GET", path, node_user(2), rest=True)
        assert status in (200, 404)  # 404 when the repository does not exist (test run alone)
        assert headers["x-gateway-backend"] == "restic@node3"

        with mesh.storage_unreachable_from(3):
            mesh.wait_served(1, REMOTE, ("no", None))
            status, headers, body = mesh.request(1, "GET", path, node, rest=True)
            assert status == 503
            assert "retry-after" in headers
            assert b"no node can serve" in body


def test_access_policy_holds_through_a_peer(mesh: Mesh, tmp_path: Path) -> None:
    repo = mesh.repo(1, TRAEFIK, REMOTE)
    base = f"/{REMOTE}/traefik/{TRAEFIK_UUID}"
    with mesh.storage_unreachable_from(1):
        mesh.wait_served(1, REMOTE, ("peer", "node2"))
        mesh.restic(1, repo, "init", check=False)  # the repository may exist already
        mesh.restic(1, repo, "backup", str(make_files(tmp_path / "data", count=1, size=1000)))
        snapshots = json.loads(mesh.restic(1, repo, "snapshots", "--json").stdout)
        snapshot = snapshots[0]["id"]
        stored = mesh.storage / "backups" / "traefik" / TRAEFIK_UUID
        config = (stored / "config").read_bytes()

        # refused by node 1 before anything is sent on
        status, _, body = mesh.request(1, "DELETE", f"{base}/snapshots/{snapshot}", TRAEFIK,
                                       rest=True)
        assert status == 403 and b"may not delete" in body
        # and by the peer itself, were it asked directly
        status, _, body = mesh.request(1, "DELETE", f"{base}/snapshots/{snapshot}", TRAEFIK,
                                       rest=True, to=mesh.vpn(2), source=mesh.vpn(1),
                                       headers={"X-Gateway-Forwarded": "node1"})
        assert status == 403 and b"may not delete" in body
        # the peer serves the module append-only, as node 1 would
        status, headers, _ = mesh.request(1, "POST", f"{base}/config", TRAEFIK, rest=True,
                                          body=b"replaced")
        assert status == 403
        assert headers["x-gateway-backend"] == "restic-append-only@node2"

        seen = len(mesh.access(1))
        forget = restic_process(repo, "forget", snapshot, netns=mesh.ns(1))
        try:
            # restic retries a refused delete for about a minute: the first refusal is enough
            wait_for(lambda: any(e["user"] == TRAEFIK[0] and e["method"] == "DELETE"
                                 and e["path"].endswith(snapshot) and e["status"] == 403
                                 for e in mesh.access(1)[seen:]),
                     "restic forget to try deleting the snapshot", 60)
        finally:
            _stop_popen(forget, signal.SIGINT, 20)
        assert forget.returncode != 0
        assert (stored / "snapshots" / snapshot).is_file()
        assert (stored / "config").read_bytes() == config
        node_repo = mesh.repo(3, node_user(3), REMOTE)
        ids = [s["id"] for s in json.loads(mesh.restic(3, node_repo, "snapshots", "--json").stdout)]
        assert snapshot in ids


def test_no_secret_reaches_health_or_logs(mesh: Mesh) -> None:
    """Forwarding carries the client's Authorization: it must not show up anywhere."""
    secrets = [S3_SECRET, TRAEFIK[1], basic(*TRAEFIK), "traefik2-secret",
               *(node_user(n)[1] for n in NODES)]
    for node in NODES:
        health = json.dumps(mesh.health(node))
        log = mesh.gateways[node].log_text()
        for secret in secrets:
            assert secret not in health, f"node{node} /health"
            assert secret not in log, f"node{node} log"


def test_a_forwarded_answer_keeps_rclones_server_header(mesh: Mesh) -> None:
    """Spec section 7: restic reads `Server: rclone/<version>` to tell a listing that
    failed inside rclone from a missing directory; through a peer it is still there."""
    base = f"/{HOSTED_BY_2}/traefik/{TRAEFIK_UUID}"
    for path in (f"{base}/config", f"{base}/snapshots/"):
        status, headers, _ = mesh.request(1, "GET", path, TRAEFIK, rest=True)
        print(f"{path} through node1: {status}, Server: {headers.get('server')!r}, "
              f"X-Gateway-Backend: {headers.get('x-gateway-backend')!r}")
        assert headers.get("x-gateway-backend", "").endswith("@node2"), (status, headers)
        assert headers.get("server", "").startswith("rclone/"), (status, headers)
