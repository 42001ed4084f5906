"""`make bench`: the gateway against rclone alone (and HAProxy where installed).

Starts its own redis-server, the gateway (with its rclone children), and
`rclone serve restic` + `rclone serve webdav` on TCP over the same storage
directory as the baseline. Every measurement runs the targets one after the
other, in alternating order from round to round; each round gives one paired
ratio per target, and the table shows medians. Writes docs/performance.md.

    make bench                          # about 10 minutes on 2 idle cores
    make bench BENCH_ARGS=--quick       # smaller data, shorter runs
    make bench BENCH_ARGS="--only get --output -"   # one measure, nothing written
    make bench BENCH_ARGS="--quick --only shaping --only switch --output -"

The limits (issue 13): a module's upload under its own bandwidth limit and a GET
under the gateway's (rate over limit), a limit removed and a schedule's slot
switching off mid-upload (time to full rate), and what the limit stages cost a
restic backup with no limit set (bench/limits_bench.py, bench/limit_checks_cost.py,
bench/gateway_without_limits.py).

Eight modules at once: eight module users, each with its own repository, run `restic
backup` of their own data at the same time, through the gateway, rclone alone and HAProxy
(the wall time to the last one done, the proxy's CPU per GiB and its peak RSS).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import limit_checks_cost  # noqa: E402
import limits_bench  # noqa: E402
from harness import (  # noqa: E402
    RESTIC_BINARIES,
    Cluster,
    GatewayProcess,
    RedisServer,
    basic,
    free_port,
)
from harness import restic as run_restic  # noqa: E402
from services import (  # noqa: E402
    Service,
    bare_proxy,
    haproxy,
    haproxy_config,
    rclone_restic,
    rclone_webdav,
)

from gateway.insight import scan  # noqa: E402

DEST = "0d2b7ab6-8f8b-4c43-a1d3-7f3f5f7c1a01"
NODE_VPN_IP = "10.5.4.1"
NODE = ("node/1", "bench-node-secret")
MODULE = ("module/bench1", "bench-module-secret")
MODULE_UUID = "5c1d6c1e-2f87-4e7b-9a34-0a1d9f9e4b01"
APP = "bench"
SMALL_REPO_UUID = "7e7e7e7e-0000-4000-8000-000000000001"
SMALL_ID = "ab" + "0" * 62
ACL_USER = "node/7"
REST_ACCEPT = "application/vnd.x.restic.rest.v2"
MiB = 1024 * 1024

GATEWAY, RCLONE, HAPROXY, BARE = "gateway", "rclone alone", "haproxy", "bare proxy"
# restic through the gateway as a node: the full backend, no check of uploaded objects.
GATEWAY_NODE = "gateway as node"
# bench/gateway_without_limits.py: the gateway without the three stages of the limits.
GATEWAY_NO_LIMITS = "gateway without limit stages"

SHAPED_LIMIT = "64M"  # rclone's units: 64 MiB/s
LOW_LIMIT = "8M"  # the limit that is switched off
SWITCH_MIB = 64  # the upload during which it is: 1.5 s (or 3 s) at 8M, the rest at full rate
MEASURES = ["restic", "parallel", "get", "put", "slow", "acl", "shaping", "switch",
            "schedule", "limits-cpu"]


@dataclass(frozen=True)
class Module:
    """A module as the cluster registers it: its ACL user, its uuid (cluster/module_uuid),
    and its repository /<destination>/<app>/<uuid>, the app its id without the digits."""

    id: str
    uuid: str

    @property
    def user(self) -> tuple[str, str]:
        return f"module/{self.id}", f"bench-{self.id}-secret"

    @property
    def app(self) -> str:
        return self.id.rstrip(string.digits)


# Eight modules of a cluster backing up at the same time, each into its own repository.
PARALLEL_MODULES = [
    Module(f"{app}1", f"5c1d6c1e-2f87-4e7b-9a34-0a1d9f9e4c{i:02d}")
    for i, app in enumerate(("mail", "nextcloud", "samba", "webtop", "roundcubemail",
                             "mattermost", "ejabberd", "nethvoice"), start=1)
]
PARALLEL = f"{len(PARALLEL_MODULES)} backups at once"  # the measure's name


@dataclass(frozen=True)
class Plan:
    restic_mib: int
    file_mib: int
    put_mib: int
    wrk_seconds: int
    rounds: int
    shaped_mib: int  # uploaded under SHAPED_LIMIT, then downloaded under it
    cpu_pairs: int  # restic backups with and without the limit stages, per round
    parallel_mib: int  # each of PARALLEL_MODULES backs up this much at the same time

    @property
    def small_put_mib(self) -> int:
        return max(self.put_mib // 8, 16)


FULL = Plan(restic_mib=512, file_mib=16, put_mib=1024, wrk_seconds=10, rounds=5,
            shaped_mib=512, cpu_pairs=2, parallel_mib=256)
QUICK = Plan(restic_mib=128, file_mib=16, put_mib=256, wrk_seconds=4, rounds=3,
             shaped_mib=256, cpu_pairs=2, parallel_mib=32)


@dataclass
class Target:
    """One way to reach the storage: its URLs and the credentials it wants."""

    name: str
    port: int
    webdav_port: int
    prefix: str
    authenticated: bool
    restic_user: tuple[str, str] = MODULE

    def restic_repo(self) -> str:
        return self.repo_of(self.restic_user, APP, MODULE_UUID)

    def repo_of(self, who: tuple[str, str], app: str, uuid: str) -> str:
        """The restic URL of the repository /<app>/<uuid> as `who` (where it authenticates)."""
        userinfo = ""
        if self.authenticated:
            user, password = who
            userinfo = user.replace("/", "%2F") + ":" + password + "@"
        return f"rest:http://{userinfo}127.0.0.1:{self.port}{self.prefix}/{app}/{uuid}/"

    def node_headers(self) -> dict[str, str]:
        return {"Authorization": basic(*NODE)} if self.authenticated else {}

    def small_object_url(self) -> str:
        path = f"{self.prefix}/{APP}/{SMALL_REPO_UUID}/data/{SMALL_ID}"
        return f"http://127.0.0.1:{self.port}{path}"

    def put_path(self, name: str) -> str:
        return f"{self.prefix}/bench-put/{name}"

    def put_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.webdav_port}{self.put_path(name)}"


@dataclass
class Results:
    """name of measure -> target -> one value per round."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, measure: str, target: str, value: float) -> None:
        self.values.setdefault(measure, {}).setdefault(target, []).append(value)

    def median(self, measure: str, target: str) -> float | None:
        runs = self.values.get(measure, {}).get(target)
        return statistics.median(runs) if runs else None

    def paired_ratio(self, measure: str, target: str, baseline: str) -> float | None:
        """Median over rounds of target/baseline, each ratio from the same round."""
        runs = self.values.get(measure, {})
        pairs = list(zip(runs.get(target, []), runs.get(baseline, []), strict=False))
        ratios = [a / b for a, b in pairs if b]
        return statistics.median(ratios) if ratios else None


# --------------------------------------------------------------------------- measures


