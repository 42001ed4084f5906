"""Real processes for the tests: redis-server, the gateway (with its rclone children),
the restic client, and raw HTTP on a socket. No mocks.

Everything started here is also registered for an at-exit kill, so an interrupted
test run leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Self, TypeVar

import redis
from identities import NODE_ID
from netns import inside, netns_exec

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0
WAIT_TIMEOUT = 30.0  # wait_for's deadline when a test names none

T = TypeVar("T")

_live: dict[int, subprocess.Popen] = {}


def _register(proc: subprocess.Popen) -> None:
    _live[proc.pid] = proc


def _forget(proc: subprocess.Popen) -> None:
    _live.pop(proc.pid, None)


@atexit.register
def _kill_everything_left() -> None:
    for proc in list(_live.values()):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                proc.kill()
            proc.wait()


def _ports_below_the_ephemeral_range() -> range:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), low)


# Ports for the servers the tests start, handed out in turn by every test process of this
# user on the machine (the xdist workers of a run, other runs): the file holds the last one
# handed out, under a lock. Before, the kernel's choice of a free port (bind to port 0) was
# random among the ephemeral ports: two processes, or one asking twice before the first
# port was bound, got the same port now and then (2000 choices held about 130 repeats),
# and a client's outgoing connection could take it too. Below the ephemeral range, in
# turn, a port comes back only after the whole range was handed out.
PORT_RANGE = _ports_below_the_ephemeral_range()
PORT_REGISTRY = Path(tempfile.gettempdir()) / f"rclone-gateway-tests-{os.getuid()}.port"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now that no test process handed out lately (see
    PORT_RANGE); the caller's server binds it."""
    with open(PORT_REGISTRY, "a+") as registry:
        fcntl.flock(registry, fcntl.LOCK_EX)
        registry.seek(0)
        try:
            last = int(registry.read().strip())
        except ValueError:
            last = PORT_RANGE.start + os.getpid() % len(PORT_RANGE)
        for step in range(1, len(PORT_RANGE) + 1):
            port = PORT_RANGE[(last - PORT_RANGE.start + step) % len(PORT_RANGE)]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        continue  # in use, or held by a connection that was closed
                    raise
            registry.seek(0)
            registry.truncate()
            registry.write(f"{port}\n")
            registry.flush()
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE} on {host}")


def wait_for(predicate: Callable[[], T], what: str | Callable[[], str],
             timeout: float = WAIT_TIMEOUT, *, interval: float = 0.1,
             gateway: GatewayProcess | None = None) -> T:
    """Calls `predicate` every `interval` s until it returns something true, and returns
    that. After `timeout` s the test fails, waiting for `what`: a callable is asked then, to
    tell the state it found; `gateway`: its log's tail is shown too."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            tail = f"\n--- gateway log ---\n{gateway.log_text()[-4000:]}" if gateway else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {described}{tail}")
        time.sleep(interval)


async def wait_until(predicate: Callable[[], object], what: str,
                     timeout: float = WAIT_TIMEOUT, *, interval: float = 0.01) -> None:
    """wait_for in a coroutine, for a test whose server runs in its own event loop: the
    loop goes on while it waits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


def basic(user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


REST_ACCEPT = "application/vnd.x.restic.rest.v2"


def send_request(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    who: tuple[str, str] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | Iterable[bytes] | None = None,
    rest: bool = False,
) -> tuple[int, dict[str, str], bytes]:
    """One request on `conn` as `who` (Basic auth), the Restic Accept header when `rest`;
    returns status, headers (lower-case names) and the whole body."""
    all_headers = dict(headers or {})
    if who is not None:
        all_headers["Authorization"] = basic(*who)
    if rest:
        all_headers["Accept"] = REST_ACCEPT
    conn.request(method, path, body=body, headers=all_headers)
    response = conn.getresponse()
    data = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no log)"
    return data[-limit:].decode("utf-8", "replace")


