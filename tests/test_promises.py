"""Promises the documentation makes, each checked against a real gateway.

docs/*.md promise behaviour that no other test looked at: the order of
`Expect: 100-continue` and the policy, the backend timeout, the periodic re-read
of Redis, the private runtime directory, children that never listen on TCP,
headers that never reach a backend, SIGHUP re-checking a failed remote, 503 from
a restarting backend, settings from the agent environment, the exit codes of the
operator commands, READY=1 only once serving, a body never sent to a second
peer, and what `rclone_gateway_destination_up` leaves out.

Real redis-server, rclone and gateway processes, as everywhere else. Where a
backend or a peer gateway has to be watched from the other side, a small HTTP
server of this module stands in for it at the address the gateway uses (a
peer's VPN address on port 4694, a child's unix socket): the gateway under test
is never changed. Every gateway started here must stop without leaving a child
behind, or the test fails.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from harness import (
    REPO_ROOT,
    REST_ACCEPT,
    Cluster,
    GatewayProcess,
    RedisServer,
    basic,
    free_port,
    send_request,
    stop_gateways,
    stop_process,
    wait_for,
)

from gateway.status.metrics import live_families
from gateway.status.model import DestinationHealth, NodeStatus, RedisHealth

NODE = ("node/1", "promises-node-password-71")
TRAEFIK = ("module/traefik1", "promises-traefik-password-72")
TRAEFIK_UUID = "4d6e8f0a-2b3c-4d5e-8f70-8192a3b4c5d1"
OBJECT_ID = "cd" * 32
OWN_VPN = "127.0.0.1"  # this node's "VPN" address: peers' pools and probes leave from it
PEER_PORT = 4694  # peer gateways are always reached on this port (gateway/forwarding/peers.py)
DEADLINE = 60.0  # generous: the machine may be busy with other test runs


# --------------------------------------------------------------------------- helpers


def request(gateway: GatewayProcess, method: str, path: str, who: tuple[str, str] | None = None,
            *, headers: dict[str, str] | None = None, body: bytes | None = None,
            rest: bool = False, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=timeout)
    try:
        return send_request(conn, method, path, who, headers=headers, body=body, rest=rest)
    finally:
        conn.close()


def health(gateway: GatewayProcess) -> dict:
    """The /health document, whatever its status ({} when nothing answers)."""
    try:
        _, _, body = request(gateway, "GET", "/health", timeout=10)
    except (OSError, http.client.HTTPException):
        return {}
    return json.loads(body)


def seeded(client: redis.Redis, *, own_vpn: str | None = OWN_VPN) -> Cluster:
    """A cluster with a node and a module user, and this node's VPN address."""
    cluster = Cluster(client)
    cluster.flush()
    cluster.add_user(*NODE)
    cluster.add_user(*TRAEFIK)
    cluster.set_module("traefik1", TRAEFIK_UUID)
    if own_vpn is not None:
        cluster.set_node_vpn(1, own_vpn)
    return cluster


def add_local_destination(cluster: Cluster, own_vpn: str = OWN_VPN) -> str:
    """A `cluster` destination hosted by this node (its --local-repo directory)."""
    dest = str(uuid.uuid4())
    cluster.add_destination(dest, provider="cluster", url=f"webdav:http://{own_vpn}:4694",
                            name="local disk")
    return dest


def webdav_section(dest: str, port: int) -> str:
    return f"[{dest}]\ntype = webdav\nurl = http://127.0.0.1:{port}\nvendor = other\n"


def repo_path(dest: str, tail: str = "") -> str:
    return f"/{dest}/traefik/{TRAEFIK_UUID}{tail}"


@contextlib.contextmanager
def stopped_cleanly(gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    """Yields the gateway; then SIGTERM, exit code 0, and no child left behind, or FAIL."""
    try:
        yield gateway
    finally:
        [code] = stop_gateways(gateway, timeout=45)
        assert code == 0, f"gateway exited with {code}\n{gateway.log_text()[-3000:]}"


@contextlib.contextmanager
def own_redis() -> Iterator[tuple[RedisServer, redis.Redis]]:
    """A redis-server of the test's own, checked to be the one answering on its port
    (another test run may have taken the port between its choice and the bind)."""
    for _attempt in range(5):
        server = RedisServer()
        client = server.client()
        assert server.proc is not None
        if client.info("server")["process_id"] == server.proc.pid:
            break
        client.close()
        server.stop()
    else:
        pytest.fail("no redis-server of this test's own could be started")
    try:
        yield server, client
    finally:
        client.close()
        server.stop()


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="prom-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_gateway(redis_url: str, workdir: Path, *args: str,
                  env: dict[str, str | None] | None = None) -> GatewayProcess:
    # No NOTIFY_SOCKET or JOURNAL_STREAM from whatever runs the tests.
    full_env: dict[str, str | None] = {"NOTIFY_SOCKET": None, "JOURNAL_STREAM": None}
    full_env.update(env or {})
    return GatewayProcess.start(redis_url, "1", workdir, extra_args=args, env=full_env)