# The restic client the bench runs: the one the cluster's images ship (0.18) where
# scripts/bootstrap.sh put it, else the machine's (--restic).
restic_client = "restic-0.18" if Path(RESTIC_BINARIES["restic-0.18"]).exists() else "restic-0.14"


def restic(repo_url: str, *args: str, timeout: float) -> object:
    return run_restic(repo_url, *args, timeout=timeout, binary=RESTIC_BINARIES[restic_client])


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def make_restic_data(directory: Path, plan: Plan, mib: int | None = None) -> Path:
    """`mib` (the plan's restic_mib by default) of incompressible data in files of file_mib."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range((mib or plan.restic_mib) // plan.file_mib):
        with open(directory / f"file{i:03d}.bin", "wb") as f:
            for _ in range(plan.file_mib):
                f.write(os.urandom(MiB))
    return directory


def restic_cycle(target: Target, data: Path, storage: Path, scratch: Path,
                 results: Results, proxy_pid: int | None, data_mib: int) -> None:
    """init, backup, restore, check into a new repository; the CPU of the proxy process in
    between (the gateway's, HAProxy's), if there is one, also per GiB of the data."""
    repo_dir = storage / APP / MODULE_UUID
    shutil.rmtree(repo_dir, ignore_errors=True)
    restore_dir = scratch / "restore"
    shutil.rmtree(restore_dir, ignore_errors=True)
    repo = target.restic_repo()
    steps = (
        ("init", ("init",)),
        ("backup", ("backup", "--host", "bench", str(data))),
        ("restore", ("restore", "latest", "--target", str(restore_dir))),
        ("check", ("check",)),
    )
    for step, args in steps:
        cpu_before = cpu_seconds(proxy_pid) if proxy_pid else 0.0
        seconds = timed(lambda args=args: restic(repo, *args, timeout=1800))
        results.add(f"restic {step}", target.name, seconds)
        if proxy_pid and step in ("backup", "restore"):
            used = cpu_seconds(proxy_pid) - cpu_before
            results.add(f"proxy CPU, restic {step}", target.name, used)
            results.add(f"proxy CPU per GiB, restic {step}", target.name,
                        used * 1024 / data_mib)
    restored = sum(p.stat().st_size for p in restore_dir.rglob("*") if p.is_file())
    expected = sum(p.stat().st_size for p in data.iterdir())
    if restored != expected:
        raise RuntimeError(f"{target.name}: restored {restored} bytes of {expected}")
    shutil.rmtree(restore_dir, ignore_errors=True)
    shutil.rmtree(repo_dir, ignore_errors=True)


def wrk(target: Target, seconds: int, results: Results | None) -> int:
    """Runs wrk against the small object; returns the number of requests answered."""
    headers = {**target.node_headers(), "Accept": REST_ACCEPT}
    argv = ["wrk", "-t2", "-c16", f"-d{seconds}s", "--timeout", "5s",
            "-s", str(ROOT / "bench" / "wrk_report.lua")]
    for key, value in headers.items():
        argv += ["-H", f"{key}: {value}"]
    argv.append(target.small_object_url())
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    match = re.search(r"^RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)$", out, re.M)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    requests, duration_us, p50, p99, bad_status, socket_errors = map(int, match.groups())
    if bad_status:
        raise RuntimeError(f"{target.name}: {bad_status} answers not 2xx in wrk:\n{out}")
    if socket_errors:
        say(f"  {target.name}: {socket_errors} socket errors or timeouts in wrk")
    if results is not None:
        results.add("small GET req/s", target.name, requests / (duration_us / 1e6))
        results.add("small GET p50 ms", target.name, p50 / 1000)
        results.add("small GET p99 ms", target.name, p99 / 1000)
    return requests


def sha256_seconds_per_gib() -> float:
    """CPU seconds SHA-256 alone takes per GiB here, in pieces of 256 KiB: the floor of a
    module's upload, which is hashed as it passes."""
    piece = os.urandom(256 * 1024)
    digest = hashlib.sha256()
    started = time.process_time()
    for _ in range(4 * 1024):  # 1 GiB
        digest.update(piece)
    return time.process_time() - started


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """Nanoseconds on a CPU of each live thread of a process (schedstat: exact, where
    utime + stime are counted in clock ticks of 10 ms)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return found


def cpu_since(pid: int, before: dict[int, int]) -> float:
    """CPU seconds the process's threads used since `before` (thread_cpu_ns). A thread
    that ended in between is counted up to `before` only: told, as it undercounts."""
    after = thread_cpu_ns(pid)
    gone = set(before) - set(after)
    if gone:
        say(f"  pid {pid}: {len(gone)} thread(s) ended during the measure; their last "
            "moments are not counted")
    return sum(ns - before.get(tid, 0) for tid, ns in after.items()) / 1e9


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mb(pid: int, field: str = "VmHWM") -> float:
    """The process's peak resident memory since the last reset (VmRSS: the resident now)."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match.group(1)) / 1024


def put(target: Target, source: Path, storage: Path, name: str) -> float:
    """Uploads `source` over WebDAV; returns MB/s (10^6 bytes)."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
            "-T", str(source), "-H", "Expect:"]
    if target.authenticated:
        argv += ["-u", f"{NODE[0]}:{NODE[1]}"]
    argv.append(target.put_url(name))
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    status, seconds = int(out[0]), float(out[1])
    stored = storage / "bench-put" / name
    size = source.stat().st_size
    if status not in (200, 201, 204) or stored.stat().st_size != size:
        raise RuntimeError(f"{target.name}: PUT answered {status}")
    return size / seconds / 1e6


def get_large(target: Target, storage: Path, name: str) -> float:
    """Downloads what `put` stored over WebDAV, and removes it; returns MB/s (10^6 bytes)."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}"]
    if target.authenticated:
        argv += ["-u", f"{NODE[0]}:{NODE[1]}"]
    argv.append(target.put_url(name))
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    status, size, seconds = int(out[0]), int(out[1]), float(out[2])
    stored = storage / "bench-put" / name
    if status != 200 or size != stored.stat().st_size:
        raise RuntimeError(f"{target.name}: GET answered {status} with {size} bytes")
    stored.unlink()
    return size / seconds / 1e6


SLOW_STREAMS = 50  # half uploads, half downloads
SLOW_PIECE = 32 * 1024  # what a slow client sends or reads at each tick
SLOW_TICK = 0.125  # seconds: 256 KiB/s a stream
SLOW_SECONDS = 8.0
SLOW_SOURCE_MIB = 64  # what the downloads would read, were they not cut