def wait_listening(host: str, port: int, proc: subprocess.Popen, *, netns: str | None = None,
                   log: Path | None = None, timeout: float = 20.0) -> None:
    """Waits until `proc` accepts connections on host:port (seen from `netns`)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n"
                               f"{_tail(log) if log else ''}")
        with inside(netns):
            sock = socket.socket()
        try:
            sock.settimeout(1)
            sock.connect((host, port))
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.args[:3]} not listening on {host}:{port}:\n"
                                   f"{_tail(log) if log else ''}") from None
            time.sleep(0.05)
        finally:
            sock.close()


_short_dirs: list[Path] = []


def short_dir(prefix: str) -> Path:
    """A new directory with a short path, removed when the test process ends: the path of
    a unix socket holds at most 107 bytes, and a test's tmp_path under xdist
    (/tmp/pytest-of-<user>/pytest-<n>/popen-gw<i>/<test>/) leaves too few of them for the
    sockets of a gateway's children (gen-<n>/restic-append-only.sock)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    _short_dirs.append(path)
    return path


@atexit.register
def _remove_short_dirs() -> None:  # registered last, run first: the processes go before
    _kill_everything_left()
    for path in _short_dirs:
        shutil.rmtree(path, ignore_errors=True)


def _stop_popen(proc: subprocess.Popen, sig: int, timeout: float) -> int:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                proc.kill()
            proc.wait()
    _forget(proc)
    return proc.returncode


# --------------------------------------------------------------------------- /proc


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, starttime) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP to `pid`, back once every thread of it is stopped. The stop reaches the
    threads of a process one by one: a Go server (rclone) still answered a request sent
    right after the signal in about 5 % of tries, and never once all its threads were."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while not _all_threads_stopped(pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} was not stopped {timeout:g} s after SIGSTOP")
        time.sleep(0.001)