def child_pid(gateway: GatewayProcess, kind: str) -> int:
    pid = health(gateway)["backends"][kind]["pid"]
    assert isinstance(pid, int), f"no pid for {kind}: {health(gateway)['backends']}"
    return pid


# --------------------------------------------------------------------------- tiny servers


@dataclass
class Seen:
    head: bytes
    body: int = 0  # request body bytes read

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def is_probe(self) -> bool:
        return "/_probe_rest_404 " in self.request_line


Responder = Callable[[socket.socket, Seen, bytes], None]


class TinyServer:
    """An HTTP/1.1 server of this module on a listening socket, one request per
    connection: records each request head, then `respond(conn, seen, body_start)`."""

    def __init__(self, sock: socket.socket, respond: Responder) -> None:
        self.sock = sock
        self.respond = respond
        self.seen: list[Seen] = []
        self._stop = threading.Event()
        sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(20)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                seen = Seen(head)
                self.seen.append(seen)
                self.respond(conn, seen, rest)
            except OSError:
                pass

    def requests(self) -> list[Seen]:
        """What came in apart from peer probes."""
        return [s for s in self.seen if not s.is_probe]

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(5)


def header_value(head: bytes, name: str) -> str | None:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def read_body(conn: socket.socket, seen: Seen, start: bytes, limit: int | None = None) -> None:
    """Reads the request body (Content-Length), or `limit` bytes of it."""
    length = int(header_value(seen.head, "Content-Length") or 0)
    want = length if limit is None else min(limit, length)
    got = len(start)
    while got < want:
        chunk = conn.recv(65536)
        if not chunk:
            break
        got += len(chunk)
    seen.body = got


def answer(conn: socket.socket, status: str, extra: str = "", body: bytes = b"") -> None:
    conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}"
                 f"Connection: close\r\n\r\n".encode() + body)


def reset(conn: socket.socket) -> None:
    """Closing now sends RST instead of FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def peer_listener() -> tuple[str, socket.socket]:
    """A listening socket on port 4694 of a loopback address of its own (127.x.y.z)."""
    rng = random.Random()
    for _ in range(50):
        address = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((address, PEER_PORT))
        except OSError:
            sock.close()
            continue
        sock.listen(64)
        return address, sock
    raise RuntimeError("no free loopback address for a stand-in peer")


def unused_loopback() -> str:
    """A loopback address with nothing on port 4694 (checked by binding it once)."""
    address, sock = peer_listener()
    sock.close()
    return address


# --------------------------------------------------------------------------- shared gateway


@dataclass
class Shared:
    gateway: GatewayProcess
    cluster: Cluster
    redis_url: str
    local_dest: str
    peer_dest: str  # a remote that fails here: served through a peer (node 2)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One plain gateway for the tests that only read or send requests.

    Its Redis is its own: the `cluster` fixture of other modules flushes the session's.
    """
    with own_redis() as (server, client):
        cluster = seeded(client)
        local_dest = add_local_destination(cluster)
        # Port 1: nothing listens there, so this remote fails its start check here and its
        # requests go to node 2 (nothing listens there either: never probed successfully,
        # it is tried, so /health says the destination is served through it).
        peer_dest = str(uuid.uuid4())
        cluster.add_destination(peer_dest, provider="rclone", url="webdav:http://127.0.0.1:1",
                                name="offsite", basepath="repo",
                                rclone_conf=webdav_section(peer_dest, 1))
        cluster.set_node_vpn(2, unused_loopback())
        gateway = start_gateway(server.url, tmp_path_factory.mktemp("shared"))
        with stopped_cleanly(gateway):
            yield Shared(gateway, cluster, server.url, local_dest, peer_dest)


# --------------------------------------------------------------------------- 100-continue


def _exchange(gateway: GatewayProcess, head: bytes, body: bytes | None,
              timeout: float = 30) -> tuple[bytes, bytes]:
    """Sends `head`; reads until a final status arrives or, when `body` is given, until an
    interim one does, then sends `body` and reads the final answer.

    Returns (everything read before the body was sent, everything after)."""
    with socket.create_connection((gateway.host, gateway.port), timeout=timeout) as sock:
        sock.sendall(head)
        before = b""
        while b"\r\n\r\n" not in before:
            chunk = sock.recv(65536)
            if not chunk:
                return before, b""
            before += chunk
        if body is None or not before.startswith(b"HTTP/1.1 100 "):
            return before, b""
        # Nothing more may come before the body: the answer depends on it.
        sock.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            before += sock.recv(65536)
        sock.settimeout(timeout)
        sock.sendall(body)
        after = b""
        while b"\r\n\r\n" not in after:
            chunk = sock.recv(65536)
            if not chunk:
                break
            after += chunk
        return before, after


