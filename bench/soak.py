"""`make soak`: the gateway under several minutes of mixed cluster traffic, with faults.

Starts its own redis-server and one gateway (fast liveness checks), in a temporary
directory under var/, and for the whole run, concurrently:

- modules `module/soakN` loop `restic backup` of fresh random files into their own
  repository (the last one on an `rclone` destination of type local, the others on the
  node's `cluster` destination) and now and then `restic restore latest`, comparing
  the restored bytes with what was backed up;
- the node `node/1` uploads metadata `.json` files and a cluster backup over WebDAV,
  lists the destination root, MKCOL / PUT / COPY / MOVE / DELETE, and runs
  `restic forget --keep-last 2 --prune` and `restic check` on the modules' repositories;
- every few seconds a third destination is added to or removed from Redis and
  `backup-destination-changed` is published (a new backend generation each time);
- at a third of the run one rclone child is killed (SIGKILL); at two thirds one is
  stopped (SIGSTOP, left stopped: the liveness watchdog must replace it);
- a neighbour sends a few requests a second as `node/1` with a wrong password.

Over real links and real storage (issue 18; `--no-slow-links` leaves them out):

- two more module repositories live on network storage served on this machine, an S3
  destination (`rclone serve s3`) and an SFTP one (`rclone serve sftp`), each reached
  through the suite's fault-injecting proxy with a little latency added; the requests
  each remote sees are counted;
- the first module reaches the gateway over a slow link: its restic talks to a shaping
  proxy (a bandwidth cap and latency) in front of the gateway;
- the node uploads a cluster backup over WebDAV at 1 MB/s, paced by the client, large
  enough to last longer than 30 s, alternately to this node's disk and to the S3
  destination; each is read back and compared, the older ones deleted.

With the limits of issue 13 on (the default; `--no-limits` runs without them), as a
cluster sets them in Redis before the gateway starts:

- a gateway-wide `upload` bandwidth limit the modules (and the node) share, changed
  while backups are in flight: to `off`, back, to a higher value, back, every few
  seconds (`cluster/event/backup-limits-changed` each time); no request may fail;
- a `*` quota on both module destinations, large enough never to refuse, so every
  module's uploads and the node's prune deletes go through the quota's bookkeeping;
- the default cap of 8 requests in flight per module (no `concurrency` key): restic's
  5 connections fit, so no 503 over a cap is expected;
- one more module, `overflow1`, with a quota of a few MiB, backs up one more MiB of
  random data each round until its backups fail with 507; it then restores its last
  good snapshot. Nothing it was refused may be on disk, its repository may never hold
  more than its quota (but for what the node uploaded into it), and the node's
  retention on it is never refused.

At the end (limits or not) the node asks for a listing of the storage (`POST /status`)
and waits until each module repository's `used_bytes` equals its bytes on disk.

restic runs on one repository one after the other (restic 0.14 does not wait for
locks), on different repositories at once. At the end it prints a summary (also
written to var/soak-summary.txt; the gateway's log is kept as var/soak-gateway.log)
and exits 1 when a "must" failed.

    make soak                           # 180 s of load, about 5 minutes in all
    make soak DURATION=1800             # half an hour
    make soak SOAK_ARGS="--duration 600 --stop-backend restic-append-only"
    make soak SOAK_ARGS=--no-limits     # without quotas, bandwidth limit, overflow module
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from faultproxy import FaultProxy  # noqa: E402
from harness import (  # noqa: E402
    Cluster,
    GatewayProcess,
    RedisServer,
    basic,
    free_port,
    send_request,
    stop_process,
)
from remotes import S3Storage, SftpStorage, Storage  # noqa: E402

from gateway.limits.values import BadValue, format_size, parse_rate, parse_size  # noqa: E402

DEST_LOCAL = "50a50a50-8f8b-4c43-a1d3-7f3f5f7c1a01"  # provider cluster, this node's disk
DEST_REMOTE = "50a50a50-1b2a-4d6e-9f70-aa11bb22cc33"  # provider rclone, type local
DEST_EXTRA = "50a50a50-3c4d-4e5f-8a9b-0c1d2e3f4a5b"  # comes and goes during the run
DEST_S3 = "50a50a50-5e6f-4a7b-8c9d-0e1f2a3b4c5d"  # rclone serve s3, through a fault proxy
DEST_SFTP = "50a50a50-7a8b-4c9d-8e0f-1a2b3c4d5e6f"  # rclone serve sftp, through one too
NODE_VPN_IP = "10.5.4.1"
NODE = ("node/1", "soak-node-secret")
WRONG = ("node/1", "not-the-node-password")
RESTIC_PASSWORD = "soak-restic-password"
BACKENDS = ("restic", "restic-append-only", "webdav")
LIVENESS = ["--liveness-interval", "1", "--liveness-timeout", "3", "--liveness-misses", "3"]
MiB = 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

IDLE_CPU_LIMIT = 0.05  # CPU seconds per second, each rclone child, once the load stopped
WINDOW_MARGIN = 5.0  # seconds added to the end of the kill and stop windows
# A replaced child keeps the requests it had this long at most, then they are cut (the
# gateway's backends.manager.CHILD_DRAIN_GRACE; its --backend-timeout is 300 s).
REPLACED_CHILD_GRACE = 35.0
REPLACE_TIMEOUT = 90.0  # a stopped child not replaced within this is a failure
RUNNING_TIMEOUT = 120.0  # a killed child not running again within this is a failure

# the limits (issue 13): Redis keys as the cluster writes them
QUOTA_KEY = "rclone-gateway/quota/"  # + destination uuid: HASH module id or * -> bytes
BWLIMIT_KEY = "rclone-gateway/bwlimit"  # HASH upload, download, module/<id>/... -> schedule
LIMITS_CHANGED = "backup-limits-changed"
OVERFLOW = "overflow1"  # the module that fills its quota
IN_FLIGHT_REASON = "too many requests in flight"  # access log reason of a 503 over a cap
QUOTA_REASON = "over quota"  # access log reason of a 507
APPLY_TIMEOUT = 15.0  # a limit changed in Redis shows in /status within this, or a failure
SETTLE_TIMEOUT = 90.0  # after the load, used_bytes equal to the bytes on disk within this
# Peak RSS of the gateway (VmHWM): about 55-60 MiB measured in the soak and in the tests;
# the bound is twice that, as tests/test_gateway.py's PEAK_RSS_BOUND_MIB: a body buffered
# whole, a queue that grows with the load, or a leak per request fails it.
MEMORY_BOUND_MIB = 110
RATE_MARGIN = 1.10  # the upload through the gateway over 5 s, at most this times its limit


def say(text: str) -> None:
    print(f"[{clock(time.time())}] {text}", file=sys.stderr, flush=True)


def clock(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S.%f")[:-3]


@dataclass(frozen=True)
class Module:
    name: str  # module id, e.g. soak1
    uuid: str
    password: str
    dest: str
    overflow: bool = False  # fills its small quota: its backups end refused (507)
    slow_link: bool = False  # its restic reaches the gateway through the shaping proxy

    @property
    def user(self) -> str:
        return f"module/{self.name}"

    @property
    def app(self) -> str:
        return self.name.rstrip("0123456789")

    @property
    def path(self) -> str:
        return f"/{self.dest}/{self.app}/{self.uuid}"


@dataclass
class Window:
    what: str
    backend: str
    pid: int
    start: float
    recovered: float | None = None  # running again (kill) / replaced (stop)
    deadline: float = 0.0  # when we gave up waiting
    new_pid: int | None = None
    generation: int = 0  # of the child signalled
    gone: bool | None = None  # the stopped child was killed after its replacement

    @property
    def end(self) -> float:
        end = self.recovered if self.recovered is not None else self.deadline
        if self.what == "stop":
            # requests already on the stopped child stay there until they are cut
            end += REPLACED_CHILD_GRACE
        return end + WINDOW_MARGIN


@dataclass
class Call:
    """One HTTP request made by the soak itself, with what it expected."""

    who: str
    method: str
    what: str
    start: float
    end: float
    status: int
    ok: bool
    detail: str = ""


@dataclass
class BwChange:
    """The gateway's `upload` limit set in Redis (the first: before the gateway started)."""

    at: float
    value: str
    rate: int | None  # bytes per second; None: off
    backups: int = 0  # restic backups in flight when it was written
    requests: int = 0  # requests in flight at the gateway (/health) then
    applied: float | None = None  # /status showed the new rate
    end: float = 0.0  # the next change (or the end of the load)

    @property
    def since(self) -> float:
        """From when the rate surely applied."""
        return self.applied if self.applied is not None else self.at


@dataclass
class RepoUsage:
    """A module repository after the load: the gateway's count and the disk."""

    module: str
    used: int | None  # /status limits.quotas used_bytes (None: not shown)
    disk: int
    quota: int | None
    reserved: int | None
    level: int | None

    @property
    def equal(self) -> bool:
        return self.used == self.disk and not self.reserved


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    restic_runs: Counter = field(default_factory=Counter)  # op -> runs
    restic_failures: list[tuple[float, str, str, int, str]] = field(default_factory=list)
    restores_compared: int = 0
    restore_mismatches: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    neighbour: Counter = field(default_factory=Counter)  # status -> count
    dest_adds: int = 0
    dest_removes: int = 0
    dest_visible_after: list[float] = field(default_factory=list)  # new generation serving
    dest_not_visible: int = 0  # no new generation serving the change within 30 s
    health_not_200: list[tuple[float, int]] = field(default_factory=list)
    max_rclone_children: int = 0
    max_gateway_rss_kb: int = 0
    worker_errors: list[str] = field(default_factory=list)
    backups_in_flight: int = 0
    # the overflowing module
    overflow_ok: int = 0  # backups that succeeded
    overflow_refused: list[tuple[float, float, int, str]] = field(default_factory=list)
    overflow_restores: int = 0  # restores of the last good snapshot after a refused backup
    retention_skipped: int = 0  # the node's turn on a repository busy with a long backup
    overflow_retention: int = 0  # the node's forget --prune + check on the overflowing one
    bw_changes: list[BwChange] = field(default_factory=list)
    max_in_flight: Counter = field(default_factory=Counter)  # user -> most seen in /status
    overflow_disk_max: tuple[int, float] = (0, 0.0)  # its bytes on disk, sampled: most, when
    status_samples: int = 0
    # the node's cluster backups at 1 MB/s: (start, end, destination, status, equal read)
    slow_uploads: list[tuple[float, float, str, int, bool]] = field(default_factory=list)

    def call(self, c: Call) -> None:
        with self.lock:
            self.calls.append(c)