def _all_threads_stopped(pid: int) -> bool:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True  # gone: nothing left to run
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            continue  # a thread that ended meanwhile
        if state not in (b"T", b"t"):
            return False
    return True


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _alive(pid: int, starttime: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z" and stat[3] == starttime


# --------------------------------------------------------------------------- redis


class RedisServer:
    """A private redis-server on a free loopback port; started by the constructor."""

    def __init__(self, workdir: Path | None = None, *, executable: str = "redis-server"):
        exe = shutil.which(executable)
        if exe is None:
            raise RuntimeError(f"{executable} not found in PATH (run scripts/bootstrap.sh)")
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="redis-")) if workdir is None else Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        for _attempt in range(5):
            if self._try_start(exe):
                return
        self.stop()
        raise RuntimeError(f"redis-server did not start:\n{_tail(self.log_path)}")

    def _try_start(self, exe: str) -> bool:
        self.port = free_port()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [exe, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                 "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                process_group=0,
            )
        _register(self.proc)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if client.ping():
                        return True
                except redis.RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        _stop_popen(self.proc, signal.SIGTERM, 5)
        return False

    @property
    def url(self) -> str:
        return self.db_url(0)

    def db_url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, decode_responses=True)

    def stop(self) -> None:
        if self.proc is not None:
            _stop_popen(self.proc, signal.SIGTERM, 10)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Cluster:
    """Writes the cluster's Redis keys (spec section 2) the way the cluster does."""

    ACLS = "cluster/acls"
    MODULE_UUID = "cluster/module_uuid"
    MODULE_NODE = "cluster/module_node"
    RESTORE_UUID = "private/nodes/restore_uuid"
    RCLONE_CONF = "private/nodes/backup_destination/rclone_conf"
    NETWORK = "cluster/network"
    ENVIRONMENT = "cluster/environment"

    def __init__(self, client: redis.Redis):
        self.r = client

    @staticmethod
    def acl_line(name: str, password: str | None, *, enabled: bool = True,
                 nopass: bool = False, extra_hashes: Iterable[str] = ()) -> str:
        parts = ["user", name, "on" if enabled else "off"]
        if nopass:
            parts.append("nopass")
        if name.startswith("node/"):
            parts.append("sanitize-payload")
        if password is not None:
            parts.append("#" + sha256_hex(password))
        parts.extend("#" + h for h in extra_hashes)
        if name.startswith("node/"):
            parts.extend(["~*", "&*", "+@all"])
        else:
            parts.extend([f"~{name}/*", "resetchannels", "-@all", "+@read"])
        return " ".join(parts)

    def _acl_lines_of(self, name: str) -> list[str]:
        return [line for line in self.r.smembers(self.ACLS)
                if line.split()[1:2] == [name]]

    def add_user(self, name: str, password: str | None, *, enabled: bool = True,
                 nopass: bool = False, extra_hashes: Iterable[str] = ()) -> str:
        """Adds (or replaces) the ACL line of `name`; returns the line written."""
        line = self.acl_line(name, password, enabled=enabled, nopass=nopass,
                             extra_hashes=extra_hashes)
        old = self._acl_lines_of(name)
        pipe = self.r.pipeline(transaction=True)
        if old:
            pipe.srem(self.ACLS, *old)
        pipe.sadd(self.ACLS, line)
        pipe.execute()
        return line

    def remove_user(self, name: str) -> None:
        old = self._acl_lines_of(name)
        if old:
            self.r.srem(self.ACLS, *old)

    def set_module(self, module_id: str, uuid: str, *, node_id: str | int | None = None) -> None:
        self.r.hset(self.MODULE_UUID, module_id, uuid)
        if node_id is not None:
            self.r.hset(self.MODULE_NODE, module_id, str(node_id))

    def remove_module(self, module_id: str) -> None:
        self.r.hdel(self.MODULE_UUID, module_id)
        self.r.hdel(self.MODULE_NODE, module_id)

    def grant_restore(self, module_uuid: str, source_uuid: str) -> None:
        self.r.hset(self.RESTORE_UUID, module_uuid, source_uuid)

    def add_destination(self, uuid: str, *, provider: str, url: str, name: str = "",
                        basepath: str = "", rclone_conf: str | None = None) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(f"cluster/backup_repository/{uuid}", mapping={
            "provider": provider, "url": url, "name": name, "basepath": basepath,
        })
        if rclone_conf is not None:
            pipe.hset(self.RCLONE_CONF, uuid, rclone_conf)
        pipe.execute()

    def remove_destination(self, uuid: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(f"cluster/backup_repository/{uuid}")
        pipe.hdel(self.RCLONE_CONF, uuid)
        pipe.execute()

    def set_node_vpn(self, node_id: str | int, ip: str) -> None:
        self.r.hset(f"node/{node_id}/vpn", "ip_address", ip)

    def set_network(self, cidr: str | None) -> None:
        if cidr is None:
            self.r.delete(self.NETWORK)
        else:
            self.r.set(self.NETWORK, cidr)

    def set_leader(self, node_id: str | int) -> None:
        self.r.hset(self.ENVIRONMENT, "NODE_ID", str(node_id))

    def publish(self, event: str, payload: str = "{}") -> int:
        return self.r.publish(f"cluster/event/{event}", payload)

    def flush(self) -> None:
        self.r.flushdb()


@dataclass
class Blob:
    """`blocks` times the same random MiB, and the SHA-256 of the whole (its name as a
    restic object): sent from a generator, never held whole."""

    blocks: int
    block: bytes = field(default_factory=lambda: os.urandom(1 << 20))
    digest: str = ""

    def __post_init__(self) -> None:
        hasher = hashlib.sha256()
        for _ in range(self.blocks):
            hasher.update(self.block)
        self.digest = hasher.hexdigest()

    @property
    def size(self) -> int:
        return self.blocks << 20

    def chunks(self) -> Iterator[bytes]:
        for _ in range(self.blocks):
            yield self.block


class BlobUpload(threading.Thread):
    """A POST of `blob` to `path` as `user`, in the background. `stored` is the file the
    storage keeps it in: its size is the upload's progress."""

    def __init__(self, gateway: GatewayProcess, path: str, user: tuple[str, str], blob: Blob,
                 stored: Path, *, timeout: float = 300.0):
        super().__init__(daemon=True)
        self.gateway, self.path, self.user, self.blob = gateway, path, user, blob
        self.stored, self.timeout = stored, timeout
        self.started = 0.0  # time.monotonic(), as the request goes out
        self.started_wall = 0.0  # time.time(), the same moment
        self.ended = 0.0  # time.monotonic(), as its answer is read
        self.status = 0
        self.answer = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.gateway.host, self.gateway.port,
                                          timeout=self.timeout)
        headers = {"Authorization": basic(*self.user), "Accept": REST_ACCEPT,
                   "Content-Length": str(self.blob.size)}
        try:
            self.started, self.started_wall = time.monotonic(), time.time()
            conn.request("POST", self.path, body=self.blob.chunks(), headers=headers)
            response = conn.getresponse()
            self.answer = response.read()
            self.status = response.status
        except BaseException as exc:  # raised by finish()
            self.error = exc
        finally:
            self.ended = time.monotonic()
            conn.close()

    def stored_bytes(self) -> int:
        try:
            return self.stored.stat().st_size
        except FileNotFoundError:
            return 0

    def finish(self) -> float:
        """Waits for the answer, which must be 200 with the whole blob stored; the seconds
        from the request to the answer."""
        self.join(self.timeout * 2)
        who = self.user[0]
        if self.is_alive():
            raise RuntimeError(f"{who}: the upload never ended")
        if self.error is not None:
            raise RuntimeError(f"{who}: the upload failed: {self.error!r}")
        if self.status != 200 or self.stored_bytes() != self.blob.size:
            raise RuntimeError(f"{who}: the upload answered {self.status} "
                               f"({self.answer[:200]!r}), {self.stored_bytes()} of "
                               f"{self.blob.size} bytes stored")
        return self.ended - self.started

    def send(self) -> float:
        """The upload in the foreground: start() and finish()."""
        self.start()
        return self.finish()