def test_expect_100_continue_is_answered_only_after_the_policy_allows(shared: Shared) -> None:
    """docs/architecture.md: `Expect: 100-continue` is answered only after the policy
    allowed the request, so a refused upload is never sent."""
    gateway, dest = shared.gateway, shared.local_dest
    name = f"expect-{uuid.uuid4().hex}.txt"
    body = b"sent only after 100 Continue\n"

    def head(path: str, who: tuple[str, str] | None) -> bytes:
        auth = f"Authorization: {basic(*who)}\r\n" if who else ""
        return (f"PUT {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len(body)}\r\n"
                f"Expect: 100-continue\r\nConnection: close\r\n\r\n").encode()

    refused = {
        "no credentials": (head(f"/{dest}/{name}", None), b"401"),
        "wrong password": (head(f"/{dest}/{name}", (NODE[0], "not-the-password")), b"401"),
        "module writing through WebDAV": (head(repo_path(dest, "/x.txt"), TRAEFIK), b"403"),
        "module deleting data (REST)": (
            f"DELETE {repo_path(dest, '/data/' + OBJECT_ID)} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {basic(*TRAEFIK)}\r\nAccept: {REST_ACCEPT}\r\n"
            f"Content-Length: 3\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".encode(),
            b"403"),
    }
    for case, (raw, status) in refused.items():
        before, _ = _exchange(gateway, raw, None)
        assert before.startswith(b"HTTP/1.1 " + status + b" "), (case, before[:200])
        assert b"100 Continue" not in before, (case, before[:200])

    before, after = _exchange(gateway, head(f"/{dest}/{name}", NODE), body)
    assert before == b"HTTP/1.1 100 Continue\r\n\r\n", before[:300]
    assert after.startswith(b"HTTP/1.1 201 "), after[:300]
    assert (gateway.local_repo / name).read_bytes() == body


# --------------------------------------------------------------------------- 504


def test_silent_backend_gets_504_after_the_backend_timeout(tmp_path: Path) -> None:
    """docs/operations.md: a backend silent for `--backend-timeout` seconds (300 by
    default) gets the request answered 504. Set to 2 s here; the liveness watchdog is
    slowed down so that it does not replace the stopped child during the test."""
    with own_redis() as (server, client):
        dest = add_local_destination(seeded(client))
        gateway = start_gateway(server.url, tmp_path / "gw", "--backend-timeout", "2",
                                "--liveness-interval", "600")
        with stopped_cleanly(gateway):
            pid = child_pid(gateway, "restic")
            # alive, connections accepted, never an answer: once every thread is stopped
            # (right after the signal, a loaded machine let rclone answer with a 404)
            stop_process(pid)
            try:
                started = time.monotonic()
                status, headers, reply = request(gateway, "GET", repo_path(dest, "/config"),
                                                 NODE, rest=True, timeout=90)
                took = time.monotonic() - started
            finally:
                os.kill(pid, signal.SIGCONT)
            assert status == 504, (status, headers, reply)
            assert "x-gateway-backend" not in headers  # the gateway's own answer
            # 2 s and scheduling slack; the default (300 s) would be far above this
            assert 1.5 <= took < 15, took
            # the child stayed: the same one serves once it runs again
            assert child_pid(gateway, "restic") == pid
            wait_for(lambda: request(
                gateway, "GET", repo_path(dest, "/config"), NODE, rest=True)[0] == 404,
                "the child answers again", DEADLINE, gateway=gateway)


# --------------------------------------------------------------------------- resync


def test_periodic_resync_picks_up_a_change_nobody_announced(tmp_path: Path) -> None:
    """docs/architecture.md, docs/operations.md: Redis is re-read every
    `--resync-interval` seconds, so a change whose event was missed heals by itself."""
    with own_redis() as (server, client):
        cluster = seeded(client)
        gateway = start_gateway(server.url, tmp_path / "gw", "--resync-interval", "1")
        with stopped_cleanly(gateway):
            added = str(uuid.uuid4())
            newcomer = ("node/9", "promises-node9-password-73")
            time.sleep(1.5)  # the start's own reads are over
            assert added not in health(gateway)["destinations"]
            # Written as the cluster writes, but without any cluster/event/* message.
            cluster.add_user(*newcomer)
            cluster.add_destination(added, provider="cluster",
                                    url="webdav:http://10.77.0.9:4694", name="unannounced")
            written = time.monotonic()
            # Polled on /health, not with the new credentials: failed logins would be
            # throttled, and the throttle is not what this test is about.
            wait_for(lambda: added in health(gateway).get("destinations", {}),
                     "the unannounced destination is on /health",
                     timeout=20, gateway=gateway)
            assert time.monotonic() - written < 20  # the default interval is 60 s
            assert request(gateway, "PROPFIND", "/", newcomer,
                           headers={"Depth": "0"})[0] == 207


# --------------------------------------------------------------------------- runtime dir


