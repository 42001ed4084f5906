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

restic runs on one repository one after the other (restic 0.14 does not wait for
locks), on different repositories at once. At the end it prints a summary (also
written to var/soak-summary.txt; the gateway's log is kept as var/soak-gateway.log)
and exits 1 when a "must" failed.

    make soak                           # 180 s of load, about 4 minutes in all
    make soak DURATION=1800             # half an hour
    make soak SOAK_ARGS="--duration 600 --stop-backend restic-append-only"
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

from harness import Cluster, GatewayProcess, RedisServer, send_request  # noqa: E402

DEST_LOCAL = "50a50a50-8f8b-4c43-a1d3-7f3f5f7c1a01"  # provider cluster, this node's disk
DEST_REMOTE = "50a50a50-1b2a-4d6e-9f70-aa11bb22cc33"  # provider rclone, type local
DEST_EXTRA = "50a50a50-3c4d-4e5f-8a9b-0c1d2e3f4a5b"  # comes and goes during the run
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
BACKEND_TIMEOUT = 30.0  # the gateway's --backend-timeout (its default)
REPLACE_TIMEOUT = 90.0  # a stopped child not replaced within this is a failure
RUNNING_TIMEOUT = 120.0  # a killed child not running again within this is a failure


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
            # requests already on the stopped child stay there until they time out (504)
            end += BACKEND_TIMEOUT
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

    def call(self, c: Call) -> None:
        with self.lock:
            self.calls.append(c)


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


# --------------------------------------------------------------------------- the run


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path, gateway: GatewayProcess,
                 cluster: Cluster, modules: list[Module], remote_dir: Path,
                 extra_dir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.gateway = gateway
        self.cluster = cluster
        self.modules = modules
        self.remote_dir = remote_dir
        self.extra_dir = extra_dir
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
        self.restic_exe = shutil.which("restic") or "restic"
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

    def repo_url(self, module: Module, who: tuple[str, str]) -> str:
        user = who[0].replace("/", "%2F")
        return f"rest:http://{user}:{who[1]}@127.0.0.1:{self.gateway.port}{module.path}/"

    def restic(self, op: str, module: Module, who: tuple[str, str], *args: str,
               timeout: float = 900) -> bool:
        """One restic run; False (and recorded as failed) when it exits non-zero."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")}
        env["RESTIC_PASSWORD"] = RESTIC_PASSWORD
        argv = [self.restic_exe, "-r", self.repo_url(module, who), "--no-cache", *args]
        started = time.time()
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
        if self.aborted:
            return False
        with self.stats.lock:
            self.stats.restic_runs[op] += 1
            if proc.returncode != 0:
                tail = "\n".join(err.strip().splitlines()[-12:])
                self.stats.restic_failures.append(
                    (started, f"{op} {module.name} as {who[0]}", module.path, proc.returncode,
                     tail))
        if proc.returncode != 0:
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

    def compare(self, module: Module, data: Path, restored: Path) -> None:
        def digests(directory: Path) -> dict[str, str]:
            if not directory.is_dir():
                return {}
            return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in sorted(directory.iterdir()) if p.is_file()}

        want, got = digests(data), digests(restored)
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

    def node_restic_loop(self) -> None:
        n = 0
        while not self.stop.is_set():
            if not self.sleep(2.0):
                break
            module = self.modules[n % len(self.modules)]
            with self.repo_locks[module.name]:
                self.restic("forget --prune", module, NODE, "forget", "--keep-last", "2",
                            "--prune")
                self.restic("check", module, NODE, "check")
            n += 1

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
            os.kill(pid, signal.SIGSTOP)
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
        while self.sleep(1.0):
            status, _, _ = self.request("GET", "/health", timeout=10)
            rss = vm_kb(self.gateway.pid, "VmRSS")
            children = len(children_of(self.gateway.pid))
            with self.stats.lock:
                if status != 200:
                    self.stats.health_not_200.append((time.time(), status))
                self.stats.max_gateway_rss_kb = max(self.stats.max_gateway_rss_kb, rss)
                self.stats.max_rclone_children = max(self.stats.max_rclone_children, children)

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
            left_behind: list[int], log_text: str, versions: str) -> tuple[str, bool]:
    s = soak.stats
    v = Verdict()
    out: list[str] = []
    add = out.append
    windows = soak.windows
    started = datetime.fromtimestamp(soak.t0, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    add(f"soak: {soak.args.duration:.0f} s of load from {started}; {len(soak.modules)} modules, "
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
    for e in entries:
        status = e.get("status")
        if not isinstance(status, int) or status < 500:
            continue
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

    add(f"5xx answered by the gateway itself, outside the windows: {len(own_out)}   must be 0: "
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
        f"{s.max_gateway_rss_kb / 1024:.1f} MiB)")
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


# --------------------------------------------------------------------------- main


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


def versions(rclone: str) -> str:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        except OSError:
            return "?"
        return (out.splitlines() or ["?"])[0].strip()

    return f"{first_line([rclone, 'version'])}; {first_line(['restic', 'version'])}"


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
    parser.add_argument("--seed", type=int, default=4694)
    parser.add_argument("--summary", type=Path, default=ROOT / "var" / "soak-summary.txt",
                        help="where to write the summary ('-': nowhere)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.duration < 30:
        parser.error("--duration: at least 30 seconds")
    if args.modules < 2:
        parser.error("--modules: at least 2")
    for tool in ("restic", "redis-server"):
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

    modules = [Module(f"soak{i}", uuid4(), f"soak{i}-secret-{rng.getrandbits(32):08x}",
                      DEST_REMOTE if i == args.modules else DEST_LOCAL)
               for i in range(1, args.modules + 1)]
    redis_server: RedisServer | None = None
    gateway: GatewayProcess | None = None
    soak: Soak | None = None
    threads: list[threading.Thread] = []
    code = 1
    try:
        redis_server = RedisServer(workdir / "redis")
        cluster = Cluster(redis_server.client())
        seed_cluster(cluster, modules, remote_dir)
        gateway = GatewayProcess.start(redis_server.url, "1", workdir / "gateway",
                                       extra_args=LIVENESS)
        say(f"soak: gateway pid {gateway.pid} on {gateway.url}, redis on port "
            f"{redis_server.port}, work dir {workdir}")
        soak = Soak(args, workdir, gateway, cluster, modules, remote_dir, extra_dir)
        soak.init_repositories()
        say(f"soak: {len(modules)} repositories initialised; {args.duration:.0f} s of load")
        threads = soak.run()
        for thread in threads:
            thread.join(timeout=max(1.0, soak.t_end + 600 - time.time()))
        still = [t.name for t in threads if t.is_alive()]
        if still:
            raise RuntimeError(f"workers still running 10 minutes after the end: {still}")

        say(f"soak: load stopped; {args.idle_seconds:g} s of quiet, then the idle CPU")
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
            log_text=log_text, versions=versions(rclone))
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
        if redis_server is not None:
            redis_server.stop()
        if args.keep:
            say(f"soak: work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