BWLIMIT = "rclone-gateway/bwlimit"  # the bandwidth limits' hash


@dataclass
class ModuleRepositories:
    """A gateway serving module repositories on one `cluster` destination, seen as its node
    sees them. A test module subclasses it with its own destination, node and modules."""

    gateway: GatewayProcess
    cluster: Cluster

    DEST: ClassVar[str]
    NODE: ClassVar[tuple[str, str]]
    PASSWORD: ClassVar[str]  # every module's
    MODULES: ClassVar[Mapping[str, tuple[str, str]]]  # module id -> (app, uuid)

    @classmethod
    def seed(cls, cluster: Cluster, vpn_address: str) -> None:
        """The node's user, the modules and the destination, on node 1 at `vpn_address`."""
        cluster.add_user(*cls.NODE)
        for module, (_, module_uuid) in cls.MODULES.items():
            cluster.add_user(f"module/{module}", cls.PASSWORD)
            cluster.set_module(module, module_uuid)
        cluster.set_node_vpn(1, vpn_address)
        cluster.add_destination(cls.DEST, provider="cluster",
                                url=f"webdav:http://{vpn_address}:4694", name="local disk")

    @classmethod
    @contextlib.contextmanager
    def serving(cls, redis_server: RedisServer, workdir: Path,
                vpn_address: str = "10.5.4.1") -> Iterator[Self]:
        """A fresh cluster seeded so, and a gateway running on it."""
        with fresh_cluster(redis_server) as cluster:
            cls.seed(cluster, vpn_address)
            with running_gateway(redis_server.url, workdir) as gateway:
                yield cls(gateway, cluster)

    def who(self, module: str) -> tuple[str, str]:
        return f"module/{module}", self.PASSWORD

    def status(self) -> dict:
        conn = http.client.HTTPConnection(self.gateway.host, self.gateway.port, timeout=30)
        try:
            code, _, body = send_request(conn, "GET", "/status", self.NODE,
                                         headers={"Accept": "application/json"})
        finally:
            conn.close()
        assert code == 200, body
        return json.loads(body)

    def base(self, module: str) -> str:
        app, module_uuid = self.MODULES[module]
        return f"/{self.DEST}/{app}/{module_uuid}"

    def stored(self, module: str, object_id: str) -> Path:
        app, module_uuid = self.MODULES[module]
        return (self.gateway.local_repo / app / module_uuid / "data" / object_id[:2]
                / object_id)

    def create_repository(self, module: str) -> None:
        conn = http.client.HTTPConnection(self.gateway.host, self.gateway.port, timeout=30)
        try:
            status, _, body = send_request(conn, "POST", f"{self.base(module)}/?create=true",
                                           self.who(module), rest=True)
        finally:
            conn.close()
        assert status == 200, (status, body)

    def bandwidth_reported(self) -> dict | None:
        """The bandwidth limits /status says are in force; None when it says nothing of
        limits at all."""
        limits = self.status().get("limits")
        return None if limits is None else limits.get("bandwidth", {})

    def set_limits(self, fields: dict[str, str]) -> bool:
        """Sets the bwlimit hash to `fields` exactly and announces it; True once /status
        reports those schedules in force. Whether the limit holds is for the test to
        measure: a gateway that never reports them is not failed here."""
        pipe = self.cluster.r.pipeline(transaction=True)
        pipe.delete(BWLIMIT)
        if fields:
            pipe.hset(BWLIMIT, mapping=fields)
        pipe.execute()
        self.cluster.publish("backup-limits-changed")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            reported = self.bandwidth_reported()
            if reported is None:
                return False
            if {name: entry["schedule"] for name, entry in reported.items()} == fields:
                return True
            time.sleep(0.1)
        return False