def test_gateway_creates_its_runtime_dir_private(tmp_path: Path) -> None:
    """docs/security.md, docs/architecture.md: the rclone configuration (secrets) is
    written mode 0600 into a generation directory (0700) of the runtime directory
    (0700). The gateway creates them itself, even under a permissive umask."""
    with own_redis() as (server, client):
        cluster = seeded(client)
        dest = str(uuid.uuid4())
        storage = tmp_path / "storage"
        storage.mkdir()
        cluster.add_destination(dest, provider="rclone", url="rclone:local", name="plain",
                                basepath=str(storage),
                                rclone_conf=f"[{dest}]\ntype = local\ndescription = secret\n")
        with short_dir() as short:
            runtime = short / "new" / "run"
            old_umask = os.umask(0)
            try:
                gateway = start_gateway(server.url, tmp_path / "gw", "--runtime-dir",
                                        str(runtime))
            finally:
                os.umask(old_umask)
            with stopped_cleanly(gateway):
                generation = health(gateway)["backends"]["restic"]["generation"]
                gen_dir = runtime / f"gen-{generation}"
                conf = gen_dir / "rclone.conf"
                assert f"[{dest}]" in conf.read_text()
                modes = {path: path.stat().st_mode & 0o777 for path in (runtime, gen_dir, conf)}
                assert modes == {runtime: 0o700, gen_dir: 0o700, conf: 0o600}, {
                    str(p): oct(m) for p, m in modes.items()}
                # nothing of it went to the directory the test harness prepared
                assert not any(gateway.runtime_dir.iterdir())


# --------------------------------------------------------------------------- no TCP


