"""`make bench`: the gateway against rclone alone (and HAProxy where installed).

Starts its own redis-server, the gateway (with its rclone children), and
`rclone serve restic` + `rclone serve webdav` on TCP over the same storage
directory as the baseline. Every measurement runs the targets one after the
other, in alternating order from round to round; each round gives one paired
ratio per target, and the table shows medians. Writes docs/performance.md.

    make bench                          # about 8 minutes on 2 idle cores
    make bench BENCH_ARGS=--quick       # smaller data, shorter runs
    make bench BENCH_ARGS="--only get --output -"   # one measure, nothing written
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from harness import Cluster, GatewayProcess, RedisServer, basic, free_port, restic  # noqa: E402
from services import (  # noqa: E402
    Service,
    bare_proxy,
    haproxy,
    haproxy_config,
    rclone_restic,
    rclone_webdav,
)

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


@dataclass(frozen=True)
class Plan:
    restic_mib: int
    file_mib: int
    put_mib: int
    wrk_seconds: int
    rounds: int

    @property
    def small_put_mib(self) -> int:
        return max(self.put_mib // 8, 16)


FULL = Plan(restic_mib=512, file_mib=16, put_mib=1024, wrk_seconds=10, rounds=3)
QUICK = Plan(restic_mib=128, file_mib=16, put_mib=256, wrk_seconds=4, rounds=3)


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
        userinfo = ""
        if self.authenticated:
            user, password = self.restic_user
            userinfo = user.replace("/", "%2F") + ":" + password + "@"
        return f"rest:http://{userinfo}127.0.0.1:{self.port}{self.prefix}/{APP}/{MODULE_UUID}/"

    def node_headers(self) -> dict[str, str]:
        return {"Authorization": basic(*NODE)} if self.authenticated else {}

    def small_object_url(self) -> str:
        path = f"{self.prefix}/{APP}/{SMALL_REPO_UUID}/data/{SMALL_ID}"
        return f"http://127.0.0.1:{self.port}{path}"

    def put_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.webdav_port}{self.prefix}/bench-put/{name}"


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


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def make_restic_data(directory: Path, plan: Plan) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(plan.restic_mib // plan.file_mib):
        with open(directory / f"file{i:03d}.bin", "wb") as f:
            for _ in range(plan.file_mib):
                f.write(os.urandom(MiB))
    return directory


def restic_cycle(target: Target, data: Path, storage: Path, scratch: Path,
                 results: Results, gateway_pid: int | None) -> None:
    """init, backup, restore, check into a new repository; the gateway's CPU if it is used."""
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
        cpu_before = cpu_seconds(gateway_pid) if gateway_pid else 0.0
        seconds = timed(lambda args=args: restic(repo, *args, timeout=1800))
        results.add(f"restic {step}", target.name, seconds)
        if gateway_pid and step in ("backup", "restore"):
            results.add(f"gateway CPU, restic {step}", target.name,
                        cpu_seconds(gateway_pid) - cpu_before)
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
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
    stored.unlink()
    return size / seconds / 1e6


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


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Row:
    measure: str
    target: str = ""
    check: Callable[[float], bool] | None = None  # on the paired ratio (or value)
    on_value: bool = False  # the target applies to the gateway's own value
    scale: float = 1.0  # from the recorded value to the unit shown


ROWS = [
    Row("restic init"),
    Row("restic backup", "≤ x1.05", lambda r: r <= 1.05),
    Row("restic restore", "≤ x1.05", lambda r: r <= 1.05),
    Row("restic check"),
    Row("gateway CPU, restic backup"),
    Row("gateway CPU, restic restore"),
    Row("small GET req/s", "≥ x0.8", lambda r: r >= 0.8),
    Row("small GET p50 ms"),
    Row("small GET p99 ms", "≤ x2", lambda r: r <= 2.0),
    Row("proxy CPU per GET", scale=1e6),
    Row("large PUT MB/s", "≥ x0.9", lambda r: r >= 0.9),
    Row("gateway peak RSS, large PUT", "< 64 MB", lambda v: v < 64, True),
    Row("gateway peak RSS, small PUT", "flat", None, True),
    Row("gateway CPU per GiB PUT"),
    Row("acl-changed to new credentials working", scale=1000),
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
        "gateway CPU, restic backup": "gateway CPU during restic backup (s)",
        "gateway CPU, restic restore": "gateway CPU during restic restore (s)",
        "gateway CPU per GiB PUT": "gateway CPU per GiB of PUT (s)",
    }
    others = [n for n in names if n != RCLONE]
    head = ["measure", RCLONE, *others, *(f"{n} / rclone" for n in others), "target", "met"]
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
        if row.check is not None:
            value = results.median(row.measure, GATEWAY) if row.on_value else ratios.get(GATEWAY)
            if value is not None:
                met = "yes" if row.check(value) else "no"
        cells += [row.target or "-", met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_round(results: Results, names: list[str]) -> str:
    others = [n for n in names if n != RCLONE]
    lines = []
    for row in ROWS:
        runs = results.values.get(row.measure)
        if not runs:
            continue
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
        ("restic", command_version(["restic", "version"])),
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
restic runs with `--no-cache` on {plan.restic_mib} MiB of incompressible data in
files of {plan.file_mib} MiB, as a module (append-only backend, every uploaded
object checked against its name), each round into a new repository; "gateway
as node" runs the same through the gateway with node credentials (the full
backend, no check of uploaded objects). Small GETs: `wrk -t2 -c16 -d{plan.wrk_seconds}s` on a 1 KiB
object through the Restic REST API with node credentials; "bare proxy" is
`bench/bare_proxy.py`, the gateway's own proxy hop (uvloop, aiohttp's server,
the same streaming code and upstream client) with none of its checks, access
log or metrics, in front of the gateway's own restic socket: the most this way
of building a Python proxy can reach. PUT: `curl -T`
through WebDAV with node credentials; the gateway's resident memory is its
peak (VmHWM, reset before each upload) of the gateway process alone, not its
rclone children. acl-changed: time from publishing the event to the first
200 answered for a password that was just set.