# --------------------------------------------------------------------------- gateway


class GatewayStartError(RuntimeError):
    pass


class GatewayProcess:
    """`python -m gateway serve` as a child; use GatewayProcess.start(...)."""

    def __init__(self, argv: list[str], env: dict[str, str], workdir: Path,
                 host: str, port: int, netns: str | None = None,
                 runtime_dir: Path | None = None):
        self.argv = argv
        self.netns = netns  # the network namespace it runs in (None: the test's own)
        self.env = env
        self.workdir = workdir
        self.host = host
        self.port = port
        self.local_repo = workdir / "repo"
        self.runtime_dir = runtime_dir or workdir / "run"
        self.log_path = workdir / "gateway.log"
        self.proc: subprocess.Popen | None = None
        self.leftover_pids: list[int] = []

    @classmethod
    def start(cls, redis_url: str, node_id: str | int, workdir: Path | str, *,
              listen_host: str = "127.0.0.1", port: int | None = None,
              extra_args: Iterable[str] = (),
              env: Mapping[str, str | None] | None = None,
              netns: str | None = None) -> GatewayProcess:
        workdir = Path(workdir).resolve()
        port = free_port() if port is None else port
        runtime_dir = short_dir("rgw-run-")
        prefix = netns_exec(netns) if netns else []
        argv = [*prefix, sys.executable, "-m", "gateway", "serve",
                "--listen", f"{listen_host}:{port}",
                "--redis-url", redis_url,
                "--node-id", str(node_id),
                "--local-repo", str(workdir / "repo"),
                "--runtime-dir", str(runtime_dir),
                *extra_args]
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH")) if p)
        full_env["PYTHONUNBUFFERED"] = "1"
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        connect_host = "127.0.0.1" if listen_host in ("0.0.0.0", "", "::") else listen_host
        gateway = cls(argv, full_env, workdir, connect_host, port, netns, runtime_dir)
        gateway._launch()
        return gateway

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _launch(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.local_repo.mkdir(exist_ok=True)
        self.runtime_dir.mkdir(mode=0o700, exist_ok=True)
        self.runtime_dir.chmod(0o700)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.workdir, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, process_group=0,
            )
        _register(self.proc)
        try:
            self._wait_ready()
        except BaseException:
            self.stop(signal.SIGKILL, timeout=5)
            self.kill_leftovers()
            raise

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            code = self.proc.poll()
            if code is not None:
                raise GatewayStartError(
                    f"gateway exited with {code} before ready; log tail:\n{_tail(self.log_path)}")
            if self.health_status() == 200:
                return
            if time.monotonic() > deadline:
                raise GatewayStartError(
                    f"gateway not ready after {READY_TIMEOUT:.0f} s; log tail:\n"
                    f"{_tail(self.log_path)}")
            time.sleep(0.1)

    def health_status(self, timeout: float = 2) -> int:
        """Status of GET /health, 0 when nothing answers."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            with inside(self.netns):
                conn.connect()
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            return 0
        finally:
            conn.close()

    def restart(self) -> None:
        """Stops (SIGTERM) and launches again with the same arguments and port."""
        self.stop()
        self._launch()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def child_pids(self) -> list[int]:
        """Live (non-zombie) processes whose parent is the gateway."""
        if self.proc is None:
            return []
        pids = []
        for pid in _all_pids():
            stat = _proc_stat(pid)
            if stat is not None and stat[1] == self.proc.pid and stat[0] != "Z":
                pids.append(pid)
        return sorted(pids)

    def access_lines(self, since: int = 0) -> list[dict]:
        """The access log from byte `since` of the log on: one JSON object per request,
        oldest first."""
        try:
            text = self.log_path.read_bytes()[since:].decode("utf-8", "replace")
        except OSError:
            text = ""
        entries = []
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "method" in entry and "status" in entry:
                entries.append(entry)
        return entries

    def rclone_serve_pids(self) -> list[int]:
        """The `rclone serve` children: not the short `rclone lsjson` of a storage scan."""
        found = []
        for pid in self.child_pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if len(argv) > 1 and argv[0].endswith(b"rclone") and argv[1] == b"serve":
                found.append(pid)
        return found

    def _descendants(self) -> dict[int, int]:
        """pid -> starttime of its children and of its process group members."""
        if self.proc is None:
            return {}
        running = self.proc.poll() is None
        found = {}
        for pid in _all_pids():
            stat = _proc_stat(pid)
            if stat is None or pid == self.proc.pid or stat[0] == "Z":
                continue
            if stat[2] == self.proc.pid or (running and stat[1] == self.proc.pid):
                found[pid] = stat[3]
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Signals the gateway and waits; SIGKILL after `timeout`. Returns its exit code.

        Processes it had started that outlive it are added to `leftover_pids`.
        """
        if self.proc is None:
            return None
        before = self._descendants()
        code = _stop_popen(self.proc, sig, timeout)
        deadline = time.monotonic() + 2
        while True:
            left = [pid for pid, start in before.items() if _alive(pid, start)]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.leftover_pids.extend(pid for pid in left if pid not in self.leftover_pids)
        return code

    def kill_leftovers(self) -> list[int]:
        """SIGKILLs what outlived the gateway; returns those pids."""
        killed = []
        for pid in self.leftover_pids:
            stat = _proc_stat(pid)
            if stat is None or stat[0] == "Z":
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
        self.leftover_pids = []
        return killed