def _listening_tcp_inodes() -> set[int]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:["):-1]))
    return inodes


def _listening_unix_paths(inodes: set[int]) -> list[str]:
    with open("/proc/net/unix") as f:
        rows = [line.split(None, 7) for line in f.read().splitlines()[1:]]
    return [row[7] for row in rows
            if len(row) == 8 and int(row[6]) in inodes and int(row[3], 16) & 0x10000]


def test_children_never_listen_on_tcp(shared: Shared) -> None:
    """docs/security.md: the rclone children listen on unix sockets in the runtime
    directory, never on TCP, so no client reaches a backend around the gateway."""
    gateway = shared.gateway
    children = {kind: child_pid(gateway, kind)
                for kind in ("restic", "restic-append-only", "webdav")}
    assert set(children.values()) <= set(gateway.child_pids())
    listening = _listening_tcp_inodes()
    # The method sees a listening TCP socket: the gateway's own.
    assert _socket_inodes(gateway.pid) & listening
    for kind, pid in children.items():
        sockets = _socket_inodes(pid)
        assert not sockets & listening, f"{kind} (pid {pid}) listens on TCP"
        unix = _listening_unix_paths(sockets)
        assert unix, f"{kind} (pid {pid}) listens on no unix socket"
        assert all(p.startswith(str(gateway.runtime_dir) + "/") for p in unix), unix


# --------------------------------------------------------------------------- headers


def test_authorization_and_hop_by_hop_headers_never_reach_a_backend(tmp_path: Path) -> None:
    """docs/architecture.md, docs/security.md: the request is rebuilt for the backend
    with `Authorization` and the hop-by-hop headers (those named by `Connection`
    included) dropped; the backend's hop-by-hop headers do not reach the client.

    A server of this test takes the place of the full-access Restic child on its own
    socket path, so it sees exactly what the gateway sends a backend."""
    with own_redis() as (server, client):
        dest = add_local_destination(seeded(client))
        gateway = start_gateway(server.url, tmp_path / "gw")
        with stopped_cleanly(gateway):
            generation = health(gateway)["backends"]["restic"]["generation"]
            sock_path = gateway.runtime_dir / f"gen-{generation}" / "restic.sock"
            aside = sock_path.with_name("restic.sock.rclone")
            assert sock_path.exists()

            def respond(conn: socket.socket, seen: Seen, start: bytes) -> None:
                read_body(conn, seen, start)
                answer(conn, "200 OK",
                       "Content-Type: text/plain\r\nX-Backend-Hop: 1\r\nKeep-Alive: timeout=9\r\n"
                       "Proxy-Authenticate: Basic realm=x\r\nX-From-Backend: kept\r\n"
                       "Connection: X-Backend-Hop\r\n",
                       b"recorded\n")

            os.rename(sock_path, aside)
            recorder = None
            try:
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(str(sock_path))
                listener.listen(16)
                recorder = TinyServer(listener, respond)
                authorization = basic(*NODE)
                raw = (f"GET {repo_path(dest, '/config')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       f"Authorization: {authorization}\r\nAccept: {REST_ACCEPT}\r\n"
                       "Connection: keep-alive, X-Hop-Named\r\nX-Hop-Named: hop-secret\r\n"
                       "Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-Checksum\r\n"
                       "Proxy-Authorization: Basic cHJveHk6c2VjcmV0\r\n"
                       "Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\n"
                       "X-End-To-End: kept\r\n\r\n").encode()
                with socket.create_connection((gateway.host, gateway.port), timeout=30) as s:
                    s.sendall(raw)
                    got = b""
                    while not got.endswith(b"recorded\n"):
                        chunk = s.recv(65536)
                        assert chunk, got
                        got += chunk
            finally:
                if recorder is not None:
                    recorder.close()
                with contextlib.suppress(FileNotFoundError):
                    sock_path.unlink()
                os.rename(aside, sock_path)

            sent = [s for s in recorder.seen if s.request_line.startswith("GET ")]
            assert len(sent) == 1, [s.request_line for s in recorder.seen]
            head = sent[0].head
            assert header_value(head, "X-End-To-End") == "kept"
            assert header_value(head, "Accept") == REST_ACCEPT
            for name in ("Authorization", "Proxy-Authorization", "Connection", "X-Hop-Named",
                         "Keep-Alive", "TE", "Trailer", "Proxy-Connection", "Upgrade"):
                assert header_value(head, name) is None, (name, head.decode("latin-1"))
            assert authorization.split()[1].encode() not in head
            assert b"hop-secret" not in head

            response_head = got.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
            assert response_head.startswith("http/1.1 200"), response_head
            assert "x-from-backend: kept" in response_head
            assert "x-gateway-backend: restic@node1" in response_head
            for name in ("x-backend-hop", "keep-alive", "proxy-authenticate"):
                assert f"\r\n{name}:" not in response_head, (name, response_head)
            # the real child serves again on its socket
            assert request(gateway, "GET", repo_path(dest, "/config"), NODE,
                           rest=True)[0] == 404


# --------------------------------------------------------------------------- SIGHUP


def test_sighup_checks_a_failed_remote_again_at_once(tmp_path: Path) -> None:
    """docs/architecture.md: a remote that fails its start check is checked again after
    2, 4, 8 ... s; SIGHUP checks it again at once."""
    port = free_port()
    served_dir = tmp_path / "webdav-storage"
    (served_dir / "repo").mkdir(parents=True)
    with own_redis() as (server, client):
        cluster = seeded(client, own_vpn=None)
        dest = str(uuid.uuid4())
        cluster.add_destination(dest, provider="rclone", url=f"webdav:http://127.0.0.1:{port}",
                                name="webdav", basepath="repo",
                                rclone_conf=webdav_section(dest, port))
        gateway = start_gateway(server.url, tmp_path / "gw")
        storage: subprocess.Popen | None = None
        with stopped_cleanly(gateway):
            try:
                def entry() -> dict:
                    return health(gateway).get("destinations", {}).get(dest, {})

                wait_for(lambda: entry().get("attempts"), "the remote fails its check", DEADLINE,
                         gateway=gateway)
                # Let the backoff grow well past what the rest needs (SIGHUPs speed it up).
                deadline = time.monotonic() + 120
                while entry().get("retry_in", 0) < 20:
                    assert time.monotonic() < deadline, entry()
                    attempts = entry()["attempts"]
                    os.kill(gateway.pid, signal.SIGHUP)
                    wait_for(lambda a=attempts: entry().get("attempts", 0) > a, "another check",
                             timeout=40, gateway=gateway)
                assert entry()["served"] == "no", entry()

                # The storage comes up: a WebDAV server on the remote's port.
                storage = subprocess.Popen(
                    [str(Path(sys.executable).parent / "rclone"), "serve", "webdav",
                     str(served_dir), "--addr", f"127.0.0.1:{port}"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, process_group=0)
                wait_for(lambda: _tcp_open("127.0.0.1", port), "the storage answers", DEADLINE)
                retry_in = entry()["retry_in"]
                assert retry_in >= 15, entry()
                hup = time.monotonic()
                os.kill(gateway.pid, signal.SIGHUP)
                wait_for(lambda: entry().get("served") == "here",
                         "the destination is served after SIGHUP",
                         timeout=retry_in - 3, gateway=gateway)
                assert time.monotonic() - hup < retry_in - 3
                assert entry()["state"] == "ok"
                status, _, _ = request(gateway, "PUT", f"/{dest}/after-sighup.txt", NODE,
                                       body=b"reached\n")
                assert status == 201
                assert (served_dir / "repo" / "after-sighup.txt").read_bytes() == b"reached\n"
            finally:
                if storage is not None:
                    storage.terminate()
                    storage.wait(10)


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- restarting


@pytest.mark.serial  # answers timed against the child's 4.5 s first backoff
def test_a_restarting_backend_is_waited_for_then_503_with_retry_after(tmp_path: Path) -> None:
    """docs/operations.md: a request for a backend that is restarting waits for it up to
    5 s, then gets 503 with `Retry-After` rather than hanging.

    Killed once, the child is back within its first backoff (0.5 s): the request sent
    meanwhile is served. Killed again and again, its backoff doubles each time (0.5, 1,
    2, 4, 8 s): past 5 s, the request waiting for it gets the 503."""
    with own_redis() as (server, client):
        dest = add_local_destination(seeded(client))
        gateway = start_gateway(server.url, tmp_path / "gw")
        config = repo_path(dest, "/config")
        with stopped_cleanly(gateway):
            answers = []
            for _attempt in range(6):
                pid = child_pid(gateway, "restic")
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: health(gateway).get(
                    "backends", {}).get("restic", {}).get("state") != "running",
                    "the child is seen restarting", DEADLINE, interval=0.01, gateway=gateway)
                started = time.monotonic()
                status, headers, _ = request(gateway, "GET", config, NODE, rest=True,
                                             timeout=60)
                took = round(time.monotonic() - started, 2)
                answers.append((status, headers.get("retry-after"), took))
                # never a hang: served once the child is back, or 503 after the wait
                assert took < 15, answers
                if status == 503:
                    assert (headers.get("retry-after") or "").isdigit(), answers
                    assert took >= 4.5, answers  # it waited for the child first
                    break
                assert status == 404, answers  # served: the repository does not exist
                if _attempt == 0:
                    assert took < 4.5, answers  # back within its first backoff
            assert answers[-1][0] == 503, answers
            wait_for(lambda: request(gateway, "GET", config, NODE, rest=True)[0] == 404,
                     "the child is back and serving", DEADLINE, gateway=gateway)


# --------------------------------------------------------------------------- environment


def test_settings_come_from_the_agent_environment(tmp_path: Path) -> None:
    """docs/operations.md: without flags, Redis is `redis://$REDIS_REPLICA_ADDRESS/0`
    with REDIS_USER / REDIS_PASSWORD, the node is NODE_ID, and the runtime directory is
    $RUNTIME_DIRECTORY."""
    with contextlib.ExitStack() as stack:
        server, admin = stack.enter_context(own_redis())
        cluster = seeded(admin, own_vpn=None)
        cluster.set_node_vpn(7, "10.66.0.7")  # node 7: NODE_ID
        dest = add_local_destination(cluster, own_vpn="10.66.0.7")
        # Only the agent's Redis user can read anything: the default user is off.
        admin.execute_command("ACL", "SETUSER", "promises-agent", "on",
                              ">promises-redis-password-74", "~*", "&*", "+@all")
        admin.execute_command("ACL", "SETUSER", "default", "off")
        short = stack.enter_context(short_dir())
        runtime = short / "rt"
        runtime.mkdir(mode=0o755)
        workdir = tmp_path / "gw"
        port = free_port()
        env = dict(os.environ)
        env.update({
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH"))
                                          if p),
            "PYTHONUNBUFFERED": "1",
            "REDIS_REPLICA_ADDRESS": f"127.0.0.1:{server.port}",
            "REDIS_USER": "promises-agent",
            "REDIS_PASSWORD": "promises-redis-password-74",
            "NODE_ID": "7",
            "RUNTIME_DIRECTORY": str(runtime),
        })
        for name in ("REDIS_URL", "NOTIFY_SOCKET", "JOURNAL_STREAM"):
            env.pop(name, None)
        argv = [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}",
                "--local-repo", str(workdir / "repo")]
        gateway = GatewayProcess(argv, env, workdir, "127.0.0.1", port)
        gateway._launch()  # waits until /health answers 200
        with stopped_cleanly(gateway):
            doc = health(gateway)
            assert doc["node_id"] == "7"
            assert doc["redis"]["connected"] is True
            assert doc["destinations"][dest]["served"] == "here"
            generation = doc["backends"]["restic"]["generation"]
            assert (runtime / f"gen-{generation}" / "rclone.conf").is_file()
            assert runtime.stat().st_mode & 0o777 == 0o700
            assert not any(gateway.runtime_dir.iterdir())  # the harness's, unused
            assert request(gateway, "PROPFIND", f"/{dest}/", NODE,
                           headers={"Depth": "0"})[0] == 207