Each round, as a ratio to rclone alone (or as the value, where there is no baseline):

{rounds}

Machine:

| | |
|---|---|
{machine_lines}"""


# --------------------------------------------------------------------------- main


def seed(cluster: Cluster) -> None:
    cluster.flush()
    cluster.add_user(*NODE)
    cluster.add_user(*MODULE)
    cluster.set_module(MODULE[0].removeprefix("module/"), MODULE_UUID)
    cluster.set_node_vpn(1, NODE_VPN_IP)
    cluster.set_network("10.5.4.0/24")
    cluster.add_destination(DEST, provider="cluster", url=f"webdav:http://{NODE_VPN_IP}:4694",
                            name="bench")


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say("installing wrk (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "wrk"],
                       check=True, env=env)
    if not shutil.which("wrk"):
        raise SystemExit("bench: wrk is needed (Debian: apt-get install wrk)")


def hold(targets: list[Target], gateway: GatewayProcess) -> None:
    for target in targets:
        say(f"{target.name}: GET {target.small_object_url()} {target.node_headers()}")
        say(f"{target.name}: PUT {target.put_url('<name>')}; restic {target.restic_repo()}")
    say(f"gateway pid {gateway.pid}; Ctrl-C to stop")
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    signal.sigwait(stop)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller data and shorter runs (about 3 minutes)")
    parser.add_argument("--rounds", type=int, help="rounds (at least 3)")
    parser.add_argument("--only", choices=["restic", "get", "put", "acl"], action="append",
                        help="run only these measures (repeatable)")
    parser.add_argument("--hold", action="store_true",
                        help="start the targets, print their URLs and wait (for profiling)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "performance.md",
                        help="where to write the report ('-': nowhere)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(plan.restic_mib, plan.file_mib, plan.put_mib, plan.wrk_seconds,
                    max(3, args.rounds))
    only = set(args.only or ["restic", "get", "put", "acl"])
    ensure_wrk()
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
        proxy = haproxy(haproxy_config(haproxy_port, restic_port, webdav_port, DEST,
                                       dict([NODE, MODULE])), haproxy_port, workdir)
        if proxy is not None:
            services.append(proxy)
            targets.append(Target(HAPROXY, haproxy_port, haproxy_port, f"/{DEST}", True))
        restic_targets = [*targets, Target(GATEWAY_NODE, gateway.port, gateway.port,
                                           f"/{DEST}", True, restic_user=NODE)]
        get_targets = list(targets)
        proxy_pids = {GATEWAY: gateway.pid}
        if "get" in only:
            # Small GETs only: the gateway's hop without its checks, on its own restic socket.
            sockets = sorted(gateway.runtime_dir.glob("*/restic.sock"))
            bare_port = free_port()
            services.append(bare_proxy(sockets[-1], bare_port, workdir))
            proxy_pids[BARE] = services[-1].pid
            get_targets.append(Target(BARE, bare_port, bare_port, f"/{DEST}", False))
        names = [t.name for t in get_targets] + ([GATEWAY_NODE] if "restic" in only else [])
        say(f"bench: {', '.join(names)}; {plan.rounds} rounds; work dir {workdir}")
        if args.hold:
            hold(targets, gateway)
            return 0

        scratch = workdir / "scratch"
        data = make_restic_data(scratch / "data", plan) if "restic" in only else scratch
        put_source = scratch / "put.bin"
        put_small = scratch / "put-small.bin"
        scratch.mkdir(parents=True, exist_ok=True)
        for path, mib in ((put_source, plan.put_mib), (put_small, plan.small_put_mib)):
            with open(path, "wb") as f:
                f.truncate(mib * MiB)  # sparse: reads cost no disk

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
                                 gateway.pid if target.port == gateway.port else None)
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
            if "acl" in only:
                results.add("acl-changed to new credentials working", GATEWAY,
                            acl_change_seconds(gateway, cluster, targets[0], round_no))

        report = table(results, names, plan)
        print(report)
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