@dataclass
class SlowLinks:
    """The run's network storage and slow link: an S3 and an SFTP server on this machine,
    each behind a fault proxy that the gateway's rclone children go through, and a shaping
    proxy in front of the gateway for the slow-link module's restic."""

    storages: list[Storage]
    remote_links: dict[str, FaultProxy]  # destination -> the proxy its child reaches it by
    trees: dict[str, Path]  # destination -> the directory its tree is stored in
    client_link: FaultProxy

    @classmethod
    def start(cls, args: argparse.Namespace, workdir: Path, cluster: Cluster,
              gateway_port: int) -> SlowLinks:
        s3 = S3Storage(workdir / "s3-storage", workdir / "s3")
        sftp = SftpStorage(workdir / "sftp-storage", workdir / "sftp")
        links = cls([s3, sftp], {}, {}, FaultProxy(("127.0.0.1", gateway_port)))
        try:
            for storage, dest in ((s3, DEST_S3), (sftp, DEST_SFTP)):
                storage.start()
                proxy = storage.proxy()
                proxy.latency = args.remote_latency
                links.remote_links[dest] = proxy
                links.trees[dest] = storage.destination(cluster, dest, proxy)
            links.client_link.bandwidth = args.slow_link_rate
            links.client_link.latency = args.slow_link_latency
        except BaseException:
            links.stop()
            raise
        return links

    def stop(self) -> None:
        self.client_link.close()
        for storage in self.storages:
            storage.stop()


# --------------------------------------------------------------------------- /proc


def proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float | None:
    fields = proc_stat(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def gone(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is None or fields[0] == "Z"


def children_of(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = proc_stat(int(name))
            if fields is not None and fields[0] != "Z" and int(fields[1]) == pid:
                found.append(int(name))
    return sorted(found)


def vm_kb(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


def digests(directory: Path) -> dict[str, str]:
    if not directory.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


def disk_files(directory: Path) -> dict[Path, int]:
    """Every file under `directory`, with its size."""
    sizes = {}
    for path in directory.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            if path.is_file():
                sizes[path] = path.stat().st_size
    return sizes


# --------------------------------------------------------------------------- the run


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path, gateway: GatewayProcess,
                 cluster: Cluster, modules: list[Module], remote_dir: Path,
                 extra_dir: Path, links: SlowLinks | None = None) -> None:
        self.args = args
        self.workdir = workdir
        self.gateway = gateway
        self.cluster = cluster
        self.modules = modules
        self.remote_dir = remote_dir
        self.extra_dir = extra_dir
        self.links = links
        self.stats = Stats()
        self.stop = threading.Event()
        self.aborted = False
        self.rng = random.Random(args.seed)
        # restic 0.14 does not wait for a lock: one restic at a time per repository
        self.repo_locks = {m.name: threading.Lock() for m in modules}
        # held while the destination set must not change (around the fault injections)
        self.churn_lock = threading.Lock()
        self.windows: list[Window] = []
        self.procs: set[subprocess.Popen] = set()
        self.procs_lock = threading.Lock()
        self.restic_exe = args.restic
        self.ready_at = time.time()  # the gateway answered /health with 200
        self.t0 = 0.0
        self.t_end = 0.0

    # ---------------------------------------------------------------- helpers

    def request(self, method: str, path: str, who: tuple[str, str] | None = None, *,
                headers: dict[str, str] | None = None, body: bytes | None = None,
                rest: bool = False, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
        """Status 0 when the connection failed or timed out."""
        conn = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=timeout)
        try:
            return send_request(conn, method, path, who, headers=headers, body=body, rest=rest)
        except (OSError, http.client.HTTPException) as exc:
            return 0, {}, repr(exc).encode()
        finally:
            conn.close()

    def health(self) -> dict:
        status, _, body = self.request("GET", "/health", timeout=10)
        if status not in (200, 503):
            return {}
        try:
            return json.loads(body)
        except ValueError:
            return {}

    def metrics(self) -> str:
        status, _, body = self.request("GET", "/metrics", timeout=10)
        return body.decode("utf-8", "replace") if status == 200 else ""

    def status(self) -> dict:
        """The node's `/status` document (with its `limits`); {} when not answered."""
        status, _, body = self.request("GET", "/status", NODE,
                                       headers={"Accept": "application/json"}, timeout=30)
        if status != 200:
            return {}
        try:
            return json.loads(body)
        except ValueError:
            return {}

    def repo_dir(self, module: Module) -> Path:
        """Where the module's repository is on disk."""
        if module.dest == DEST_REMOTE:
            base = self.remote_dir
        elif self.links is not None and module.dest in self.links.trees:
            base = self.links.trees[module.dest]
        else:
            base = self.gateway.local_repo
        return base / module.app / module.uuid

    def repo_url(self, module: Module, who: tuple[str, str]) -> str:
        user = who[0].replace("/", "%2F")
        port = self.gateway.port
        if module.slow_link and who[0] == module.user and self.links is not None:
            port = self.links.client_link.port
        return f"rest:http://{user}:{who[1]}@127.0.0.1:{port}{module.path}/"

    def restic(self, op: str, module: Module, who: tuple[str, str], *args: str,
               timeout: float = 900, refusal_expected: bool = False) -> bool:
        """One restic run; False (and recorded as failed) when it exits non-zero. With
        `refusal_expected`, a run that failed on a 507 is recorded apart, as expected
        (`self.refused` is then True)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")}
        env["RESTIC_PASSWORD"] = RESTIC_PASSWORD
        exe = self.args.overflow_restic if module.overflow else self.restic_exe
        argv = [exe, "-r", self.repo_url(module, who), "--no-cache", *args]
        started = time.time()
        backup = op == "backup"
        with self.stats.lock:
            self.stats.backups_in_flight += backup
        try:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    process_group=0)
            with self.procs_lock:
                self.procs.add(proc)
            try:
                try:
                    _, err = proc.communicate(timeout=timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    _, err = proc.communicate()
                    err += f"\n(soak: killed after {timeout:.0f} s)"
            finally:
                with self.procs_lock:
                    self.procs.discard(proc)
        finally:
            with self.stats.lock:
                self.stats.backups_in_flight -= backup
        if self.aborted:
            return False
        tail = "\n".join(err.strip().splitlines()[-12:])
        refused = proc.returncode != 0 and refusal_expected and "507" in err
        with self.stats.lock:
            self.stats.restic_runs[op] += 1
            if refused:
                self.stats.overflow_refused.append(
                    (started, time.time(), proc.returncode, tail))
            elif proc.returncode != 0:
                self.stats.restic_failures.append(
                    (started, f"{op} {module.name} as {who[0]}", module.path, proc.returncode,
                     tail))
        if refused:
            say(f"restic {op} of {module.name} refused over its quota, as expected "
                f"({proc.returncode}, {time.time() - started:.0f} s)")
        elif proc.returncode != 0:
            say(f"restic {op} of {module.name} as {who[0]} failed ({proc.returncode})")
        return proc.returncode == 0

    def kill_restics(self) -> None:
        with self.procs_lock:
            procs = list(self.procs)
        for proc in procs:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)

    def sleep(self, seconds: float) -> bool:
        """False when the run is over."""
        return not self.stop.wait(seconds)

    def worker(self, name: str, fn: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            try:
                fn()
            except Exception:
                with self.stats.lock:
                    self.stats.worker_errors.append(f"{name}: {traceback.format_exc()}")
                say(f"worker {name} crashed:\n{traceback.format_exc()}")

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        return thread

    # ---------------------------------------------------------------- modules

    def init_repositories(self) -> None:
        for module in self.modules:
            if not self.restic("init", module, (module.user, module.password), "init",
                               timeout=120):
                raise RuntimeError(f"restic init of {module.name} failed: "
                                   f"{self.stats.restic_failures[-1][4]}")

    def module_loop(self, module: Module) -> None:
        if module.overflow:
            self.overflow_loop(module)
            return
        rng = random.Random(f"{self.args.seed}-{module.name}")
        data = self.workdir / "data" / module.name
        data.mkdir(parents=True)
        restore_root = self.workdir / "restore" / module.name
        who = (module.user, module.password)
        i = 0
        while not self.stop.is_set():
            # a fresh random file each round; the three newest stay
            size = rng.randint(MiB, 3 * MiB)
            (data / f"file{i:05d}.bin").write_bytes(os.urandom(size))
            for old in sorted(data.iterdir())[:-3]:
                old.unlink()
            with self.repo_locks[module.name]:
                ok = self.restic("backup", module, who, "backup", "--host", "soak", str(data))
                if ok and i % self.args.restore_every == self.args.restore_every - 1:
                    shutil.rmtree(restore_root, ignore_errors=True)
                    if self.restic("restore", module, who, "restore", "latest",
                                   "--target", str(restore_root)):
                        self.compare(module, data, restore_root / data.relative_to("/"))
                    shutil.rmtree(restore_root, ignore_errors=True)
            i += 1
            if not self.sleep(rng.uniform(0.5, 2.0)):
                break

    def overflow_loop(self, module: Module) -> None:
        """One more MiB of random data each round (nothing deleted), until the quota
        refuses the backups (507); after each refused one, its last good snapshot is
        restored and compared with what was backed up then."""
        rng = random.Random(f"{self.args.seed}-{module.name}")
        data = self.workdir / "data" / module.name
        data.mkdir(parents=True)
        restore_root = self.workdir / "restore" / module.name
        who = (module.user, module.password)
        last_good: dict[str, str] | None = None  # file -> digest, of the last snapshot
        i = 0
        while not self.stop.is_set():
            (data / f"file{i:05d}.bin").write_bytes(os.urandom(self.args.overflow_file))
            with self.repo_locks[module.name]:
                before = len(self.stats.overflow_refused)
                if self.restic("backup", module, who, "backup", "--host", "soak", str(data),
                               refusal_expected=True):
                    last_good = digests(data)
                    with self.stats.lock:
                        self.stats.overflow_ok += 1
                    check = i % self.args.restore_every == self.args.restore_every - 1
                else:
                    check = len(self.stats.overflow_refused) > before
                if check and last_good is not None:
                    shutil.rmtree(restore_root, ignore_errors=True)
                    if self.restic("restore", module, who, "restore", "latest",
                                   "--target", str(restore_root)):
                        self.compare(module, data, restore_root / data.relative_to("/"),
                                     want=last_good)
                        if len(self.stats.overflow_refused) > before:
                            with self.stats.lock:
                                self.stats.overflow_restores += 1
                    shutil.rmtree(restore_root, ignore_errors=True)
            i += 1
            if not self.sleep(rng.uniform(0.5, 2.0)):
                break

    def compare(self, module: Module, data: Path, restored: Path, *,
                want: dict[str, str] | None = None) -> None:
        want, got = (digests(data) if want is None else want), digests(restored)
        with self.stats.lock:
            self.stats.restores_compared += 1
            if want != got:
                self.stats.restore_mismatches.append(
                    f"{module.name}: backed up {sorted(want)}, restored {sorted(got)} "
                    f"(equal names with other bytes: "
                    f"{sorted(k for k in want if k in got and want[k] != got[k])})")

    # ---------------------------------------------------------------- node

    def node_call(self, method: str, path: str, expect: set[int], what: str, *,
                  headers: dict[str, str] | None = None, body: bytes | None = None,
                  check: Callable[[bytes], bool] | None = None) -> tuple[int, bytes]:
        started = time.time()
        status, _, answer = self.request(method, path, NODE, headers=headers, body=body)
        ok = status in expect and (check is None or check(answer))
        detail = "" if ok else (f"expected {sorted(expect)}"
                                f"{' and a check of the body' if check else ''}: "
                                + answer[:200].decode("utf-8", "replace"))
        self.stats.call(Call(NODE[0], method, what, started, time.time(), status, ok, detail))
        return status, answer

    def node_webdav_loop(self) -> None:
        authority = f"http://127.0.0.1:{self.gateway.port}"
        created = {201, 204}
        n = 0
        while not self.stop.is_set():
            dest = DEST_LOCAL if n % 2 == 0 else DEST_REMOTE
            for module in self.modules:
                meta = json.dumps({"module": module.name, "round": n}).encode()
                path = f"/{module.dest}/{module.app}/{module.uuid}.json"
                status, _ = self.node_call("PUT", path, created, "PUT <app>/<uuid>.json",
                                           body=meta)
                if status in created:  # what was just written is what is read
                    self.node_call("GET", path, {200}, "GET <app>/<uuid>.json (fresh)",
                                   check=lambda b, meta=meta: b == meta)
            backup = f"cluster-backup-{n}.json.gz.gpg"
            self.node_call("PUT", f"/{dest}/{backup}", created, "PUT cluster-backup",
                           body=os.urandom(self.rng.randint(16_000, 200_000)))
            self.node_call("PROPFIND", f"/{dest}/", {207}, "PROPFIND root Depth 1",
                           headers={"Depth": "1"},
                           check=lambda b, backup=backup: backup.encode() in b)
            d = f"/{dest}/soak-node-{n}"
            self.node_call("MKCOL", f"{d}/", {201}, "MKCOL")
            self.node_call("PUT", f"{d}/a.txt", created, "PUT small", body=b"x" * 1000)
            self.node_call("COPY", f"{d}/a.txt", created, "COPY",
                           headers={"Destination": f"{authority}{d}/b.txt"})
            self.node_call("MOVE", f"{d}/b.txt", created, "MOVE",
                           headers={"Destination": f"{authority}{d}/c.txt"})
            self.node_call("PROPFIND", f"{d}/", {207}, "PROPFIND dir Depth 1",
                           headers={"Depth": "1"},
                           check=lambda b: b"a.txt" in b and b"c.txt" in b and b"b.txt" not in b)
            self.node_call("DELETE", f"{d}/", {200, 204}, "DELETE dir")
            if n >= 2:  # the node keeps the two newest cluster backups of each destination
                self.node_call("DELETE", f"/{dest}/cluster-backup-{n - 2}.json.gz.gpg",
                               {200, 204}, "DELETE cluster-backup")
            n += 1
            if not self.sleep(self.rng.uniform(0.5, 1.5)):
                break

    def paced_put(self, path: str, size: int, rate: float) -> tuple[int, str]:
        """A WebDAV PUT of `size` random bytes as the node, sent at `rate` bytes/s by the
        client itself; the answer's status and the SHA-256 of what was sent."""
        digest = hashlib.sha256()
        piece = 64 * 1024

        def body() -> Iterator[bytes]:
            started = time.monotonic()
            sent = 0
            while sent < size:
                chunk = os.urandom(min(piece, size - sent))
                digest.update(chunk)
                yield chunk
                sent += len(chunk)
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)

        conn = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=600)
        try:
            conn.request("PUT", path, body=body(),
                         headers={"Authorization": basic(*NODE), "Content-Length": str(size)})
            response = conn.getresponse()
            response.read()
            return response.status, digest.hexdigest()
        except (OSError, http.client.HTTPException):
            return 0, digest.hexdigest()
        finally:
            conn.close()

    def read_digest(self, path: str) -> str | None:
        """The SHA-256 of a node's GET of `path`, streamed; None unless 200."""
        conn = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=120)
        try:
            conn.request("GET", path, headers={"Authorization": basic(*NODE)})
            response = conn.getresponse()
            digest = hashlib.sha256()
            while chunk := response.read(256 * 1024):
                digest.update(chunk)
            return digest.hexdigest() if response.status == 200 else None
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def clear_of_faults(self, seconds: float) -> bool:
        """No fault window open now, and none due to open within `seconds`."""
        now = time.time()
        due = (self.t0 + self.args.duration / 3, self.t0 + 2 * self.args.duration / 3)
        if any(now - WINDOW_MARGIN <= t <= now + seconds for t in due):
            return False
        return not any(w.start <= now and (w.recovered is None or now <= w.end)
                       for w in self.windows)

    def node_slow_upload_loop(self) -> None:
        """The node's cluster backup at 1 MB/s, to this node's disk and to S3 in turn; each
        starts only where it ends before the next fault window (a child killed or stopped
        under it would break it, which says nothing of slow links)."""
        assert self.links is not None
        lasts = self.args.slow_upload_size / self.args.slow_upload_rate + 10
        n = 0
        while not self.stop.is_set():
            if time.time() + lasts > self.t_end or not self.clear_of_faults(lasts):
                if not self.sleep(1.0):
                    break
                continue
            dest = (DEST_LOCAL, DEST_S3)[n % 2]
            path = f"/{dest}/slow-cluster-backup-{n}.json.gz.gpg"
            started = time.time()
            status, sent = self.paced_put(path, self.args.slow_upload_size,
                                          self.args.slow_upload_rate)
            ended = time.time()
            equal = status in (201, 204) and self.read_digest(path) == sent
            with self.stats.lock:
                self.stats.slow_uploads.append((started, ended, dest, status, equal))
            say(f"slow link: the node's {self.args.slow_upload_size / MiB:.0f} MiB at "
                f"{self.args.slow_upload_rate / 1e6:g} MB/s to {dest[:13]}: {status} after "
                f"{ended - started:.0f} s" + ("" if equal else ", NOT read back equal"))
            if n >= 2:
                old = f"/{(DEST_LOCAL, DEST_S3)[n % 2]}/slow-cluster-backup-{n - 2}.json.gz.gpg"
                self.request("DELETE", old, NODE)
            n += 1
            if not self.sleep(1.0):
                break

    def node_restic_loop(self) -> None:
        n = 0
        while not self.stop.is_set():
            if not self.sleep(2.0):
                break
            module = self.modules[n % len(self.modules)]
            n += 1
            lock = self.repo_locks[module.name]
            # a refused backup of the overflowing module retries for about a minute: its
            # turn is skipped then, not the other repositories' retention held up behind it
            if not lock.acquire(timeout=5 if module.overflow else -1):
                with self.stats.lock:
                    self.stats.retention_skipped += 1
                continue
            try:
                self.restic("forget --prune", module, NODE, "forget", "--keep-last", "2",
                            "--prune")
                self.restic("check", module, NODE, "check")
                if module.overflow:
                    with self.stats.lock:
                        self.stats.overflow_retention += 1
            finally:
                lock.release()

    # ---------------------------------------------------------------- neighbour

    def neighbour_loop(self) -> None:
        module = self.modules[0]
        n = 0
        while not self.stop.is_set():
            if n % 4 == 3:
                status, _, _ = self.request("PROPFIND", f"/{DEST_LOCAL}/", WRONG,
                                            headers={"Depth": "1"}, timeout=10)
            else:
                status, _, _ = self.request("GET", f"{module.path}/config", WRONG, rest=True,
                                            timeout=10)
            with self.stats.lock:
                self.stats.neighbour[status] += 1
            n += 1
            if not self.sleep(1.0 / self.args.neighbour_rate):
                break

    # ---------------------------------------------------------------- destinations

    def generation(self) -> int:
        """Number of the backend generation serving now (0: unknown)."""
        backends = self.health().get("backends", {})
        return max((b.get("generation", 0) for b in backends.values()), default=0)

    def churn_loop(self) -> None:
        present = False
        n = 0
        while self.sleep(self.args.churn_interval):
            # The lock is held until a new generation serves the change: whoever takes it
            # next (the faults) finds the children it sees in /health the serving ones.
            with self.churn_lock:
                if self.stop.is_set():
                    break
                before = self.generation()
                if present:
                    self.cluster.remove_destination(DEST_EXTRA)
                else:
                    self.cluster.add_destination(
                        DEST_EXTRA, provider="rclone", url="rclone:local", name="soak-extra",
                        basepath=str(self.extra_dir), rclone_conf=f"[{DEST_EXTRA}]\ntype = local\n")
                present = not present
                changed = time.monotonic()
                self.cluster.publish("backup-destination-changed")
                with self.stats.lock:
                    if present:
                        self.stats.dest_adds += 1
                    else:
                        self.stats.dest_removes += 1
                while time.monotonic() - changed < 30:
                    if self.generation() > before:
                        dest = self.health().get("destinations", {}).get(DEST_EXTRA, {})
                        if not present or dest.get("served") == "here":
                            break
                    time.sleep(0.05)
                else:
                    with self.stats.lock:
                        self.stats.dest_not_visible += 1
                    continue
                with self.stats.lock:
                    self.stats.dest_visible_after.append(time.monotonic() - changed)
            if present:  # once /health says it is served, the node uses it at once
                name = f"/{DEST_EXTRA}/extra-{n}.bin"
                body = os.urandom(50_000)
                status, _ = self.node_call("PUT", name, {201, 204}, "extra: PUT", body=body)
                if status in (201, 204):  # what was written is read, listed and deleted
                    self.node_call("GET", name, {200}, "extra: GET",
                                   check=lambda b, body=body: b == body)
                    self.node_call("PROPFIND", f"/{DEST_EXTRA}/", {207},
                                   "extra: PROPFIND Depth 1", headers={"Depth": "1"},
                                   check=lambda b, n=n: f"extra-{n}.bin".encode() in b)
                    self.node_call("DELETE", name, {200, 204}, "extra: DELETE")
                n += 1

    # ---------------------------------------------------------------- faults

    def child_pid(self, backend: str) -> tuple[int | None, dict]:
        info = self.health().get("backends", {}).get(backend, {})
        pid = info.get("pid")
        if pid is None:
            return None, info
        fields = proc_stat(pid)
        if fields is None or int(fields[1]) != self.gateway.pid:
            return None, info  # only ever signal a child of the gateway we started
        return pid, info

    def until(self, t: float) -> bool:
        return self.sleep(max(0.0, t - time.time()))

    def faults_loop(self) -> None:
        duration = self.args.duration
        if not self.until(self.t0 + duration / 3):
            return
        self.kill_child(self.args.kill_backend)
        if not self.until(self.t0 + 2 * duration / 3):
            return
        self.stop_child(self.args.stop_backend)

    def kill_child(self, backend: str) -> None:
        with self.churn_lock:  # not while a destination change is on its way
            pid, info = self.child_pid(backend)
            if pid is None:
                say(f"kill: no running {backend} child to kill")
                return
            os.kill(pid, signal.SIGKILL)
            window = Window("kill", backend, pid, time.time(),
                            generation=info.get("generation", 0))
            self.windows.append(window)
        say(f"kill: SIGKILL to the {backend} child (pid {pid})")
        window.deadline = window.start + RUNNING_TIMEOUT
        while time.time() < window.deadline:
            info = self.health().get("backends", {}).get(backend, {})
            if info.get("state") == "running" and info.get("pid") not in (None, pid):
                window.recovered, window.new_pid = time.time(), info["pid"]
                say(f"kill: {backend} running again (pid {window.new_pid}) after "
                    f"{window.recovered - window.start:.1f} s")
                return
            time.sleep(0.1)
        say(f"kill: {backend} not running again after {RUNNING_TIMEOUT:.0f} s")

    def stop_child(self, backend: str) -> None:
        # The destination set stays as it is until the watchdog replaced the child: a new
        # generation would replace it too, and the watchdog would not be what was measured.
        with self.churn_lock:
            pid, info = self.child_pid(backend)
            if pid is None:
                say(f"stop: no running {backend} child to stop")
                return
            before = info.get("replacements", 0)
            stop_process(pid)
            window = Window("stop", backend, pid, time.time(),
                            generation=info.get("generation", 0))
            self.windows.append(window)
            say(f"stop: SIGSTOP to the {backend} child (pid {pid}), "
                f"{before} replacements so far")
            window.deadline = window.start + REPLACE_TIMEOUT
            while time.time() < window.deadline:
                info = self.health().get("backends", {}).get(backend, {})
                if info.get("replacements", 0) > before:
                    window.recovered, window.new_pid = time.time(), info.get("pid")
                    say(f"stop: {backend} replaced (pid {window.new_pid}) after "
                        f"{window.recovered - window.start:.1f} s")
                    return
                time.sleep(0.1)
        say(f"stop: {backend} not replaced after {REPLACE_TIMEOUT:.0f} s")

    # ---------------------------------------------------------------- health

    def health_loop(self) -> None:
        n = 0
        while self.sleep(1.0):
            status, _, _ = self.request("GET", "/health", timeout=10)
            rss = vm_kb(self.gateway.pid, "VmRSS")
            children = len(children_of(self.gateway.pid))
            with self.stats.lock:
                if status != 200:
                    self.stats.health_not_200.append((time.time(), status))
                self.stats.max_gateway_rss_kb = max(self.stats.max_gateway_rss_kb, rss)
                self.stats.max_rclone_children = max(self.stats.max_rclone_children, children)
            n += 1
            if self.args.limits:  # what the overflowing repository holds, each second
                overflow = next(m for m in self.modules if m.overflow)
                size = sum(disk_files(self.repo_dir(overflow)).values())
                with self.stats.lock:
                    if size > self.stats.overflow_disk_max[0]:
                        self.stats.overflow_disk_max = (size, time.time())
            if self.args.limits and n % 2 == 0:  # requests in flight per user, sampled
                in_flight = self.status().get("limits", {}).get("concurrency", {}).get(
                    "in_flight", {})
                with self.stats.lock:
                    self.stats.status_samples += 1
                    for user, count in in_flight.items():
                        self.stats.max_in_flight[user] = max(self.stats.max_in_flight[user],
                                                             count)

    # ---------------------------------------------------------------- limits

    def upload_rate_shown(self) -> tuple[bool, int | None]:
        """(whether /status shows an `upload` limit, the rate it gives now)."""
        bandwidth = self.status().get("limits", {}).get("bandwidth")
        if not isinstance(bandwidth, dict):
            return False, None
        upload = bandwidth.get("upload")
        return isinstance(upload, dict), (upload or {}).get("rate_now")

    def wait_limits_in_force(self) -> None:
        """Before the load: /status shows the limits Redis held when the gateway started."""
        rate = parse_rate(self.args.upload_limit)
        overflow = next(m for m in self.modules if m.overflow)
        deadline = time.monotonic() + APPLY_TIMEOUT
        while True:
            limits = self.status().get("limits", {})
            shown = {e.get("module"): e.get("quota_bytes") for e in limits.get("quotas", [])}
            upload = limits.get("bandwidth", {}).get("upload", {})
            if (shown.get(overflow.name) == parse_size(self.args.overflow_quota)
                    and upload.get("rate_now") == rate):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the limits set before the start not in /status after "
                                   f"{APPLY_TIMEOUT:.0f} s: {limits}")
            time.sleep(0.2)

    def set_upload_limit(self, value: str) -> None:
        """Writes the gateway's `upload` limit and announces it, as `limits set` does;
        waits until /status gives the new rate."""
        rate = parse_rate(value)
        with self.stats.lock:
            backups = self.stats.backups_in_flight
        change = BwChange(time.time(), value, rate, backups=backups,
                          requests=int(self.health().get("inflight", 0) or 0))
        self.cluster.r.hset(BWLIMIT_KEY, "upload", value)
        self.cluster.publish(LIMITS_CHANGED)
        with self.stats.lock:
            if self.stats.bw_changes:
                self.stats.bw_changes[-1].end = change.at
            self.stats.bw_changes.append(change)
        deadline = change.at + APPLY_TIMEOUT
        while time.time() < deadline:
            if self.upload_rate_shown() == (True, rate):
                change.applied = time.time()
                break
            time.sleep(0.05)
        applied = (f"in /status after {change.applied - change.at:.2f} s"
                   if change.applied is not None
                   else f"NOT in /status within {APPLY_TIMEOUT:.0f} s")
        say(f"limits: upload {value} with {backups} backups and {change.requests} requests "
            f"in flight; {applied}")

    def limits_loop(self) -> None:
        """The `upload` limit in force most of the time; now and then `off` or a higher
        value for a while, each change written while backups are in flight."""
        interval = self.args.bwlimit_interval
        plan = [("off", 1), (self.args.upload_limit, 2), (self.args.upload_limit_high, 1),
                (self.args.upload_limit, 2)]
        at = self.t0 + 2 * interval
        k = 0
        while self.until(at):
            # until a backup is in flight (a few seconds at most: one nearly always is)
            waited = time.monotonic() + 10
            while time.monotonic() < waited and not self.stop.is_set():
                with self.stats.lock:
                    if self.stats.backups_in_flight:
                        break
                time.sleep(0.05)
            if self.stop.is_set():
                break
            value, hold = plan[k % len(plan)]
            self.set_upload_limit(value)
            k += 1
            at = time.time() + hold * interval

    def settle_usage(self) -> tuple[list[RepoUsage], float | None]:
        """After the load: asks for a listing of the storage (`POST /status`, as
        `rclone-gateway status --rescan`), then waits until each module repository's
        `used_bytes` in /status equals its bytes on disk; the last comparison, and the
        seconds it took (None: not within SETTLE_TIMEOUT)."""
        asked_at = self.status().get("generated_at", time.time())
        started = time.monotonic()
        code, _, body = self.request("POST", "/status", NODE, timeout=30)
        if code != 202:
            say(f"settle: POST /status answered {code}: {body[:200]!r}")
        rows: list[RepoUsage] = []
        while True:
            document = self.status()
            listed = document.get("last_scan_at")
            entries = {e.get("repository"): e
                       for e in document.get("limits", {}).get("quotas", [])}
            rows = []
            for module in self.modules:
                entry = entries.get(module.path, {})
                rows.append(RepoUsage(module.name, entry.get("used_bytes"),
                                      sum(disk_files(self.repo_dir(module)).values()),
                                      entry.get("quota_bytes"), entry.get("reserved_bytes"),
                                      entry.get("level_percent")))
            if listed is not None and listed >= asked_at and all(r.equal for r in rows):
                return rows, time.monotonic() - started
            if time.monotonic() - started > SETTLE_TIMEOUT:
                return rows, None
            time.sleep(0.5)

    # ---------------------------------------------------------------- the whole

    def run(self) -> list[threading.Thread]:
        self.t0 = time.time()
        self.t_end = self.t0 + self.args.duration
        threads = [self.worker(f"module-{m.name}", lambda m=m: self.module_loop(m))
                   for m in self.modules]
        threads += [
            self.worker("node-webdav", self.node_webdav_loop),
            self.worker("node-restic", self.node_restic_loop),
            self.worker("neighbour", self.neighbour_loop),
            self.worker("churn", self.churn_loop),
            self.worker("health", self.health_loop),
        ]
        if self.args.limits:
            threads.append(self.worker("limits", self.limits_loop))
        if self.links is not None:
            threads.append(self.worker("node-slow-upload", self.node_slow_upload_loop))
        faults = self.worker("faults", self.faults_loop)
        last = 0.0
        while time.time() < self.t_end:
            time.sleep(min(1.0, max(0.0, self.t_end - time.time())))
            if time.time() - last >= 30:
                last = time.time()
                with self.stats.lock:
                    runs, failed = sum(self.stats.restic_runs.values()), len(
                        self.stats.restic_failures)
                say(f"{time.time() - self.t0:.0f}/{self.args.duration:.0f} s: "
                    f"{runs} restic runs, {failed} failed")
        say("load ends; waiting for the runs in progress")
        self.stop.set()
        with self.stats.lock:
            if self.stats.bw_changes:
                self.stats.bw_changes[-1].end = time.time()
        return [*threads, faults]