def slow_streams_rss_mib(gateway: GatewayProcess, target: Target, storage: Path) -> float:
    """Peak RSS the gateway grows by, per stream, while 25 clients upload over WebDAV at
    256 KiB/s and 25 download at that pace (their receive buffers small, as a slow link's
    end): the memory a stream holds while its client is the slow side. Each upload is 2
    MiB, whole and checked; each download is cut after SLOW_SECONDS."""
    source = storage / "bench-put" / "slow-source.bin"
    with open(source, "wb") as f:
        f.truncate(SLOW_SOURCE_MIB * MiB)
    upload_size = int(SLOW_SECONDS / SLOW_TICK) * SLOW_PIECE
    head_auth = f"Authorization: {basic(*NODE)}\r\n"
    failures: list[str] = []

    def request(sock: socket.socket, method: str, name: str, extra: str = "") -> None:
        head = f"{method} {target.put_path(name)} HTTP/1.1\r\nHost: bench\r\n"
        sock.sendall(f"{head}{head_auth}{extra}\r\n".encode())

    def upload(i: int) -> None:
        with socket.create_connection(("127.0.0.1", target.webdav_port), timeout=60) as sock:
            request(sock, "PUT", f"slow-{i}.bin", f"Content-Length: {upload_size}\r\n")
            piece = os.urandom(SLOW_PIECE)
            for _ in range(upload_size // SLOW_PIECE):
                sock.sendall(piece)
                time.sleep(SLOW_TICK)
            answer = sock.recv(4096).split(b" ", 2)
            if answer[1:2] not in ([b"201"], [b"204"]):
                failures.append(f"PUT {i}: {answer[:2]}")

    def download(i: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(60)
        with sock:
            sock.connect(("127.0.0.1", target.webdav_port))
            request(sock, "GET", source.name)
            got, until = 0, time.monotonic() + SLOW_SECONDS
            while time.monotonic() < until:
                chunk = sock.recv(SLOW_PIECE)
                if not chunk:
                    failures.append(f"GET {i}: ended after {got} bytes")
                    return
                got += len(chunk)
                time.sleep(SLOW_TICK)

    reset_peak_rss(gateway.pid)
    before = peak_rss_mb(gateway.pid, "VmRSS")
    threads = [threading.Thread(target=upload if i % 2 else download, args=(i,))
               for i in range(SLOW_STREAMS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    peak = peak_rss_mb(gateway.pid)
    for i in range(1, SLOW_STREAMS, 2):
        stored = storage / "bench-put" / f"slow-{i}.bin"
        if not stored.exists() or stored.stat().st_size != upload_size:
            failures.append(f"PUT {i}: not stored whole")
        stored.unlink(missing_ok=True)
    source.unlink()
    if failures:
        raise RuntimeError(f"slow streams: {'; '.join(failures[:5])}")
    say(f"  {SLOW_STREAMS} slow streams: gateway RSS {before:.1f} MB before, peak {peak:.1f} MB")
    return (peak - before) / SLOW_STREAMS


def acl_change_seconds(gateway: GatewayProcess, cluster: Cluster, target: Target,
                       round_no: int) -> float:
    """From publishing acl-changed to the first request with the new password answering 200."""
    password = f"acl-bench-{round_no}-{time.time_ns()}"
    headers = {"Authorization": basic(ACL_USER, password), "Accept": REST_ACCEPT}
    path = target.small_object_url().split(str(target.port), 1)[1]
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status != 401:
            raise RuntimeError(f"new password answered {response.status} before the change")
        cluster.add_user(ACL_USER, password)
        started = time.perf_counter()
        cluster.publish("acl-changed")
        while time.perf_counter() - started < 30:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return time.perf_counter() - started
            time.sleep(0.002)
    finally:
        conn.close()
    raise RuntimeError("new credentials did not work within 30 s")


# A backup's repository is listed (`rclone lsjson`, a child of the gateway) 5 s after its
# snapshot: that listing must not run during the next backup measured, on either gateway.
QUIET = 7.0


def backup_cpu(target: Target, gateway: GatewayProcess, data: Path, storage: Path,
               not_before: float = 0.0) -> tuple[float, list[limit_checks_cost.Logged]]:
    """A restic backup into a new repository, begun no sooner than `not_before`
    (monotonic): the gateway's CPU and the requests it logged."""
    repo_dir = storage / APP / MODULE_UUID
    shutil.rmtree(repo_dir, ignore_errors=True)
    repo = target.restic_repo()
    restic(repo, "init", timeout=300)
    time.sleep(max(0.2, not_before - time.monotonic()))  # and the access lines of init written
    offset = gateway.log_path.stat().st_size
    before = thread_cpu_ns(gateway.pid)
    restic(repo, "backup", "--host", "bench", str(data), timeout=1800)
    cpu = cpu_since(gateway.pid, before)
    time.sleep(0.2)
    logged = [limit_checks_cost.logged(e) for e in gateway.access_lines(since=offset)]
    shutil.rmtree(repo_dir, ignore_errors=True)
    if not logged:
        raise RuntimeError(f"{target.name}: no access line for the backup in {gateway.log_path}")
    return cpu, logged


class LimitsCpu:
    """restic backups through the gateway and through the gateway without its limit stages.

    Each pair starts its own two gateways (`start`), in turns which first, and runs a
    backup through each, in turns which first, no sooner than QUIET after the last: two
    identical gateways on this bench differed by 2.5 % (10 pairs of 512 MiB) with one
    started first and by -0.5 % the other way round, and the backup run second used
    some 10 % more CPU when the first one's listing of the storage overlapped it. Each
    pair gives (CPU with - CPU without) / CPU with, and the stages' cost timed in
    process for the requests of the backup with them."""

    def __init__(self, start: Callable[[bool, str], GatewayProcess]) -> None:
        self.start = start  # (with the limit stages, name of its work directory) -> gateway
        self.pairs = 0
        self.quiet_from = 0.0  # monotonic: no listing of a gateway's left from then on

    def settle(self) -> None:
        """Other requests just went to the gateway: none of their listings in a backup."""
        self.quiet_from = time.monotonic() + QUIET

    def pair(self, data: Path, storage: Path, results: Results) -> None:
        k, self.pairs = self.pairs, self.pairs + 1
        names = [GATEWAY, GATEWAY_NO_LIMITS]
        started = names if k % 2 == 0 else names[::-1]
        run = names if (k // 2) % 2 == 0 else names[::-1]
        sides: dict[str, tuple[Target, GatewayProcess]] = {}
        cpu: dict[str, float] = {}
        logged: list[limit_checks_cost.Logged] = []
        try:
            for name in started:
                twin = self.start(name == GATEWAY, f"pair-{k}-{len(sides)}")
                sides[name] = (Target(name, twin.port, twin.port, f"/{DEST}", True), twin)
            self.quiet_from = max(self.quiet_from, time.monotonic() + QUIET)  # their first scan
            for name in run:
                target, twin = sides[name]
                cpu[name], lines = backup_cpu(target, twin, data, storage, self.quiet_from)
                self.quiet_from = time.monotonic() + QUIET
                if name == GATEWAY:
                    logged = lines
                if refused := cap_refusals(twin):
                    raise RuntimeError(f"{name}: {refused} requests over the cap in a backup")
        finally:
            for _, twin in sides.values():
                twin.stop()
                twin.kill_leftovers()
                shutil.rmtree(twin.workdir, ignore_errors=True)
        with_cpu, without_cpu = cpu[GATEWAY], cpu[GATEWAY_NO_LIMITS]
        results.add("gateway CPU, backup with limit stages", GATEWAY, with_cpu)
        results.add("gateway CPU, backup without limit stages", GATEWAY, without_cpu)
        results.add("limit stages' CPU share, restic backup", GATEWAY,
                    100 * (with_cpu - without_cpu) / with_cpu)
        cost = limit_checks_cost.measure(logged, {MODULE[0].removeprefix("module/"): MODULE_UUID})
        results.add("limit stages' CPU share, micro-benchmark", GATEWAY,
                    100 * cost.total_s / with_cpu)
        results.add("limit stages' CPU per request", GATEWAY,
                    cost.stages_s / max(cost.requests, 1))
        results.add("requests of a restic backup", GATEWAY, cost.requests)
        say(f"  limits CPU: with {with_cpu:.2f} s, without {without_cpu:.2f} s; stages in "
            f"process {cost.stages_s * 1e3:.2f} ms for {cost.requests} requests "
            f"({cost.per_request_us:.1f} µs each), transform {cost.streams_s * 1e3:.2f} + "
            f"{cost.pieces_s * 1e3:.2f} ms ({cost.per_piece_us:.2f} µs a piece)")


class ParallelBackups:
    """PARALLEL_MODULES running `restic backup` at the same time, each of its own data into
    its own new repository, through one target: the wall time from the start of them all to
    the end of the last, the proxy process's CPU over it and its peak RSS (VmHWM, reset
    before).

    Every run begins from the same freshly initialised repositories (their config and keys,
    made once by `restic init` through rclone alone, copied in): eight inits before each run
    would take longer than the backups of --quick. A backup through the gateway has its
    repository listed (`rclone lsjson`, a child of the gateway) scan.DEBOUNCE after its
    snapshot: no run begins while such a listing is due or running."""

    def __init__(self, plan: Plan, gateway: GatewayProcess, storage: Path, scratch: Path) -> None:
        self.plan, self.gateway, self.storage = plan, gateway, storage
        self.data = scratch / "parallel"
        self.template = scratch / "parallel-repositories"
        self.quiet_from = 0.0  # monotonic: no listing of the gateway's due from then on

    def repository(self, root: Path, module: Module) -> Path:
        return root / module.app / module.uuid

    def prepare(self, baseline: Target) -> None:
        """The modules' data, and their repositories initialised through `baseline`."""
        for module in PARALLEL_MODULES:
            make_restic_data(self.data / module.id, self.plan, self.plan.parallel_mib)
        with ThreadPoolExecutor(len(PARALLEL_MODULES)) as pool:
            list(pool.map(lambda m: restic(baseline.repo_of(m.user, m.app, m.uuid), "init",
                                           timeout=300), PARALLEL_MODULES))
        for module in PARALLEL_MODULES:
            shutil.copytree(self.repository(self.storage, module),
                            self.repository(self.template, module))
            shutil.rmtree(self.repository(self.storage, module))

    def settle(self) -> None:
        """Backups just went through the gateway: their listings are due before a run."""
        self.quiet_from = max(self.quiet_from, time.monotonic() + scan.DEBOUNCE + 1)

    def listing(self) -> bool:
        """Whether the gateway runs a child other than its `rclone serve`s (a listing)."""
        serving = set(self.gateway.rclone_serve_pids())
        return any(pid not in serving for pid in self.gateway.child_pids())

    def wait_quiet(self) -> None:
        time.sleep(max(0.0, self.quiet_from - time.monotonic()))
        deadline = time.monotonic() + 120
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 2 * scan.PAUSE + 0.1:  # longer than a pause
            if self.listing():
                quiet_since = time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway's listings of the storage went on for 120 s")
            time.sleep(0.05)

    def run(self, target: Target, proxy_pid: int | None, results: Results) -> None:
        self.wait_quiet()
        for module in PARALLEL_MODULES:
            repo_dir = self.repository(self.storage, module)
            shutil.rmtree(repo_dir, ignore_errors=True)
            shutil.copytree(self.repository(self.template, module), repo_dir)

        def backup(module: Module) -> float:
            restic(target.repo_of(module.user, module.app, module.uuid), "backup", "--host",
                   "bench", str(self.data / module.id), timeout=1800)
            return time.perf_counter()

        if proxy_pid:
            reset_peak_rss(proxy_pid)
            cpu_before = cpu_seconds(proxy_pid)
        started = time.perf_counter()
        with ThreadPoolExecutor(len(PARALLEL_MODULES)) as pool:
            ended = list(pool.map(backup, PARALLEL_MODULES))
        wall = max(ended) - started
        note = ""
        if proxy_pid:
            cpu = cpu_seconds(proxy_pid) - cpu_before
            rss = peak_rss_mb(proxy_pid)
            per_gib = cpu * 1024 / (self.plan.parallel_mib * len(PARALLEL_MODULES))
            results.add(f"proxy CPU per GiB, {PARALLEL}", target.name, per_gib)
            results.add(f"proxy peak RSS, {PARALLEL}", target.name, rss)
            note = f", proxy CPU {cpu:.2f} s ({per_gib:.2f} s per GiB), peak RSS {rss:.1f} MB"
        if target.name == GATEWAY:
            self.settle()
        for module in PARALLEL_MODULES:
            repo_dir = self.repository(self.storage, module)
            snapshots = list((repo_dir / "snapshots").glob("*"))
            if len(snapshots) != 1:
                raise RuntimeError(f"{target.name}: {len(snapshots)} snapshots in {repo_dir}")
            shutil.rmtree(repo_dir)
        results.add(PARALLEL, target.name, wall)
        say(f"  {target.name}: {PARALLEL} of {self.plan.parallel_mib} MiB each in {wall:.2f} s "
            f"(the first done in {min(ended) - started:.2f} s){note}")


def cap_refusals(gateway: GatewayProcess) -> int:
    """Requests the gateway refused for the cap on requests in flight."""
    lines = [line for line in gateway.log_text().splitlines()
             if "too many requests in flight" in line]
    return len(lines)


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Row:
    measure: str
    target: str = ""
    check: Callable[[float], bool] | None = None  # on the paired ratio (or value)
    on_value: bool = False  # the target applies to the value, not to a ratio
    scale: float = 1.0  # from the recorded value to the unit shown
    who: str = GATEWAY  # whose figure the target is for
    baseline: str = RCLONE  # the ratio's, where it is not rclone alone


# The targets of the performance issues (19 the last): rows with a target are checked in
# the same run as the floors beside them (SHA-256 alone, HAProxy, the bare hop).
ROWS = [
    Row("restic init"),
    Row("restic backup", "≤ x1.05", lambda r: r <= 1.05),
    Row("restic backup", "≤ x1.03 as node", lambda r: r <= 1.03, who=GATEWAY_NODE),
    Row("restic restore", "≤ x1.03 as node", lambda r: r <= 1.03, who=GATEWAY_NODE),
    Row("restic check"),
    Row("proxy CPU, restic backup"),
    Row("proxy CPU, restic restore"),
    Row("proxy CPU per GiB, restic backup", "≤ 1.0 s", lambda v: v <= 1.0, True),
    Row("proxy CPU per GiB, restic backup", "≤ 0.5 s as node", lambda v: v <= 0.5, True,
        who=GATEWAY_NODE),
    Row("proxy CPU per GiB, restic restore", "≤ 0.5 s as node", lambda v: v <= 0.5, True,
        who=GATEWAY_NODE),
    Row("SHA-256 alone per GiB"),
    Row(PARALLEL, "≤ x1.05", lambda r: r <= 1.05),
    Row(f"proxy CPU per GiB, {PARALLEL}"),
    Row(f"proxy peak RSS, {PARALLEL}"),
    Row("small GET req/s", "≥ x0.40", lambda r: r >= 0.40),
    Row("small GET p50 ms"),
    Row("small GET p99 ms", "≤ x2", lambda r: r <= 2.0),
    Row("proxy CPU per GET", scale=1e6),
    Row("proxy CPU per GET", "≤ x1.3 of the bare hop", lambda r: r <= 1.3, scale=1e6,
        baseline=BARE),
    Row("large PUT MB/s", "≥ x0.95", lambda r: r >= 0.95),
    Row("large GET MB/s", "≥ x0.95", lambda r: r >= 0.95),
    Row("gateway peak RSS, large PUT", "≤ 64 MB", lambda v: v <= 64, True),
    Row("gateway peak RSS, small PUT", "flat", None, True),
    Row("gateway RSS per slow stream", "≤ 1 MiB", lambda v: v <= 1.0, True),
    Row("gateway CPU per GiB PUT"),
    Row("gateway CPU per GiB GET"),
    Row("acl-changed to new credentials working", scale=1000),
    Row("shaped upload rate / limit", "0.85 to 1.15", lambda v: 0.85 <= v <= 1.15, True),
    Row("shaped download rate / limit", "0.85 to 1.15", lambda v: 0.85 <= v <= 1.15, True),
    Row("limit switched off to full rate", "< 1000 ms", lambda v: v < 1.0, True, 1000),
    Row("schedule slot switch to full rate", "< 1000 ms", lambda v: v < 1.0, True, 1000),
    Row("requests of a restic backup"),
    Row("gateway CPU, backup with limit stages"),
    Row("gateway CPU, backup without limit stages"),
    Row("limit stages' CPU share, restic backup", "≤ 2 %", lambda v: v <= 2.0, True),
    Row("limit stages' CPU share, micro-benchmark", "≤ 2 %", lambda v: v <= 2.0, True),
    Row("limit stages' CPU per request", scale=1e6),
]


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(results: Results, names: list[str], plan: Plan) -> str:
    labels = {
        "large PUT MB/s": f"WebDAV PUT {plan.put_mib} MiB, MB/s",
        "gateway peak RSS, large PUT": f"gateway peak RSS, PUT {plan.put_mib} MiB (MB)",
        "gateway peak RSS, small PUT": f"gateway peak RSS, PUT {plan.small_put_mib} MiB (MB)",
        "small GET req/s": "GET 1 KiB, 16 conns, req/s",
        "small GET p50 ms": "GET 1 KiB, p50 (ms)",
        "small GET p99 ms": "GET 1 KiB, p99 (ms)",
        "acl-changed to new credentials working": "acl-changed to new password working (ms)",
        "proxy CPU per GET": "proxy process CPU per GET (µs)",
        "proxy CPU, restic backup": "proxy process CPU during restic backup (s)",
        "proxy CPU, restic restore": "proxy process CPU during restic restore (s)",
        "proxy CPU per GiB, restic backup":
            "proxy process CPU per GiB of backup upload (s)",
        "proxy CPU per GiB, restic restore":
            "proxy process CPU per GiB of restore download (s)",
        "SHA-256 alone per GiB": "floor: SHA-256 alone per GiB on this machine (s)",
        PARALLEL: f"{len(PARALLEL_MODULES)} modules backing up {plan.parallel_mib} MiB each "
                  "at once (s)",
        f"proxy CPU per GiB, {PARALLEL}": f"proxy process CPU per GiB, {PARALLEL} (s)",
        f"proxy peak RSS, {PARALLEL}": f"proxy process peak RSS, {PARALLEL} (MB)",
        "large GET MB/s": f"WebDAV GET {plan.put_mib} MiB, MB/s",
        "gateway RSS per slow stream":
            f"gateway peak RSS per slow stream, {SLOW_STREAMS} at once (MB)",
        "gateway CPU per GiB PUT": "gateway CPU per GiB of PUT (s)",
        "gateway CPU per GiB GET": "gateway CPU per GiB of WebDAV GET (s)",
        "shaped upload rate / limit":
            f"module upload {plan.shaped_mib} MiB under its {SHAPED_LIMIT} limit, rate / limit",
        "shaped download rate / limit":
            f"GET {plan.shaped_mib} MiB under a gateway-wide {SHAPED_LIMIT}, rate / limit",
        "limit switched off to full rate":
            f"{LOW_LIMIT} limit removed mid-upload, publish to full rate (ms)",
        "schedule slot switch to full rate":
            f"schedule {LOW_LIMIT} then off at the minute, boundary to full rate (ms)",
        "requests of a restic backup": f"requests of a restic backup {plan.restic_mib} MiB",
        "gateway CPU, backup with limit stages":
            f"gateway CPU, restic backup {plan.restic_mib} MiB, limit pairs (s)",
        "gateway CPU, backup without limit stages":
            "the same through the gateway without the limit stages (s)",
        "limit stages' CPU share, restic backup":
            "limit stages' share of a backup's gateway CPU, no limit set (%)",
        "limit stages' CPU share, micro-benchmark":
            "the same from the stages timed in process (%)",
        "limit stages' CPU per request": "limit stages' CPU per request, no limit set (µs)",
    }
    others = [n for n in names if n != RCLONE]
    head = ["measure", RCLONE, *others, *(f"{n} / rclone" for n in others), "target",
            "reached", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        if row.measure not in results.values:
            continue
        label = labels.get(row.measure, f"{row.measure} {plan.restic_mib} MiB (s)"
                           if row.measure.startswith("restic") else row.measure)
        cells = [label]
        for name in [RCLONE, *others]:
            value = results.median(row.measure, name)
            cells.append(fmt(value * row.scale) if value is not None else "-")
        ratios = {n: results.paired_ratio(row.measure, n, RCLONE) for n in others}
        cells += [f"x{r:.2f}" if r is not None else "-" for r in ratios.values()]
        met = "-"
        value = None
        if row.on_value:
            value = results.median(row.measure, row.who)
        elif row.baseline != RCLONE:
            value = results.paired_ratio(row.measure, row.who, row.baseline)
        else:
            value = ratios.get(row.who)
        if row.check is not None and value is not None:
            met = "yes" if row.check(value) else "no"
        reached = "-" if value is None else (
            fmt(value * row.scale) if row.on_value else f"x{value:.2f}")
        cells += [row.target or "-", reached if row.check is not None else "-", met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_round(results: Results, names: list[str]) -> str:
    others = [n for n in names if n != RCLONE]
    lines = []
    seen = set()
    for row in ROWS:
        runs = results.values.get(row.measure)
        if not runs or row.measure in seen:
            continue
        seen.add(row.measure)
        parts = []
        for name in others:
            a, b = runs.get(name, []), runs.get(RCLONE, [])
            if a and b:
                parts.append(name + " " + ", ".join(
                    f"x{x / y:.2f}" for x, y in zip(a, b, strict=False) if y))
            elif a:
                parts.append(name + " " + ", ".join(fmt(x * row.scale) for x in a))
        lines.append(f"- {row.measure}: " + "; ".join(parts))
    return "\n".join(lines)


def command_version(argv: list[str], pattern: str = r"(\d+\.\d+[\w.\-]*)") -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "not installed"
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(1) if match else "unknown"


def machine(rclone: str) -> list[tuple[str, str]]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    facts = [
        ("commit", commit + (" (with uncommitted changes)" if dirty else "")),
        ("CPUs (nproc)", str(os.cpu_count())),
        ("CPU model", cpu),
        ("memory", f"{mem_kb / 1024 / 1024:.1f} GiB"),
        ("kernel", platform.release()),
        ("Python", platform.python_version()),
        ("rclone", command_version([rclone, "version"])),
        ("restic", command_version([RESTIC_BINARIES[restic_client], "version"])),
        ("wrk", command_version(["wrk", "-v"])),
        ("load average (1 min) at the end", f"{os.getloadavg()[0]:.2f}"),
    ]
    if shutil.which("haproxy"):
        facts.append(("haproxy", command_version(["haproxy", "-v"])))
    return facts


BEGIN_MARK = "<!-- measured by bench/run.py: this part is rewritten by each run -->"
END_MARK = "<!-- end of the measured part -->"


def write_report(path: Path, measured: str) -> None:
    """Replaces the measured part of `path`, keeping what was written around it."""
    block = f"{BEGIN_MARK}\n{measured}\n{END_MARK}"
    text = path.read_text() if path.exists() else ""
    if BEGIN_MARK in text and END_MARK in text:
        head, rest = text.split(BEGIN_MARK, 1)
        tail = rest.split(END_MARK, 1)[1]
        text = head + block + tail
    else:
        text = f"# Performance\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def measured_section(report: str, rounds: str, facts: list[tuple[str, str]], plan: Plan,
                     quick: bool, seconds: float) -> str:
    machine_lines = "\n".join(f"| {k} | {v} |" for k, v in facts)
    piece_kib = limit_checks_cost.ASSUMED_PIECE // 1024
    window_ms = f"{limits_bench.WINDOW * 1000:.0f}"
    sample_ms = f"{limits_bench.SAMPLE_EVERY * 1000:.0f}"
    lifted = f"{limits_bench.LIFTED:g}"
    before = f"{limits_bench.UPLOAD_BEFORE:g}"
    modules = len(PARALLEL_MODULES)
    haproxy_note = ""
    if any(k == "haproxy" for k, _ in facts):
        haproxy_note = ", and through HAProxy with a Basic-auth userlist\nin front of rclone alone"
    return f"""\
Figures from `make bench{" BENCH_ARGS=--quick" if quick else ""}` (`bench/run.py`),
{plan.rounds} rounds, {seconds / 60:.1f} minutes.

{report}

Method: the same storage directory is reached through the gateway (Basic auth,
policy, its own `rclone serve` children on unix sockets) and through "rclone
alone" (`rclone serve restic` and `rclone serve webdav` on TCP, no
authentication, same flags as the gateway's children){haproxy_note}.
Each measure runs the targets one after the other, the order alternating from
round to round; each round gives one ratio against rclone alone, and the table
shows the median of those ratios (the figures per target are medians too).
restic ({restic_client}, the cluster's where bootstrap installed it) runs with
`--no-cache` on {plan.restic_mib} MiB of incompressible data in files of {plan.file_mib}
MiB, as a module (append-only backend, every uploaded object checked against its name),
each round into a new repository; "gateway as node" runs the same through the gateway with
node credentials (the full backend, no check of uploaded objects). {modules} modules at
once: {modules} module users (each its own ACL user, uuid and repository
`/<destination>/<app>/<uuid>`) run `restic backup` of their own {plan.parallel_mib} MiB of
incompressible data at the same time, each run into new repositories (copies of ones
initialised once); the time is from the start of all to the end of the last, and the proxy
process's CPU per GiB and peak RSS (VmHWM, reset before) are over the same run; no run
begins while the gateway lists a repository after a backup (its `rclone lsjson`,
{scan.DEBOUNCE:g} s after a snapshot). Small GETs:
`wrk -t2 -c16 -d{plan.wrk_seconds}s` on a 1 KiB
object through the Restic REST API with node credentials; "bare proxy" is
`bench/bare_proxy.py`, the gateway's own proxy hop (uvloop, aiohttp's server,
the same streaming code and upstream client) with none of its checks, access
log or metrics, in front of the gateway's own restic socket: the most this way
of building a Python proxy can reach. CPU: user + system time of the proxy
process alone (the gateway's, HAProxy's; not the rclone children), per GiB of
the data restic backs up or restores, and per small GET; "floor: SHA-256 alone"
is hashlib's SHA-256 of 1 GiB in pieces of 256 KiB in the bench's own process,
once a round: what hashing a module's upload must cost at least. PUT and GET: `curl -T`
then `curl` of the same file
through WebDAV with node credentials; the gateway's resident memory is its
peak (VmHWM, reset before each upload) of the gateway process alone, not its
rclone children. Slow streams: {SLOW_STREAMS // 2} WebDAV uploads of
{SLOW_SECONDS / SLOW_TICK * SLOW_PIECE / MiB:g} MiB sent at {SLOW_PIECE // 1024} KiB every
{SLOW_TICK * 1000:g} ms and {SLOW_STREAMS // 2} downloads read at that pace (receive buffer
held to 64 KiB) for {SLOW_SECONDS:g} s, all at once: the gateway's peak RSS (VmHWM) over its
RSS before, per stream. acl-changed: time from publishing the event to the first
200 answered for a password that was just set.

Limits: the module POSTs a restic data object of {plan.shaped_mib} MiB on one
connection (the gateway checks its SHA-256) under its own `module/<id>/upload`
limit of {SHAPED_LIMIT} (MiB/s), then GETs it under a gateway-wide `download` limit
of {SHAPED_LIMIT}: its size over the time from the request to the end of the answer,
over the limit. Switch-off: an upload of {SWITCH_MIB} MiB runs for 1.5 s under a
{LOW_LIMIT} limit, the field is removed (HDEL) and `backup-limits-changed` published;
the time is from the publish to the end of the first {window_ms} ms in which the
stored object (its size on disk, read every {sample_ms} ms) grew by {lifted} times
what the old limit lets through in that time. Schedule: the same with
`"<minute>,{LOW_LIMIT} <next minute>,off"`, the upload begun {before} s before the minute,
timed from the boundary (the wait for a boundary is not counted). Limit stages'
cost, no Limits key set: restic backups of the same data through the gateway and
through the same without its `concurrency_cap`, `storage_quota` and `bandwidth`
stages: for each pair two new gateways, both started by
`bench/gateway_without_limits.py` on the same storage, in turns which first, and
a backup through each, in turns which first ({plan.cpu_pairs} pair(s) a round,
none while a listing of the storage runs); each pair gives (CPU with - CPU without) / CPU
with, of the gateway process (its threads' time on a CPU, from schedstat), and
the table shows their median.
The in-process figure runs the three stages and their end-of-request callbacks on
the requests the backup logged, and the no-limit bandwidth transform once per body
and once per {piece_kib} KiB of it (larger pieces pass in fact: it errs high), over
the same backup's gateway CPU.

Each round, as a ratio to rclone alone (or as the value, where there is no baseline):

{rounds}

Machine:

| | |
|---|---|
{machine_lines}"""


# --------------------------------------------------------------------------- main


class LimitMeasures:
    """The limits' measures of one round, as the bench's module. The schedule's waits for a
    minute boundary are filled with the other measures where they fit."""

    def __init__(self, only: set[str], plan: Plan, cluster: Cluster, gateway: GatewayProcess,
                 repo: limits_bench.Repo, limits_cpu: LimitsCpu | None) -> None:
        self.only, self.plan, self.cluster, self.gateway = only, plan, cluster, gateway
        self.repo, self.limits_cpu = repo, limits_cpu
        # seconds each took last time; the first guesses err long
        shaped = plan.shaped_mib * MiB / limits_bench.rate_of(SHAPED_LIMIT)
        self.took = {"shaping": 2 * shaped + 8, "switch": 10.0, "limits-cpu": 40.0}

    def round(self, data: Path, storage: Path, results: Results) -> None:
        tasks: list[tuple[str, Callable[[], None]]] = []
        if "shaping" in self.only:
            tasks.append(("shaping", lambda: self.shaping(results)))
        if "switch" in self.only:
            tasks.append(("switch", lambda: self.switch(results)))
        if self.limits_cpu is not None:
            limits_cpu = self.limits_cpu
            tasks += [("limits-cpu", lambda: limits_cpu.pair(data, storage, results))
                      ] * self.plan.cpu_pairs
            limits_cpu.settle()
        schedule_due = "schedule" in self.only
        for name, task in tasks:
            if schedule_due and limits_bench.seconds_to_upload() < self.took[name] + 3:
                self.schedule(results)
                schedule_due = False
            started = time.monotonic()
            task()
            self.took[name] = time.monotonic() - started
        if schedule_due:
            self.schedule(results)
        shutil.rmtree(self.repo.directory, ignore_errors=True)

    def shaping(self, results: Results) -> None:
        args = (self.cluster, self.gateway, NODE, self.repo, self.plan.shaped_mib, SHAPED_LIMIT)
        results.add("shaped upload rate / limit", GATEWAY,
                    limits_bench.shaped_upload_ratio(*args))
        results.add("shaped download rate / limit", GATEWAY,
                    limits_bench.shaped_download_ratio(*args))

    def switch(self, results: Results) -> None:
        lag, under = limits_bench.switch_off_seconds(self.cluster, self.gateway, NODE,
                                                     self.repo, SWITCH_MIB, LOW_LIMIT)
        say(f"  limit removed: full rate after {lag * 1000:.0f} ms "
            f"({under / MiB:.1f} MiB/s under {LOW_LIMIT})")
        results.add("limit switched off to full rate", GATEWAY, lag)

    def schedule(self, results: Results) -> None:
        lag, under, waited = limits_bench.schedule_switch_seconds(
            self.cluster, self.gateway, NODE, self.repo, SWITCH_MIB, LOW_LIMIT)
        say(f"  schedule slot: full rate {lag * 1000:.0f} ms after the minute "
            f"({under / MiB:.1f} MiB/s under {LOW_LIMIT}; waited {waited:.0f} s for it)")
        results.add("schedule slot switch to full rate", GATEWAY, lag)


def seed(cluster: Cluster) -> None:
    # No `rclone-gateway/concurrency` key: the cap on a module's requests in flight stays at
    # its default of 8, as on a node nobody configured. The bench's module never has more
    # in flight: restic opens 5 connections (its rest.connections), the limits' measures
    # one. wrk (16 connections), the PUTs and acl-changed go as nodes, which have no cap by
    # default. A measure that sends more than 8 at once as the module must set `module` to
    # `off` here, or it measures 503s and retries; cap_refusals() tells of any at the end.
    cluster.flush()
    cluster.add_user(*NODE)
    cluster.add_user(*MODULE)
    cluster.set_module(MODULE[0].removeprefix("module/"), MODULE_UUID)
    for module in PARALLEL_MODULES:  # each under its own cap: restic's 5 connections
        cluster.add_user(*module.user)
        cluster.set_module(module.id, module.uuid)
    cluster.set_node_vpn(1, NODE_VPN_IP)
    cluster.set_network("10.5.4.0/24")
    cluster.add_destination(DEST, provider="cluster", url=f"webdav:http://{NODE_VPN_IP}:4694",
                            name="bench")


def ensure_tools() -> None:
    """wrk drives the small GETs; HAProxy, the frontend the gateway replaces, is measured
    beside it. Both are installed with apt-get where missing (as root); only wrk is needed."""
    missing = [tool for tool in ("wrk", "haproxy") if not shutil.which(tool)]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        say(f"installing {', '.join(missing)} (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       check=False, env=env)
    if not shutil.which("wrk"):
        raise SystemExit("bench: wrk is needed (Debian: apt-get install wrk)")
    if not shutil.which("haproxy"):
        say("haproxy not found: measured without it")


def hold(targets: list[Target], gateway: GatewayProcess) -> None:
    for target in targets:
        say(f"{target.name}: GET {target.small_object_url()} {target.node_headers()}")
        say(f"{target.name}: PUT {target.put_url('<name>')}; restic {target.restic_repo()}")
    say(f"gateway pid {gateway.pid}; Ctrl-C to stop")
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    signal.sigwait(stop)


def main() -> int:
    global restic_client
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller data and shorter runs (about 5 minutes)")
    parser.add_argument("--rounds", type=int, help="rounds (at least 3)")
    parser.add_argument("--restic", choices=sorted(RESTIC_BINARIES), default=restic_client,
                        help=f"the restic client (default: {restic_client})")
    parser.add_argument("--only", choices=MEASURES, action="append",
                        help="run only these measures (repeatable)")
    parser.add_argument("--hold", action="store_true",
                        help="start the targets, print their URLs and wait (for profiling)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "performance.md",
                        help="where to write the report ('-': nowhere)")
    args = parser.parse_args()
    restic_client = args.restic
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=max(3, args.rounds))
    only = set(args.only or MEASURES)
    ensure_tools()
    for tool in ("curl", "restic", "redis-server"):
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} is needed (run `make bootstrap`)")
    rclone = str(Path(sys.executable).parent / "rclone")

    bench_started = time.monotonic()
    (ROOT / "var").mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=ROOT / "var"))
    services: list[Service] = []
    redis_server = RedisServer(workdir / "redis")
    gateway: GatewayProcess | None = None
    try:
        cluster = Cluster(redis_server.client())
        seed(cluster)
        gateway = GatewayProcess.start(redis_server.url, "1", workdir / "gateway")
        storage = gateway.local_repo
        (storage / "bench-put").mkdir(parents=True, exist_ok=True)
        small = storage / APP / SMALL_REPO_UUID / "data" / SMALL_ID[:2] / SMALL_ID
        small.parent.mkdir(parents=True, exist_ok=True)
        small.write_bytes(os.urandom(1024))

        restic_port, webdav_port = free_port(), free_port()
        services.append(rclone_restic(rclone, storage, restic_port, workdir))
        services.append(rclone_webdav(rclone, storage, webdav_port, workdir))
        targets = [
            Target(GATEWAY, gateway.port, gateway.port, f"/{DEST}", True),
            Target(RCLONE, restic_port, webdav_port, "", False),
        ]
        haproxy_port = free_port()
        users = dict([NODE, MODULE, *(m.user for m in PARALLEL_MODULES)])
        proxy = haproxy(haproxy_config(haproxy_port, restic_port, webdav_port, DEST, users),
                        haproxy_port, workdir)
        if proxy is not None:
            services.append(proxy)
            targets.append(Target(HAPROXY, haproxy_port, haproxy_port, f"/{DEST}", True))
        restic_targets = [*targets, Target(GATEWAY_NODE, gateway.port, gateway.port,
                                           f"/{DEST}", True, restic_user=NODE)]
        get_targets = list(targets)
        proxy_pids = {GATEWAY: gateway.pid, GATEWAY_NODE: gateway.pid}
        if proxy is not None:
            proxy_pids[HAPROXY] = proxy.pid
        if "get" in only:
            # Small GETs only: the gateway's hop without its checks, on its own restic socket.
            sockets = sorted(gateway.runtime_dir.glob("*/restic.sock"))
            bare_port = free_port()
            services.append(bare_proxy(sockets[-1], bare_port, workdir))
            proxy_pids[BARE] = services[-1].pid
            get_targets.append(Target(BARE, bare_port, bare_port, f"/{DEST}", False))
        names = [t.name for t in get_targets] + ([GATEWAY_NODE] if "restic" in only else [])
        limits_cpu: LimitsCpu | None = None
        if "limits-cpu" in only:
            # Gateways of their own, started alike on the same storage, for each pair: the
            # one measured elsewhere would bring its past (100,000s of GETs) into it.
            limits_cpu = LimitsCpu(lambda with_limits, name: limits_bench.start_twin(
                redis_server.url, "1", workdir / name, storage, with_limits=with_limits))
        limit_measures = LimitMeasures(only, plan, cluster, gateway,
                                       limits_bench.Repo(DEST, APP, MODULE_UUID, MODULE, storage),
                                       limits_cpu)
        say(f"bench: {', '.join(names)}; {plan.rounds} rounds; work dir {workdir}")
        if args.hold:
            hold(targets, gateway)
            return 0

        scratch = workdir / "scratch"
        data = (make_restic_data(scratch / "data", plan) if only & {"restic", "limits-cpu"}
                else scratch)
        put_source = scratch / "put.bin"
        put_small = scratch / "put-small.bin"
        scratch.mkdir(parents=True, exist_ok=True)
        for path, mib in ((put_source, plan.put_mib), (put_small, plan.small_put_mib)):
            with open(path, "wb") as f:
                f.truncate(mib * MiB)  # sparse: reads cost no disk

        parallel: ParallelBackups | None = None
        if "parallel" in only:
            parallel = ParallelBackups(plan, gateway, storage, scratch)
            parallel.prepare(targets[1])

        results = Results()
        if "get" in only:
            for target in get_targets:
                wrk(target, 1, None)  # warm-up: connections, caches
        for round_no in range(plan.rounds):
            order = targets if round_no % 2 == 0 else targets[::-1]
            say(f"round {round_no + 1}/{plan.rounds}: {' -> '.join(t.name for t in order)}")
            if "restic" in only:
                restic_order = restic_targets if round_no % 2 == 0 else restic_targets[::-1]
                for target in restic_order:
                    restic_cycle(target, data, storage, scratch, results,
                                 proxy_pids.get(target.name), plan.restic_mib)
                results.add("SHA-256 alone per GiB", GATEWAY, sha256_seconds_per_gib())
            if parallel is not None:
                if "restic" in only:
                    parallel.settle()
                for target in order:
                    parallel.run(target, proxy_pids.get(target.name), results)
            if "get" in only:
                get_order = get_targets if round_no % 2 == 0 else get_targets[::-1]
                for target in get_order:
                    pid = proxy_pids.get(target.name)
                    before = cpu_seconds(pid) if pid else 0.0
                    requests = wrk(target, plan.wrk_seconds, results)
                    if pid:
                        results.add("proxy CPU per GET", target.name,
                                    (cpu_seconds(pid) - before) / requests)
            if "put" in only:
                for target in order:
                    if target.name == GATEWAY:
                        reset_peak_rss(gateway.pid)
                        put(target, put_small, storage, "small.bin")
                        (storage / "bench-put" / "small.bin").unlink()
                        results.add("gateway peak RSS, small PUT", GATEWAY,
                                    peak_rss_mb(gateway.pid))
                        reset_peak_rss(gateway.pid)
                    before = cpu_seconds(gateway.pid)
                    mbps = put(target, put_source, storage, f"large-{round_no}.bin")
                    results.add("large PUT MB/s", target.name, mbps)
                    if target.name == GATEWAY:
                        results.add("gateway peak RSS, large PUT", GATEWAY,
                                    peak_rss_mb(gateway.pid))
                        results.add("gateway CPU per GiB PUT", GATEWAY,
                                    (cpu_seconds(gateway.pid) - before) * 1024 / plan.put_mib)
                    before = cpu_seconds(gateway.pid)
                    results.add("large GET MB/s", target.name,
                                get_large(target, storage, f"large-{round_no}.bin"))
                    if target.name == GATEWAY:
                        results.add("gateway CPU per GiB GET", GATEWAY,
                                    (cpu_seconds(gateway.pid) - before) * 1024 / plan.put_mib)
            if "slow" in only:
                results.add("gateway RSS per slow stream", GATEWAY,
                            slow_streams_rss_mib(gateway, targets[0], storage))
            if "acl" in only:
                results.add("acl-changed to new credentials working", GATEWAY,
                            acl_change_seconds(gateway, cluster, targets[0], round_no))
            limit_measures.round(data, storage, results)

        refused = cap_refusals(gateway)
        if refused:
            say(f"bench: the gateway refused {refused} requests over the cap on requests in "
                f"flight (clients retried them): see {gateway.log_path}")

        report = table(results, names, plan)
        print(report)
        if str(args.output) == "-":
            say(per_round(results, names))
        if str(args.output) != "-":
            write_report(args.output, measured_section(
                report, per_round(results, names), machine(rclone), plan, args.quick,
                time.monotonic() - bench_started))
            say(f"bench: wrote {args.output}")
        return 0
    finally:
        for service in services:
            service.stop()
        if gateway is not None:
            gateway.stop()
            gateway.kill_leftovers()
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