# --------------------------------------------------------------------------- operator commands


def _command(*args: str, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH")) if p)
    for key in ("REDIS_URL", "REDIS_REPLICA_ADDRESS", "REDIS_USER", "REDIS_PASSWORD", "NODE_ID"):
        full_env.pop(key, None)
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    return subprocess.run([sys.executable, "-m", "gateway", *args], env=full_env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def test_explain_and_config_show_exit_codes(shared: Shared) -> None:
    """docs/operations.md: `explain` exits 0 allowed, 1 refused, 2 usage error, 3 Redis
    could not be read; `config show` 0, 2 or 3 likewise."""
    url, dest = shared.redis_url, shared.local_dest
    closed = f"redis://127.0.0.1:{free_port()}/0"
    data = repo_path(dest, "/data/" + OBJECT_ID)
    explain = {
        "allowed": (["--user", NODE[0], "--method", "DELETE", "--rest", "--path", data,
                     "--redis-url", url], 0),
        "refused": (["--user", TRAEFIK[0], "--method", "DELETE", "--rest", "--path", data,
                     "--redis-url", url], 1),
        "unknown user": (["--user", "module/ghost1", "--method", "GET", "--path", "/",
                          "--redis-url", url], 1),
        "missing --path": (["--user", NODE[0], "--method", "GET", "--redis-url", url], 2),
        "unknown option": (["--user", NODE[0], "--method", "GET", "--path", "/",
                            "--redis-url", url, "--bogus"], 2),
        "Redis not reachable": (["--user", NODE[0], "--method", "GET", "--path", "/",
                                 "--redis-url", closed], 3),
    }
    for case, (args, code) in explain.items():
        result = _command("explain", *args)
        assert result.returncode == code, (case, result.returncode, result.stdout,
                                           result.stderr)
    assert "decision: deny" in _command("explain", *explain["refused"][0]).stdout

    shows = {
        "shown": (["--node-id", "1", "--redis-url", url], {}, 0),
        "node from NODE_ID": (["--redis-url", url], {"NODE_ID": "1"}, 0),
        "no node id": (["--redis-url", url], {}, 2),
        "unknown option": (["--node-id", "1", "--redis-url", url, "--bogus"], {}, 2),
        "Redis not reachable": (["--node-id", "1", "--redis-url", closed], {}, 3),
        "Redis not reachable, from the environment": (
            ["--node-id", "1"], {"REDIS_REPLICA_ADDRESS": closed.split("/")[2]}, 3),
    }
    for case, (args, env, code) in shows.items():
        result = _command("config", "show", *args, env=env)
        assert result.returncode == code, (case, result.returncode, result.stdout,
                                           result.stderr)


# --------------------------------------------------------------------------- READY=1


def test_ready_is_sent_only_once_health_answers_200(tmp_path: Path) -> None:
    """docs/operations.md: under `Type=notify` the gateway sends READY=1 once it serves,
    that is once `/health` answers 200. /health is asked the moment READY=1 arrives."""
    notify_path = Path(f"/tmp/promises-notify-{uuid.uuid4().hex[:12]}")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(DEADLINE + 30)
    port = free_port()
    seen: list[tuple[str, int]] = []

    def listen() -> None:
        probe = GatewayProcess([], {}, tmp_path, "127.0.0.1", port)
        with contextlib.suppress(OSError):
            while True:
                message = notify.recv(4096).decode()
                status = probe.health_status(timeout=5) if "READY=1" in message.split(
                    "\n") else -1
                seen.append((message, status))
                if status != -1:
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        with own_redis() as (server, client):
            add_local_destination(seeded(client))
            gateway = GatewayProcess.start(
                server.url, "1", tmp_path / "gw", port=port,
                env={"NOTIFY_SOCKET": str(notify_path), "JOURNAL_STREAM": None})
            with stopped_cleanly(gateway):
                listener.join(DEADLINE)
                assert seen, "no READY=1 received"
                message, status = seen[-1]
                assert "READY=1" in message.split("\n")
                assert status == 200, seen
    finally:
        notify.close()
        notify_path.unlink(missing_ok=True)
        listener.join(5)


# --------------------------------------------------------------------------- peers


def test_a_body_part_sent_to_one_peer_is_never_sent_to_another(tmp_path: Path) -> None:
    """docs/multinode.md: a request whose body has not been read yet moves on to the next
    peer when one fails; once part of a body is gone it is not sent again.

    Two servers of this test stand in for the peer gateways of nodes 2 and 3 at their
    "VPN" addresses (loopback addresses of their own, port 4694): both answer the probes
    as a gateway serving the destination would; node 2 reads part of the upload and
    resets the connection; node 3 records anything else it gets."""
    address2, sock2 = peer_listener()
    address3, sock3 = peer_listener()

    def probe_or(then: Responder) -> Responder:
        def respond(conn: socket.socket, seen: Seen, start: bytes) -> None:
            if seen.is_probe:
                answer(conn, "404 Not Found")
            else:
                then(conn, seen, start)
        return respond

    node2_reset = threading.Event()

    def read_some_then_reset(conn: socket.socket, seen: Seen, start: bytes) -> None:
        read_body(conn, seen, start, limit=100_000)
        reset(conn)
        conn.close()
        node2_reset.set()

    def accept(conn: socket.socket, seen: Seen, start: bytes) -> None:
        read_body(conn, seen, start)
        answer(conn, "201 Created", "X-Gateway-Backend: webdav@node3\r\n")

    node2 = TinyServer(sock2, probe_or(read_some_then_reset))
    node3 = TinyServer(sock3, probe_or(accept))
    try:
        with own_redis() as (server, client):
            cluster = seeded(client)
            cluster.set_node_vpn(2, address2)
            cluster.set_node_vpn(3, address3)
            dest = str(uuid.uuid4())  # a remote that does not start here (port 1)
            cluster.add_destination(dest, provider="rclone", url="webdav:http://127.0.0.1:1",
                                    name="offsite", basepath="repo",
                                    rclone_conf=webdav_section(dest, 1))
            gateway = start_gateway(server.url, tmp_path / "gw", "--probe-interval", "0.5")
            with stopped_cleanly(gateway):
                def both_probed() -> bool:
                    peers = health(gateway).get("peers", {})
                    return all(peers.get(n, {}).get("destinations", {}).get(dest) == "ok"
                               for n in ("node2", "node3"))

                wait_for(both_probed, "both peers probed as serving the destination", DEADLINE,
                         gateway=gateway)
                assert health(gateway)["destinations"][dest]["peer"] == "node2"

                body = os.urandom(1_000_000)
                first, rest = body[:300_000], body[300_000:]
                head = (f"PUT /{dest}/upload.bin HTTP/1.1\r\nHost: x\r\n"
                        f"Authorization: {basic(*NODE)}\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n").encode()
                with socket.create_connection((gateway.host, gateway.port), timeout=30) as up:
                    up.sendall(head + first)
                    assert node2_reset.wait(DEADLINE), "node 2 got no upload"
                    # The answer needs nothing more of the body. A gateway that went on to
                    # node 3 would wait for the rest of it there: it then gets it, so that
                    # node 3 surely sees the request.
                    reply = _read_answer(up, 10)
                    if not reply:
                        with contextlib.suppress(OSError):
                            up.sendall(rest)
                        reply = _read_answer(up, 60)
                assert [s.request_line for s in node2.requests()] == [
                    f"PUT /{dest}/upload.bin HTTP/1.1"]
                assert 0 < node2.requests()[0].body < len(body)
                time.sleep(1)  # anything late to node 3 would have arrived
                assert node3.requests() == [], [s.request_line for s in node3.requests()]
                assert reply.startswith(b"HTTP/1.1 503 "), reply[:300]
                assert b"\r\nretry-after: " in reply.lower()
                assert b"node2" in reply

                # Node 3 does take what is sent to it: with node 2 gone, the same upload
                # goes to node 3, whole.
                node2.close()
                status, _, _ = request(gateway, "PUT", f"/{dest}/again.bin", NODE,
                                       body=body, timeout=120)
                assert status == 201, status
                assert [(s.request_line, s.body) for s in node3.requests()] == [
                    (f"PUT /{dest}/again.bin HTTP/1.1", len(body))]
    finally:
        node2.close()
        node3.close()


def _read_answer(sock: socket.socket, timeout: float) -> bytes:
    """One answer (head and Content-Length body), or what came of it within `timeout`."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(OSError):  # a timeout too
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(header_value(head, "Content-Length") or 0)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        data = head + b"\r\n\r\n" + body
    return data


# --------------------------------------------------------------------------- metrics


def test_destination_up_leaves_out_destinations_served_by_a_peer(shared: Shared) -> None:
    """docs/operations.md: `rclone_gateway_destination_up` covers the destinations this
    node serves or fails to serve; those another node serves for it are left out."""
    gateway = shared.gateway
    wait_for(lambda: health(gateway)["destinations"][shared.peer_dest].get("served") == "peer",
             "the offsite destination is served through node 2", DEADLINE, gateway=gateway)
    entry = health(gateway)["destinations"][shared.peer_dest]
    assert entry["state"] == "forwarded" and entry["peer"] == "node2", entry
    status, _, text = request(gateway, "GET", "/metrics")
    assert status == 200
    lines = [line for line in text.decode().splitlines()
             if line.startswith("rclone_gateway_destination_up{")]
    assert f'rclone_gateway_destination_up{{destination="{shared.local_dest}"}} 1.0' in lines
    assert not [line for line in lines if shared.peer_dest in line], lines

    # Every kind of entry /health has (gateway/forwarding/peers.py where_served).
    entries = {
        "here-ok": {"state": "ok", "served": "here"},
        "via-peer": {"state": "forwarded", "served": "peer", "peer": "node2",
                     "peer_address": "10.5.4.2", "reason": "remote failed to start"},
        "nowhere": {"state": "error", "served": "no", "error": "remote failed to start"},
        "down": {"state": "down", "served": "no", "error": "backends not ready"},
    }
    node = NodeStatus(
        status="ok", node_id="1", version="0", uptime=1.0,
        redis=RedisHealth(True, None, None, None), backends=(),
        destinations=tuple(DestinationHealth(uuid, "", "rclone", where)
                           for uuid, where in entries.items()),
        peers={}, inflight=0, reloads=0)
    up = {s.labels["destination"]: s.value for family in live_families(node)
          for s in family.samples if s.name == "rclone_gateway_destination_up"}
    assert up == {"here-ok": 1.0, "nowhere": 0.0, "down": 0.0}