# --------------------------------------------------------------------------- the report


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def access_lines(log_text: str) -> Iterator[dict]:
    for line in log_text.splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "status" in entry and "time" in entry:
                yield entry


def short(entry: dict) -> str:
    """An access line, the fields that tell what happened."""
    return (f"{entry['time']} {entry.get('status')} {entry.get('user')} {entry.get('method')} "
            f"{entry.get('path')} {entry.get('duration_ms')} ms backend {entry.get('backend')}: "
            f"{entry.get('reason')}")


def log_warnings(log_text: str) -> Counter:
    """WARNING and ERROR text lines of the gateway, numbers and ids folded."""
    found: Counter = Counter()
    for line in log_text.splitlines():
        match = re.match(r"\S+ \S+ (WARNING|ERROR) (\S+) (.*)", line)
        if match:
            text = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<uuid>", match.group(3))
            text = re.sub(r"\d+(\.\d+)?", "N", text)
            found[f"{match.group(1)} {text}"] += 1
    return found


def in_windows(start: float, end: float, windows: list[Window]) -> bool:
    """True when [start, end] overlaps a fault window: the request was in flight during it."""
    return any(start <= w.end and end >= w.start for w in windows)


@dataclass
class Verdict:
    musts: list[tuple[str, bool]] = field(default_factory=list)

    def must(self, what: str, ok: bool) -> str:
        self.musts.append((what, ok))
        return "ok" if ok else "FAILED"

    @property
    def passed(self) -> bool:
        return all(ok for _, ok in self.musts)