def stop_gateways(*gateways: GatewayProcess, sig: int = signal.SIGTERM,
                  timeout: float = 20) -> list[int | None]:
    """Stops each gateway (`sig`, SIGKILL after `timeout` s) and kills the processes of its
    that outlive it; then any such process fails the test. Returns the exit codes."""
    codes: list[int | None] = []
    leftovers: dict[int, list[int]] = {}
    for gateway in gateways:
        codes.append(gateway.stop(sig, timeout))
        if killed := gateway.kill_leftovers():
            leftovers[gateway.pid] = killed
        if gateway.runtime_dir in _short_dirs:
            shutil.rmtree(gateway.runtime_dir, ignore_errors=True)
    assert not leftovers, f"processes outlived their gateway (now killed): {leftovers}"
    return codes


@contextlib.contextmanager
def running_gateway(redis_url: str, workdir: Path | str, node_id: str | int = NODE_ID,
                    **kwargs) -> Iterator[GatewayProcess]:
    """A gateway (GatewayProcess.start's arguments) for the block; stop_gateways after it."""
    gateway = GatewayProcess.start(redis_url, node_id, workdir, **kwargs)
    try:
        yield gateway
    finally:
        stop_gateways(gateway)


@contextlib.contextmanager
def fresh_cluster(redis_server: RedisServer, db: int = 0) -> Iterator[Cluster]:
    """The cluster's keys in database `db` of `redis_server`, empty at the start of the
    block and at its end."""
    client = redis_server.client(db)
    cluster = Cluster(client)
    cluster.flush()
    try:
        yield cluster
    finally:
        try:
            cluster.flush()
        finally:
            client.close()


# --------------------------------------------------------------------------- restic


class ResticError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return (f"{super().__str__()}\n--- stdout ---\n{self.stdout}\n"
                f"--- stderr ---\n{self.stderr}")


# The restic clients the suite runs: the machine's (Debian 12's 0.14) and the one the
# cluster's images run (0.18, put beside the venv's python by scripts/bootstrap.sh).
RESTIC_BINARIES = {
    "restic-0.14": "restic",
    "restic-0.18": str(REPO_ROOT / ".venv" / "bin" / "restic-0.18"),
}


def _restic_command(repo_url: str, args: Iterable[str], password: str,
                    env: Mapping[str, str | None] | None,
                    netns: str | None, binary: str | None = None
                    ) -> tuple[list[str], dict[str, str]]:
    exe = shutil.which(binary or "restic")
    if exe is None:
        raise RuntimeError(f"{binary or 'restic'} not found (run scripts/bootstrap.sh)")
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("RESTIC_") or k == "RESTIC_CACHE_DIR"}
    full_env["RESTIC_PASSWORD"] = password
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    cmd = [*(netns_exec(netns) if netns else []), exe, "-r", repo_url, "--no-cache", *args]
    return cmd, full_env


def restic(repo_url: str, *args: str, password: str = "pw",
           env: Mapping[str, str | None] | None = None, check: bool = True,
           timeout: float = 300, netns: str | None = None,
           binary: str | None = None) -> subprocess.CompletedProcess[str]:
    """restic `args` on `repo_url`; `binary`: which restic (default: the one in PATH)."""
    cmd, full_env = _restic_command(repo_url, args, password, env, netns, binary)
    result = subprocess.run(cmd, env=full_env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise ResticError(result.returncode, cmd, result.stdout, result.stderr)
    return result


def restic_process(repo_url: str, *args: str, password: str = "pw",
                   env: Mapping[str, str | None] | None = None,
                   netns: str | None = None,
                   binary: str | None = None) -> subprocess.Popen[bytes]:
    """restic running in the background, its stdin a pipe (for `backup --stdin`)."""
    cmd, full_env = _restic_command(repo_url, args, password, env, netns, binary)
    proc = subprocess.Popen(cmd, env=full_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, process_group=0)
    _register(proc)
    return proc


# --------------------------------------------------------------------------- raw HTTP


class _Reader:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.closed = False

    def _fill(self) -> bool:
        if self.closed:
            return False
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        self.buf += chunk
        return True

    def until(self, marker: bytes) -> bytes | None:
        while marker not in self.buf:
            if not self._fill():
                return None
        head, self.buf = self.buf.split(marker, 1)
        return head

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n and self._fill():
            pass
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def rest(self) -> bytes:
        while self._fill():
            pass
        data, self.buf = self.buf, b""
        return data


def _read_chunked(reader: _Reader) -> bytes:
    body = b""
    while True:
        size_line = reader.until(b"\r\n")
        if size_line is None:
            return body
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while reader.until(b"\r\n") not in (None, b""):
                pass
            return body
        body += reader.exactly(size)
        reader.exactly(2)


def raw_request(host: str, port: int, data: bytes, *, source: str | None = None,
                timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Sends `data` as is and reads one response: (status, lowercased headers, body).

    Status 0 when the server closed the connection without answering.
    """
    source_address = (source, 0) if source else None
    with socket.create_connection((host, port), timeout=timeout,
                                  source_address=source_address) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        return read_response(sock, head_only=data.startswith(b"HEAD "))


def read_response(sock: socket.socket, *, head_only: bool = False
                  ) -> tuple[int, dict[str, str], bytes]:
    """Reads one final response from `sock`: (status, lowercased headers, body); status 0
    when the server closed the connection without answering. `head_only`: it answers HEAD.
    What came after that response is dropped: ResponseReader reads the next ones."""
    return _read_one(_Reader(sock), head_only)


class ResponseReader:
    """The responses of one connection, one after the other, pipelined ones too: the bytes
    a read took past the end of one response are the start of the next."""

    def __init__(self, sock: socket.socket):
        self._reader = _Reader(sock)

    def read(self, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        """The next final response, as read_response gives it."""
        return _read_one(self._reader, head_only)


def _read_one(reader: _Reader, head_only: bool) -> tuple[int, dict[str, str], bytes]:
    while True:
        head = reader.until(b"\r\n\r\n")
        if head is None:
            return 0, {}, b""
        lines = head.decode("iso-8859-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if 100 <= status < 200 and status != 101:
            continue
        break
    if head_only or status in (101, 204, 304):
        body = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        body = _read_chunked(reader)
    elif "content-length" in headers:
        body = reader.exactly(int(headers["content-length"]))
    else:
        body = reader.rest()
    return status, headers, body