def metric_sum(metrics: str, name: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float | None]:
    before = {kind: cpu_seconds(pid) for kind, pid in pids.items()}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    result: dict[str, float | None] = {}
    for kind, pid in pids.items():
        after = cpu_seconds(pid)
        b = before[kind]
        result[kind] = None if after is None or b is None else (after - b) / elapsed
    return result


def summary(soak: Soak, *, final_health: dict, metrics: str, idle: dict[str, float | None],
            idle_pids: dict[str, int], gateway_idle: float | None, vm_hwm_kb: int,
            vm_rss_kb: int, children_after: list[int], stop_code: int | None,
            left_behind: list[int], log_text: str, versions: str, usage: list[RepoUsage],
            settled_after: float | None, final_status: dict) -> tuple[str, bool]:
    s = soak.stats
    v = Verdict()
    out: list[str] = []
    add = out.append
    windows = soak.windows
    started = datetime.fromtimestamp(soak.t0, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    add(f"soak: {soak.args.duration:.0f} s of load from {started}; {len(soak.modules)} modules"
        + (f" ({OVERFLOW} overflowing)" if soak.args.limits else "") + ", "
        f"destination change every {soak.args.churn_interval:g} s, "
        f"wrong passwords {soak.args.neighbour_rate:g}/s; {versions}")

    runs = sum(s.restic_runs.values())
    by_op = ", ".join(f"{op} {n}" for op, n in sorted(s.restic_runs.items()))
    add(f"restic runs: {runs} ({by_op})")
    add(f"restic runs failed: {len(s.restic_failures)}   must be 0: "
        f"{v.must('restic runs failed = 0', runs > 0 and not s.restic_failures)}")
    for t, what, path, code, tail in s.restic_failures[:10]:
        add(f"  at {clock(t)} restic {what} ({path}) exit {code}:")
        add("    " + tail.replace("\n", "\n    "))
    add(f"restores compared byte for byte: {s.restores_compared}, mismatches "
        f"{len(s.restore_mismatches)}   must be 0: "
        f"{v.must('restored bytes equal', s.restores_compared > 0 and not s.restore_mismatches)}")
    for line in s.restore_mismatches[:5]:
        add(f"  {line}")

    # fault windows
    for kind, label in (("kill", "SIGKILL"), ("stop", "SIGSTOP")):
        w = next((w for w in windows if w.what == kind), None)
        if w is None:
            add(f"{kind} window: none (the run ended first or no child to signal)")
            continue
        if w.recovered is None:
            state = "never running again" if kind == "kill" else "never replaced"
            add(f"{kind} window: {label} to {w.backend} pid {w.pid} (generation "
                f"{w.generation}) at {clock(w.start)}; {state} within "
                f"{w.deadline - w.start:.0f} s "
                f"({v.must(f'{kind}: {w.backend} recovered', False)})")
        else:
            took = w.recovered - w.start
            recovered = "running again" if kind == "kill" else "replaced by the watchdog"
            add(f"{kind} window: {label} to {w.backend} pid {w.pid} (generation "
                f"{w.generation}) at {clock(w.start)}; {recovered} (pid {w.new_pid}) after "
                f"{took:.1f} s; window {clock(w.start)}-{clock(w.end)} "
                f"({w.end - w.start:.1f} s)   {v.must(f'{kind}: {w.backend} recovered', True)}")
        if kind == "stop":
            add(f"  stopped child pid {w.pid} gone after the run: "
                f"{'yes' if w.gone else 'NO'}   must: "
                f"{v.must('stopped child killed', bool(w.gone))}")

    # the access log
    # from the moment the gateway was ready (before, /health answers 503 by design)
    entries = [e for e in access_lines(log_text) if parse_time(e["time"]) >= soak.ready_at]
    classes = Counter(f"{e['status'] // 100}xx" for e in entries if isinstance(e["status"], int))
    by_class = ", ".join(f"{k} {n}" for k, n in sorted(classes.items()))
    add(f"access log: {len(entries)} requests ({by_class})")
    own_out, own_in, passed_on = [], [], []
    overflow_users = {m.user for m in soak.modules if m.overflow}
    for e in entries:
        status = e.get("status")
        if not isinstance(status, int) or status < 500:
            continue
        if status == 507 and e.get("user") in overflow_users and e.get("reason") == QUOTA_REASON:
            continue  # expected: counted with the overflowing module below
        end = parse_time(e["time"])
        start = end - float(e.get("duration_ms", 0)) / 1000
        if e.get("answered_by") == "gateway":
            (own_in if in_windows(start, end, windows) else own_out).append(e)
        else:
            passed_on.append(e)

    def breakdown(items: list[dict]) -> str:
        c = Counter(f"{e['status']} {e.get('method', '-')} {e.get('backend', '-')}"
                    f" ({e.get('reason') or '-'})" for e in items)
        return "; ".join(f"{n} x {k}" for k, n in c.most_common(6))

    add(f"5xx answered by the gateway itself (but the overflowing module's 507s), outside "
        f"the windows: {len(own_out)}   must be 0: "
        f"{v.must('gateway 5xx outside windows = 0', not own_out)}")
    if own_out:
        add(f"  {breakdown(own_out)}")
        for e in own_out[:6]:
            add(f"  {short(e)}")
    add(f"5xx answered by the gateway itself, inside the windows: {len(own_in)}"
        + (f" ({breakdown(own_in)})" if own_in else ""))
    add(f"5xx passed on from a backend: {len(passed_on)}"
        + (f" ({breakdown(passed_on)})" if passed_on else ""))

    # the soak's own requests
    node_calls = list(s.calls)
    bad_out = [c for c in node_calls if not c.ok and not in_windows(c.start, c.end, windows)]
    bad_in = [c for c in node_calls if not c.ok and in_windows(c.start, c.end, windows)]
    add(f"node WebDAV requests: {len(node_calls)}; not as expected outside the windows "
        f"{len(bad_out)}   must be 0: {v.must('node WebDAV as expected', not bad_out)}; "
        f"inside {len(bad_in)}")
    for c in bad_out[:8]:
        add(f"  at {clock(c.start)}-{clock(c.end)} {c.what}: {c.status} {c.detail[:160]!r}")
    locked_out = [c for c in node_calls if c.status in (401, 429)]
    add(f"node requests refused with the right password (401/429): {len(locked_out)}   must be 0: "
        f"{v.must('node never locked out', not locked_out)}")
    neighbour_total = sum(s.neighbour.values())
    odd = {k: n for k, n in s.neighbour.items() if k not in (401, 429)}
    add(f"wrong-password requests as node/1: {neighbour_total} "
        f"({', '.join(f'{k}: {n}' for k, n in sorted(s.neighbour.items()))}); other than "
        f"401/429: {sum(odd.values())}   must be 0: {v.must('neighbour refused', not odd)}")

    if soak.links is not None:
        slow_links_summary(soak, v, add)
    if soak.args.limits:
        limits_summary(soak, v, add, entries, metrics, final_status)
    else:
        add("limits: none (--no-limits): no quota, no bandwidth limit, no overflowing module")
    usage_summary(soak, v, add, usage, settled_after, log_text)

    # destinations and backends
    reloads = final_health.get("reloads", "?")
    vis = s.dest_visible_after
    vis_text = (f"a new generation served it {min(vis):.1f}-{max(vis):.1f} s after the event "
                f"(median {sorted(vis)[len(vis) // 2]:.1f} s)") if vis else "never served"
    add(f"destination changes: {s.dest_adds + s.dest_removes} ({s.dest_adds} adds, "
        f"{s.dest_removes} removes), {vis_text}; not within 30 s: {s.dest_not_visible}; "
        f"backend generations started (reloads): {reloads}")
    backends = final_health.get("backends", {})
    replaced_health = sum(b.get("replacements", 0) for b in backends.values())
    replaced_metrics = metric_sum(metrics, "rclone_gateway_backend_replacements_total")
    restarts_log = len(re.findall(r"exited with .*; restarting", log_text))
    restarts_health = sum(b.get("restarts", 0) for b in backends.values())
    restarts_metrics = metric_sum(metrics, "rclone_gateway_backend_restarts_total")
    per_kind = ", ".join(f"{k} {b.get('replacements', 0)}" for k, b in sorted(backends.items()))
    add(f"children replaced: /health {replaced_health} ({per_kind}), metrics "
        f"rclone_gateway_backend_replacements_total {replaced_metrics:g}")
    add(f"children restarted after exiting: {restarts_log} (log lines); current generation: "
        f"/health {restarts_health}, metrics rclone_gateway_backend_restarts_total "
        f"{restarts_metrics:g}")
    add(f"final /health status: {final_health.get('status', '?')}; /health not 200 during the "
        f"run: {len(s.health_not_200)} times"
        + (f" (first at {clock(s.health_not_200[0][0])}: {s.health_not_200[0][1]})"
           if s.health_not_200 else ""))

    warnings = log_warnings(log_text)
    add(f"gateway log warnings and errors: {sum(warnings.values())}")
    for text, n in warnings.most_common(8):
        add(f"  {n} x {text[:150]}")

    # idle
    parts = []
    all_idle = bool(idle)
    for kind, pid in sorted(idle_pids.items()):
        value = idle.get(kind)
        ok = value is not None and value < IDLE_CPU_LIMIT
        all_idle = all_idle and ok
        parts.append(f"{kind} (pid {pid}) " + ("gone" if value is None else f"{value:.4f}"))
    add(f"idle CPU of each child, s/s over {soak.args.idle_seconds:g} s: {'; '.join(parts)}"
        f"   must be < {IDLE_CPU_LIMIT}: {v.must('children idle', all_idle)}")
    if gateway_idle is not None:
        add(f"idle CPU of the gateway itself: {gateway_idle:.4f} s/s")
    add(f"rclone processes under the gateway after the load: {len(children_after)} "
        f"(at most {s.max_rclone_children} during the run)")
    add(f"gateway memory: peak VmHWM {vm_hwm_kb / 1024:.1f} MiB, VmRSS at the end "
        f"{vm_rss_kb / 1024:.1f} MiB (largest RSS sampled during the run "
        f"{s.max_gateway_rss_kb / 1024:.1f} MiB)   must be < {MEMORY_BOUND_MIB} MiB: "
        f"{v.must('gateway peak memory', 0 < vm_hwm_kb < MEMORY_BOUND_MIB * 1024)}")
    clean = stop_code == 0 and not left_behind
    add(f"gateway stop (SIGTERM): exit {stop_code}, children left behind "
        f"{left_behind or 'none'}   must: {v.must('clean gateway stop', clean)}")
    if s.worker_errors:
        add(f"soak workers that crashed: {len(s.worker_errors)}   must be 0: "
            f"{v.must('no crashed worker', False)}")
        for err in s.worker_errors[:3]:
            add("  " + err.strip().replace("\n", "\n  "))
    failed = [what for what, ok in v.musts if not ok]
    add("result: PASS" if v.passed else f"result: FAIL ({'; '.join(failed)})")
    return "\n".join(out), v.passed


def slow_links_summary(soak: Soak, v: Verdict, add: Callable[[str], None]) -> None:
    links = soak.links
    assert links is not None
    s = soak.stats
    minutes = max(soak.t_end - soak.t0, 1.0) / 60
    s3 = links.remote_links[DEST_S3]
    sftp = links.remote_links[DEST_SFTP]
    add(f"remote storage (latency {soak.args.remote_latency * 1000:.0f} ms added): the S3 "
        f"server saw {s3.request_count()} requests ({s3.request_count() / minutes:.0f} a "
        f"minute under load), the SFTP server {sftp.connections} connections")
    slow = [m for m in soak.modules if m.slow_link]
    add(f"slow link: {', '.join(m.name for m in slow) or 'no module'} through a proxy of "
        f"{soak.args.slow_link_rate / 1e6:g} MB/s and {soak.args.slow_link_latency * 1000:.0f}"
        f" ms; its requests: {links.client_link.request_count()}")
    uploads = s.slow_uploads  # each between the fault windows: see node_slow_upload_loop
    bad = [u for u in uploads if not (u[3] in (201, 204) and u[4])]
    took = [u[1] - u[0] for u in uploads if u[3] in (201, 204)]
    took_text = f", {min(took):.0f}-{max(took):.0f} s each" if took else ""
    add(f"node's cluster backups of {soak.args.slow_upload_size / MiB:.0f} MiB at "
        f"{soak.args.slow_upload_rate / 1e6:g} MB/s, between the fault windows: "
        f"{len(uploads)}{took_text}; not stored and read back equal: {len(bad)}   must be 0: "
        f"{v.must('slow cluster backups stored', bool(uploads) and not bad)}")
    for start, end, dest, status, _ in bad[:4]:
        add(f"  at {clock(start)}-{clock(end)} PUT to {dest}: {status}")


def metric_value(metrics: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in metrics.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if all(f'{k}="{val}"' in line for k, val in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def upload_bins(entries: list[dict]) -> Counter:
    """Bytes of request bodies per second of wall clock: each request's `bytes_in` spread
    evenly over its duration (the access log has no finer account)."""
    bins: Counter = Counter()
    for e in entries:
        size = e.get("bytes_in") or 0
        if not isinstance(size, int) or size <= 0:
            continue
        end = parse_time(e["time"])
        took = max(float(e.get("duration_ms", 0)) / 1000, 1e-3)
        t = end - took
        while t < end:
            step = min(float(int(t) + 1), end)
            bins[int(t)] += size * (step - t) / took
            t = step
    return bins


def rate_text(rate: float | None) -> str:
    return "-" if rate is None else f"{rate / MiB:.1f} MiB/s"


def limits_summary(soak: Soak, v: Verdict, add: Callable[[str], None], entries: list[dict],
                   metrics: str, final_status: dict) -> None:
    s, args = soak.stats, soak.args
    overflow = next(m for m in soak.modules if m.overflow)
    changes = list(s.bw_changes)
    values = Counter(c.value for c in changes[1:])
    add(f"limits: upload {args.upload_limit} for the whole gateway (changed {len(changes) - 1} "
        f"times: {', '.join(f'{k} x{n}' for k, n in values.items()) or 'never'}); `*` quota "
        f"{args.quota} on both module destinations, {overflow.name}'s {args.overflow_quota}; "
        f"module cap 8 (the default, no concurrency key)")

    # the overflowing module
    refused_runs = s.overflow_refused
    first = (f", the first begun at +{refused_runs[0][0] - soak.t0:.0f} s, each after "
             f"{min(b - a for a, b, _, _ in refused_runs):.0f}-"
             f"{max(b - a for a, b, _, _ in refused_runs):.0f} s") if refused_runs else ""
    add(f"overflowing module {overflow.name}: backups {s.overflow_ok} ok, {len(refused_runs)} "
        f"failed on 507 as expected{first}   must be >= 1: "
        f"{v.must('overflowing module refused (507)', bool(refused_runs))}")
    e507 = [e for e in entries if e.get("status") == 507]
    mine = [e for e in e507 if e.get("user") == overflow.user]
    others = [e for e in e507 if e.get("user") != overflow.user]
    with_body = [e for e in mine if e.get("bytes_in")]
    kinds = Counter(e.get("path", "").split("/")[-2] for e in mine)
    add(f"  507 answers: {len(mine)} to {overflow.name} "
        f"({', '.join(f'{k} {n}' for k, n in kinds.most_common()) or 'none'}), read of their "
        f"body: {len(with_body)}   must be 0: {v.must('507 before the body', not with_body)}; "
        f"to anyone else: {len(others)}   must be 0: "
        f"{v.must('no 507 but the overflowing module', not others)}")
    for e in others[:4]:
        add(f"    {short(e)}")
    add(f"  its last good snapshot restored and compared after a refused backup: "
        f"{s.overflow_restores} times   must be >= 1: "
        f"{v.must('overflowing module restores', s.overflow_restores > 0 or not refused_runs)}")
    repo = soak.repo_dir(overflow)
    answered = {e.get("path") for e in entries
                if e.get("method") == "POST" and 200 <= e.get("status", 0) < 300}
    on_disk_refused = []
    for e in mine:
        kind, object_id = e.get("path", "").split("/")[-2:]
        where = repo / kind / (f"{object_id[:2]}/{object_id}" if kind == "data" else object_id)
        if where.exists() and e.get("path") not in answered:
            on_disk_refused.append(e)
    files = disk_files(repo)
    unanswered = []
    for path in files:
        parts = list(path.relative_to(repo).parts)
        if len(parts) == 3 and parts[0] == "data":
            del parts[1]  # the fan-out directory
        if f"{overflow.path}/{'/'.join(parts)}" not in answered:
            unanswered.append(path)
    add(f"  refused objects on disk after the run (and never answered 2xx since): "
        f"{len(on_disk_refused)} of {len({e.get('path') for e in mine})}   must be 0: "
        f"{v.must('refused objects not stored', not on_disk_refused)}; files on disk never "
        f"answered 2xx to a POST: {len(unanswered)} of {len(files)}   must be 0: "
        f"{v.must('only answered uploads stored', not unanswered)}")
    for e in on_disk_refused[:3]:
        add(f"    {short(e)}")
    for path in unanswered[:3]:
        add(f"    {path.relative_to(repo)}")
    # The quota holds the module's uploads; the node's (retention) are never refused.
    quota = parse_size(args.overflow_quota)
    by_node = sum(e.get("bytes_in") or 0 for e in entries
                  if str(e.get("user", "")).startswith("node/") and e.get("method") == "POST"
                  and 200 <= e.get("status", 0) < 300
                  and str(e.get("path", "")).startswith(overflow.path + "/"))
    most, when = s.overflow_disk_max
    end_disk = sum(files.values())
    within = max(most, end_disk) <= quota + by_node
    add(f"  {overflow.name} on disk: at most {most} bytes ({100 * most / quota:.0f} % of "
        f"{format_size(quota)}, sampled every second, at +{when - soak.t0:.0f} s), {end_disk} "
        f"at the end; uploaded by the node, never refused: {by_node}   must be <= quota + "
        f"the node's: {v.must('overflowing repository within its quota', within)}")
    crossings = {level: metric_value(metrics, "rclone_gateway_quota_crossings_total",
                                     level=level) for level in ("80", "100")}
    add(f"  quota crossings (rclone_gateway_quota_crossings_total): 80 % {crossings['80']:g}, "
        f"100 % {crossings['100']:g}; the node's retention on it (forget --prune, check): "
        f"{s.overflow_retention} runs, {s.retention_skipped} turns skipped while a refused "
        f"backup retried")
    node_refused = [e for e in entries if str(e.get("user", "")).startswith("node/")
                    and (e.get("status") == 507 or e.get("reason") == IN_FLIGHT_REASON)]
    add(f"node requests refused by a limit (507, 503 over a cap): {len(node_refused)}   must be 0: "
        f"{v.must('node never refused by a limit', not node_refused)}")

    # requests in flight
    over_cap = [e for e in entries
                if e.get("status") == 503 and e.get("reason") == IN_FLIGHT_REASON]
    by_user = Counter(e.get("user") for e in over_cap)
    concurrency = final_status.get("limits", {}).get("concurrency", {})
    refused_metric = metric_sum(metrics, "rclone_gateway_concurrency_refused_total")
    add(f"503 over a cap ({IN_FLIGHT_REASON!r}): {len(over_cap)} in the access log"
        + (f" ({', '.join(f'{u} {n}' for u, n in by_user.most_common())})" if by_user else "")
        + f"; /status refused {concurrency.get('refused', '?')}, metrics "
        f"rclone_gateway_concurrency_refused_total {refused_metric:g}   must be 0: "
        f"{v.must('no 503 over the default cap', not over_cap and not refused_metric)}")
    seen = ", ".join(f"{u} {n}" for u, n in sorted(s.max_in_flight.items())) or "none"
    left = concurrency.get("in_flight")
    add(f"requests in flight per user, most seen in /status ({s.status_samples} samples, every "
        f"2 s): {seen}; after the load: {left if left else 'none'}   must be none: "
        f"{v.must('nothing left counted in flight', left == {})}")

    # the upload limit and its changes
    moves = changes[1:]
    if moves:
        applied = [c.applied - c.at for c in moves if c.applied is not None]
        late = [c for c in moves if c.applied is None]
        ok = not late and min(c.backups for c in moves) > 0
        add(f"upload limit changes: {len(moves)} (at +"
            f"{', +'.join(f'{c.at - soak.t0:.0f} s {c.value}' for c in moves)}), written with "
            f"{min(c.backups for c in moves)}-{max(c.backups for c in moves)} backups and "
            f"{min(c.requests for c in moves)}-{max(c.requests for c in moves)} requests in "
            f"flight; /status gave the new rate "
            + (f"{min(applied):.2f}-{max(applied):.2f} s later" if applied else "never")
            + f"   must (within {APPLY_TIMEOUT:.0f} s, with a backup in flight): "
            f"{v.must('upload limit changes applied', ok)}")
    else:
        add("upload limit changes: none (the run ended first)")
    bins = upload_bins(entries)
    add("upload through the gateway (each request's bytes_in spread over its duration, "
        "1-s bins; uploads of >= 1 MiB: each one's own rate):")
    by_value: dict[str, list[BwChange]] = {}
    for c in changes:
        by_value.setdefault(c.value, []).append(c)
    for value, spans in by_value.items():
        rate = spans[0].rate
        seconds, peak1, peak5, total = 0, 0.0, 0.0, 0.0
        per_request: list[float] = []
        for c in spans:
            lo, hi = int(c.since) + 1, int(c.end or soak.t_end) - 1  # whole seconds inside
            if hi <= lo:
                continue
            series = [bins.get(k, 0.0) for k in range(lo, hi)]
            seconds += len(series)
            total += sum(series)
            peak1 = max(peak1, max(series))
            for k in range(len(series) - 4):
                peak5 = max(peak5, sum(series[k:k + 5]) / 5)
            for e in entries:
                size = e.get("bytes_in") or 0
                if size < MiB:
                    continue
                end = parse_time(e["time"])
                took = float(e.get("duration_ms", 0)) / 1000
                if lo <= end - took and end <= hi and took > 0:
                    per_request.append(size / took)
        if not seconds:
            continue
        per_request.sort()
        median = per_request[len(per_request) // 2] if per_request else None
        label = "off" if rate is None else f"under {value} ({rate_text(rate)})"
        line = (f"  {label}, {seconds} s: peak over 5 s {rate_text(peak5)}, over 1 s "
                f"{rate_text(peak1)}, mean {rate_text(total / seconds)}; {len(per_request)} "
                f"uploads of >= 1 MiB at a median {rate_text(median)} each")
        if rate is not None:
            within = peak5 <= RATE_MARGIN * rate
            line += (f"   must peak 5 s <= {RATE_MARGIN:g} x limit: "
                     f"{v.must(f'upload under {value} within its limit', within)}")
        add(line)
    waited = metric_value(metrics, "rclone_gateway_bandwidth_wait_seconds_total",
                          direction="upload", scope="gateway")
    add(f"  streams waited for the gateway's upload limit {waited:.1f} s in all "
        f"(rclone_gateway_bandwidth_wait_seconds_total)   must be > 0 (it shaped): "
        f"{v.must('the upload limit shaped the traffic', waited > 0)}")


def clock_seconds(text: str, near: float) -> float:
    """A log line's local `HH:MM:SS,mmm` as a timestamp, on the day of `near`."""
    day = datetime.fromtimestamp(near).strftime("%Y-%m-%d")
    return datetime.strptime(f"{day} {text}", "%Y-%m-%d %H:%M:%S,%f").timestamp()


def usage_summary(soak: Soak, v: Verdict, add: Callable[[str], None], usage: list[RepoUsage],
                  settled_after: float | None, log_text: str) -> None:
    scans = [(m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))
             for m in re.finditer(r"^\S+ (\S+) INFO \S+ storage scan: (\d+) repositories in "
                                  r"(\d+) of (\d+) destinations", log_text, re.M)]
    during = [(n, listed, served) for t, n, listed, served in scans
              if soak.t0 <= clock_seconds(t, soak.t0) <= soak.t_end]
    found = [n for n, _, _ in during]
    add(f"full storage scans during the load: {len(during)}, finding "
        + (f"{min(found)}-{max(found)} of the {len(soak.modules)} repositories; "
           f"with a destination whose listing failed (its figures kept): "
           f"{sum(1 for _, listed, served in during if listed < served)}" if during else "-"))
    settled = (f"settled after {settled_after:.1f} s" if settled_after is not None
               else f"NOT settled within {SETTLE_TIMEOUT:.0f} s")
    add(f"quota count after the load (POST /status, then /status until used_bytes = bytes on "
        f"disk, nothing reserved): {settled}   must: "
        f"{v.must('used_bytes = bytes on disk', settled_after is not None)}")
    for row in usage:
        share = (f" of {format_size(row.quota)} ({100 * row.disk / row.quota:.0f} %, level "
                 f"{row.level})") if row.quota else " (no quota)"
        sign = "=" if row.used == row.disk else "!="
        add(f"  {row.module}: used_bytes {row.used} {sign} {row.disk} on disk{share}"
            + (f", reserved {row.reserved}" if row.reserved else ""))


# --------------------------------------------------------------------------- main


def seed_limits(cluster: Cluster, args: argparse.Namespace, modules: list[Module]) -> None:
    """The limits as the cluster sets them: a `*` quota on both module destinations, the
    overflowing module's own small one, and the gateway's `upload` limit. No concurrency
    key: the default cap of 8 per module is what is measured."""
    pipe = cluster.r.pipeline(transaction=True)
    for dest in sorted({m.dest for m in modules}):
        fields = {"*": args.quota}
        fields.update({m.name: args.overflow_quota for m in modules
                       if m.overflow and m.dest == dest})
        pipe.hset(QUOTA_KEY + dest, mapping=fields)
    pipe.hset(BWLIMIT_KEY, "upload", args.upload_limit)
    pipe.execute()
    cluster.publish(LIMITS_CHANGED)


def seed_cluster(cluster: Cluster, modules: list[Module], remote_dir: Path) -> None:
    cluster.flush()
    cluster.add_user(*NODE)
    for module in modules:
        cluster.add_user(module.user, module.password)
        cluster.set_module(module.name, module.uuid)
    cluster.set_node_vpn(1, NODE_VPN_IP)
    cluster.set_network("10.5.4.0/24")
    cluster.set_leader(1)
    cluster.add_destination(DEST_LOCAL, provider="cluster", url=f"webdav:http://{NODE_VPN_IP}:4694",
                            name="soak-local")
    cluster.add_destination(DEST_REMOTE, provider="rclone", url="rclone:local",
                            name="soak-remote", basepath=str(remote_dir),
                            rclone_conf=f"[{DEST_REMOTE}]\ntype = local\n")


def versions(rclone: str, restic: str, overflow_restic: str) -> str:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        except OSError:
            return "?"
        return (out.splitlines() or ["?"])[0].strip()

    text = f"{first_line([rclone, 'version'])}; {first_line([restic, 'version'])}"
    if overflow_restic != restic:
        text += f"; {OVERFLOW}: {first_line([overflow_restic, 'version'])}"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180.0,
                        help="seconds of load (default 180)")
    parser.add_argument("--modules", type=int, default=4, help="module users (default 4)")
    parser.add_argument("--churn-interval", type=float, default=6.0,
                        help="seconds between two changes of the destination set (default 6)")
    parser.add_argument("--neighbour-rate", type=float, default=4.0,
                        help="wrong-password requests per second (default 4)")
    parser.add_argument("--restore-every", type=int, default=3,
                        help="each module restores and compares after every Nth backup")
    parser.add_argument("--kill-backend", choices=BACKENDS, default="restic",
                        help="child killed at a third of the run (default restic)")
    parser.add_argument("--stop-backend", choices=BACKENDS, default="webdav",
                        help="child stopped at two thirds of the run (default webdav)")
    parser.add_argument("--idle-seconds", type=float, default=5.0,
                        help="seconds over which the idle children's CPU is measured")
    parser.add_argument("--no-limits", dest="limits", action="store_false",
                        help="no quotas, no bandwidth limit, no overflowing module")
    parser.add_argument("--upload-limit", default="8M",
                        help="the gateway's `upload` bandwidth limit (default 8M)")
    parser.add_argument("--upload-limit-high", default="32M",
                        help="the higher value it is changed to for a while (default 32M)")
    parser.add_argument("--bwlimit-interval", type=float, default=15.0,
                        help="seconds `off` or the higher value stay, twice that the limit "
                             "(default 15)")
    parser.add_argument("--quota", default="1G",
                        help="the `*` quota of both module destinations (default 1G)")
    parser.add_argument("--overflow-quota", default="5M",
                        help="the overflowing module's quota (default 5M: four rounds fit, "
                             "past 80 %%, the fifth is refused)")
    parser.add_argument("--overflow-file", type=int, default=MiB,
                        help="bytes of new random data it backs up each round (default 1 MiB)")
    parser.add_argument("--no-slow-links", dest="slow_links", action="store_false",
                        help="no S3 and SFTP destinations, no slow link, no 1 MB/s upload")
    parser.add_argument("--remote-latency", type=float, default=0.02,
                        help="seconds added to each piece of data to the remote storage")
    parser.add_argument("--slow-link-rate", type=float, default=2e6,
                        help="bytes/s of the slow-link module's link (default 2e6)")
    parser.add_argument("--slow-link-latency", type=float, default=0.05,
                        help="seconds of latency on that link (default 0.05)")
    parser.add_argument("--slow-upload-size", type=int, default=40 * MiB,
                        help="bytes of the node's cluster backup sent at 1 MB/s (40 MiB)")
    parser.add_argument("--slow-upload-rate", type=float, default=1e6,
                        help="bytes/s the node sends it at (default 1e6)")
    newest_restic = ROOT / ".venv" / "bin" / "restic-0.18"
    parser.add_argument("--restic", default=str(newest_restic) if newest_restic.exists()
                        else shutil.which("restic") or "restic",
                        help="the restic client (default: 0.18, the one the cluster ships, "
                             "where `make bootstrap` put it)")
    parser.add_argument("--overflow-restic", default=shutil.which("restic") or "restic",
                        help="the overflowing module's restic (default: the system's 0.14; "
                             "0.18.0 retries a 507 for 15 minutes, 0.18.1 gives up at once)")
    parser.add_argument("--seed", type=int, default=4694)
    parser.add_argument("--summary", type=Path, default=ROOT / "var" / "soak-summary.txt",
                        help="where to write the summary ('-': nowhere)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.duration < 30:
        parser.error("--duration: at least 30 seconds")
    if args.modules < (4 if args.slow_links else 2):
        parser.error("--modules: at least 2, 4 with the slow links")
    for option in ("upload_limit", "upload_limit_high", "quota", "overflow_quota"):
        try:
            (parse_rate if option.startswith("upload") else parse_size)(getattr(args, option))
        except BadValue as exc:
            parser.error(f"--{option.replace('_', '-')}: {exc}")
    for tool in (args.restic, args.overflow_restic, "redis-server"):
        if not shutil.which(tool):
            raise SystemExit(f"soak: {tool} is needed (run `make bootstrap`)")
    rclone = str(Path(sys.executable).parent / "rclone")

    # SIGTERM (and SIGHUP) end the run like Ctrl-C: everything started is stopped
    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)

    (ROOT / "var").mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="soak-", dir=ROOT / "var"))
    remote_dir = workdir / "remote-storage"
    extra_dir = workdir / "extra-storage"
    remote_dir.mkdir()
    extra_dir.mkdir()
    rng = random.Random(args.seed)

    def uuid4() -> str:
        h = f"{rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:]}"

    def destination_of(i: int) -> str:
        if i == args.modules:
            return DEST_REMOTE
        if args.slow_links and i == args.modules - 1:
            return DEST_SFTP
        if args.slow_links and i == args.modules - 2:
            return DEST_S3
        return DEST_LOCAL

    modules = [Module(f"soak{i}", uuid4(), f"soak{i}-secret-{rng.getrandbits(32):08x}",
                      destination_of(i), slow_link=args.slow_links and i == 1)
               for i in range(1, args.modules + 1)]
    if args.limits:
        modules.append(Module(OVERFLOW, uuid4(), f"{OVERFLOW}-secret-{rng.getrandbits(32):08x}",
                              DEST_LOCAL, overflow=True))
    redis_server: RedisServer | None = None
    gateway: GatewayProcess | None = None
    soak: Soak | None = None
    links: SlowLinks | None = None
    threads: list[threading.Thread] = []
    code = 1
    try:
        redis_server = RedisServer(workdir / "redis")
        cluster = Cluster(redis_server.client())
        seed_cluster(cluster, modules, remote_dir)
        gateway_port = free_port()
        if args.slow_links:
            links = SlowLinks.start(args, workdir, cluster, gateway_port)
        if args.limits:
            seed_limits(cluster, args, modules)
        gateway = GatewayProcess.start(redis_server.url, "1", workdir / "gateway",
                                       port=gateway_port, extra_args=LIVENESS)
        say(f"soak: gateway pid {gateway.pid} on {gateway.url}, redis on port "
            f"{redis_server.port}, work dir {workdir}")
        soak = Soak(args, workdir, gateway, cluster, modules, remote_dir, extra_dir, links)
        soak.init_repositories()
        if args.limits:
            soak.wait_limits_in_force()
            soak.stats.bw_changes.append(BwChange(soak.ready_at, args.upload_limit,
                                                  parse_rate(args.upload_limit),
                                                  applied=soak.ready_at))
        say(f"soak: {len(modules)} repositories initialised; {args.duration:.0f} s of load"
            + (f"; upload limit {args.upload_limit}, quota of {OVERFLOW} "
               f"{args.overflow_quota}" if args.limits else "; no limits"))
        threads = soak.run()
        for thread in threads:
            thread.join(timeout=max(1.0, soak.t_end + 600 - time.time()))
        still = [t.name for t in threads if t.is_alive()]
        if still:
            raise RuntimeError(f"workers still running 10 minutes after the end: {still}")

        say("soak: load stopped; a listing of the storage, until the gateway's count of "
            "each repository is its bytes on disk")
        usage, settled_after = soak.settle_usage()
        say("soak: " + (f"settled after {settled_after:.1f} s" if settled_after is not None
                        else f"not settled within {SETTLE_TIMEOUT:.0f} s"))
        final_status = soak.status()
        say(f"soak: {args.idle_seconds:g} s of quiet, then the idle CPU")
        time.sleep(5)
        health = soak.health()
        idle_pids = {kind: b["pid"] for kind, b in health.get("backends", {}).items()
                     if b.get("pid")}
        idle_pids_all = {**idle_pids, "gateway": gateway.pid}
        cpu = idle_cpu(idle_pids_all, args.idle_seconds)
        gateway_idle = cpu.pop("gateway")
        stop_window = next((w for w in soak.windows if w.what == "stop"), None)
        if stop_window is not None:
            deadline = time.monotonic() + 60
            while not gone(stop_window.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            stop_window.gone = gone(stop_window.pid)
        final_health = soak.health()
        metrics = soak.metrics()
        children_after = children_of(gateway.pid)
        vm_hwm, vm_rss = vm_kb(gateway.pid, "VmHWM"), vm_kb(gateway.pid, "VmRSS")
        if stop_window is not None and not stop_window.gone:
            with contextlib.suppress(OSError):  # a child of our gateway: let it die with it
                os.kill(stop_window.pid, signal.SIGCONT)
        stop_code = gateway.stop()
        left = gateway.kill_leftovers()
        log_text = gateway.log_text()
        (ROOT / "var" / "soak-gateway.log").write_text(log_text)
        text, passed = summary(
            soak, final_health=final_health, metrics=metrics, idle=cpu, idle_pids=idle_pids,
            gateway_idle=gateway_idle, vm_hwm_kb=vm_hwm, vm_rss_kb=vm_rss,
            children_after=children_after, stop_code=stop_code, left_behind=left,
            log_text=log_text, usage=usage,
            versions=versions(rclone, args.restic, args.overflow_restic),
            settled_after=settled_after, final_status=final_status)
        print(text, flush=True)
        if str(args.summary) != "-":
            args.summary.parent.mkdir(parents=True, exist_ok=True)
            args.summary.write_text(text + "\n")
            say(f"soak: wrote {args.summary} and {ROOT / 'var' / 'soak-gateway.log'}")
        code = 0 if passed else 1
    except KeyboardInterrupt as exc:
        say(f"soak: interrupted ({str(exc) or 'Ctrl-C'}); stopping everything")
        code = 130
    finally:
        if soak is not None:
            soak.aborted = soak.aborted or code == 130
            soak.stop.set()
            soak.kill_restics()
            for thread in threads:
                thread.join(timeout=5)
        if gateway is not None:
            if gateway.proc is not None and gateway.proc.poll() is None:
                gateway.stop(timeout=10)
            gateway.kill_leftovers()
            if code not in (0, 1):
                with contextlib.suppress(OSError):
                    (ROOT / "var" / "soak-gateway.log").write_text(gateway.log_text())
        if links is not None:
            links.stop()
        if redis_server is not None:
            redis_server.stop()
        if args.keep:
            say(f"soak: work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
