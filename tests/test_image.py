"""The image as a node runs it: containers/rclone-gateway.service's own command lines.

`make image-test` (after `make image`) runs this module; `make test` leaves it out (the
`image` marker). The container is started, reloaded and stopped by the unit's
ExecStartPre, ExecStart, ExecReload, ExecStop and ExecStopPost lines, read from the unit
file and changed only where systemd would change them: its specifiers (%n, %N, %t, %%),
`$$`, and `${VAR}` from the unit's Environment= and the two environment files it names
(written here: the image under test, and an agent environment for a real redis-server on
this machine's loopback, with a real ACL user). systemd's part is played by the test:
NOTIFY_SOCKET is a socket of the test (READY=1 has to arrive there, from inside the
container) and JOURNAL_STREAM names the log file the container writes to.

Through the container: a module's restic init, backup and restore (the host's restic
against the container's port), a node's WebDAV upload, a new destination picked up by
`systemctl reload`; then `systemctl stop`: exit 0 within the unit's TimeoutStopSec, and
no process of the container left.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import REPO_ROOT, Cluster, RedisServer, basic, restic, wait_for

pytestmark = pytest.mark.image

IMAGE = os.environ.get("IMAGE", "localhost/rclone-gateway:latest")
UNIT = REPO_ROOT / "containers" / "rclone-gateway.service"
AGENT_ENV = "/var/lib/nethserver/node/state/agent.env"
CORE_ENV = "/etc/nethserver/core.env"
PORT = 4694  # the unit's --listen, on the host network
UID = 4694

NODE = ("node/1", "node1-secret")
MODULE = ("module/dokuwiki1", "dokuwiki1-secret")
MODULE_UUID = str(uuidlib.uuid4())
DEST = str(uuidlib.uuid4())  # the node's own disk, /srv/repo in the container
NEW_DEST = str(uuidlib.uuid4())  # added while the container runs


# --------------------------------------------------------------------------- the unit


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, in order, continuation lines joined."""
    settings: dict[str, list[str]] = {}
    for line in re.sub(r"\\\n", " ", path.read_text()).splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def expand(word: str, specifiers: dict[str, str], env: dict[str, str]) -> str:
    """One word of an Exec line as systemd passes it on."""
    def one(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "$$":
            return "$"
        if token.startswith("%"):
            return "%" if token == "%%" else specifiers[token[1]]
        return env.get(match.group(1), "")
    return re.sub(r"\$\$|\$\{(\w+)\}|%.", one, word)


def exec_argv(line: str, specifiers: dict[str, str], env: dict[str, str]) -> list[str]:
    words = shlex.split(line.lstrip("-@+!:"))
    return [expand(word, specifiers, env) for word in words]


def environment_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            env[key] = value.strip('"')
    return env


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|min)?", value)
    assert match, f"unexpected time span {value!r}"
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


# --------------------------------------------------------------------------- the node


@dataclass
class Node:
    """The unit's lines, ready to run, and what a run of them leaves to look at."""

    settings: dict[str, list[str]]
    specifiers: dict[str, str]
    env: dict[str, str]
    log_path: Path
    notify: socket.socket
    cluster: Cluster

    def argv(self, key: str) -> list[list[str]]:
        return [exec_argv(line, self.specifiers, self.env) for line in self.settings[key]]

    def run(self, key: str, timeout: float = 120) -> list[subprocess.CompletedProcess[str]]:
        done = []
        for argv in self.argv(key):
            with open(self.log_path, "a") as log:
                result = subprocess.run(argv, env=self.env, stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=log, text=True, timeout=timeout)
            assert result.returncode == 0, f"{key} {argv} exited {result.returncode}:\n" \
                                           f"{self.log_text()[-3000:]}"
            done.append(result)
        return done

    @property
    def name(self) -> str:
        return self.specifiers["N"]

    @property
    def cidfile(self) -> Path:
        return Path(self.specifiers["t"]) / f"{self.name}.ctr-id"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def podman(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(["podman", *args], env=self.env, capture_output=True,
                                text=True, timeout=120)
        assert not check or result.returncode == 0, result.stderr
        return result.stdout.strip()


def _proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _start_time(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def container_processes(gateway_pid: int) -> dict[int, int]:
    """The gateway (pid 1 in the container) and every descendant: host pid -> start time."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            ppid = _proc_status(int(name)).get("PPid")
            if ppid:
                parents[int(name)] = int(ppid)
    found = {gateway_pid}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return {pid: start for pid in found if (start := _start_time(pid)) is not None}


def request(method: str, path: str, who: tuple[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
    try:
        headers = {"Authorization": basic(*who)} if who else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()


def health() -> dict:
    status, body = request("GET", "/health")
    return json.loads(body) if status in (200, 503) and body else {}


def repo_url(who: tuple[str, str], dest: str) -> str:
    user = who[0].replace("/", "%2F")
    return f"rest:http://{user}:{who[1]}@127.0.0.1:{PORT}/{dest}/dokuwiki/{MODULE_UUID}/"


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


class UploadAcrossStop(threading.Thread):
    """A node's WebDAV PUT in flight when the gateway is told to stop: half the body
    first, the rest only once the gateway has logged that it is stopping."""

    def __init__(self, node: Node, path: str, body: bytes):
        super().__init__(daemon=True)
        self.node, self.path, self.body = node, path, body
        self.half_sent = threading.Event()
        self.status = 0

    def run(self) -> None:
        def chunks() -> Iterator[bytes]:
            yield self.body[: len(self.body) // 2]
            self.half_sent.set()
            deadline = time.monotonic() + 60
            while "stopping: no new connections" not in self.node.log_text():
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            time.sleep(0.5)
            yield self.body[len(self.body) // 2:]

        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=90)
        try:
            conn.request("PUT", self.path, body=chunks(), headers={
                "Authorization": basic(*NODE), "Content-Length": str(len(self.body))})
            self.status = conn.getresponse().status
        except OSError:
            self.status = -1
        finally:
            conn.close()


@pytest.fixture
def node(redis_server: RedisServer, tmp_path: Path) -> Iterator[Node]:
    assert shutil.which("podman"), "podman not installed (scripts/image-bootstrap.sh)"
    images = subprocess.run(["podman", "image", "exists", IMAGE], timeout=60)
    assert images.returncode == 0, f"no image {IMAGE}: run `make image` first"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("0.0.0.0", PORT))  # free, or the gateway could not listen

    client = redis_server.client()
    cluster = Cluster(client)
    cluster.flush()
    # A real Redis ACL user for the node, as on a cluster node (the agent environment's).
    client.acl_setuser(NODE[0], enabled=True, passwords=[f"+{NODE[1]}"], keys=["*"],
                       channels=["*"], commands=["+@all"])
    cluster.add_user(*NODE)
    cluster.add_user(*MODULE)
    cluster.set_module("dokuwiki1", MODULE_UUID, node_id=1)
    cluster.set_node_vpn(1, "10.5.4.1")
    cluster.set_network("10.5.4.0/24")
    cluster.add_destination(DEST, provider="cluster", url="webdav:http://10.5.4.1:4694",
                            name="local disk")

    runtime = tmp_path / "run"
    runtime.mkdir()
    name = f"rclone-gateway-test{os.getpid()}"
    volume = f"{name}-backup"
    (tmp_path / "core.env").write_text(f"RCLONE_IMAGE={IMAGE}\n")
    (tmp_path / "agent.env").write_text(
        f"NODE_ID=1\nREDIS_USER={NODE[0]}\nREDIS_PASSWORD={NODE[1]}\n"
        f"REDIS_REPLICA_ADDRESS=127.0.0.1:{redis_server.port}\nBACKUP_VOLUME={volume}\n")

    settings = unit_settings()
    specifiers = {"n": f"{name}.service", "N": name, "t": str(runtime)}
    env = {key: value for key, value in os.environ.items()
           if key in ("PATH", "HOME", "LANG", "CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF")}
    for assignment in settings.get("Environment", []):
        key, _, value = shlex.split(assignment)[0].partition("=")
        env[key] = expand(value, specifiers, env)
    files = {CORE_ENV: tmp_path / "core.env", AGENT_ENV: tmp_path / "agent.env"}
    for entry in settings["EnvironmentFile"]:
        path = entry.lstrip("-")
        if path in files:
            env.update(environment_file(files[path]))
        else:  # absent here: only an optional file may be
            assert entry.startswith("-"), f"the unit needs {path}, unknown to the test"

    log_path = tmp_path / "journal.log"
    log_path.touch()
    stat = log_path.stat()
    env["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify.sock"
    notify.bind(str(notify_path))
    notify_path.chmod(0o777)  # the gateway writes to it as uid 4694
    env["NOTIFY_SOCKET"] = str(notify_path)

    # The backup volume as the old gateway left it: root's.
    subprocess.run(["podman", "volume", "create", volume], env=env, check=True,
                   capture_output=True, timeout=60)
    mountpoint = Path(subprocess.run(
        ["podman", "volume", "inspect", "--format", "{{.Mountpoint}}", volume], env=env,
        check=True, capture_output=True, text=True, timeout=60).stdout.strip())
    (mountpoint / "older").mkdir()
    (mountpoint / "older" / "file").write_text("from the old gateway\n")

    node = Node(settings, specifiers, env, log_path, notify, cluster)
    try:
        yield node
    finally:
        subprocess.run(["podman", "rm", "--force", "--time=0", name], env=env,
                       capture_output=True, timeout=120)
        subprocess.run(["podman", "volume", "rm", "--force", volume], env=env,
                       capture_output=True, timeout=120)
        notify.close()
        client.acl_deluser(NODE[0])
        client.close()


def test_the_unit_runs_the_image(node: Node, tmp_path: Path) -> None:
    settings = node.settings
    assert settings["Type"] == ["notify"]

    # systemctl start: ExecStartPre, ExecStart, then READY=1 from inside the container.
    started = time.monotonic()
    node.run("ExecStartPre")
    start = node.argv("ExecStart")
    assert len(start) == 1 and start[0][:2] == ["/usr/bin/podman", "run"]
    assert IMAGE in start[0]
    node.run("ExecStart")
    node.notify.settimeout(seconds(settings["TimeoutStartSec"][0]))
    messages: list[str] = []
    while "READY=1" not in messages:
        try:
            messages += node.notify.recv(4096).decode().splitlines()
        except TimeoutError:
            pytest.fail(f"no READY=1 within TimeoutStartSec (got {messages}):\n"
                        f"{node.log_text()[-3000:]}")
    ready_after = time.monotonic() - started
    print(f"\nREADY=1 {ready_after:.1f} s after ExecStartPre began")
    status = health()
    assert status.get("status") == "ok", status
    assert status["destinations"][DEST]["served"] == "here", status

    # Who runs, where: uid 4694, the runtime directory a tmpfs, the volume handed over.
    cid = node.cidfile.read_text().strip()
    gateway_pid = int(node.podman("inspect", "--format", "{{.State.Pid}}", cid))
    processes = container_processes(gateway_pid)
    assert len(processes) >= 4, "the gateway and its rclone children"
    for pid in processes:
        uids = _proc_status(pid).get("Uid", "").split()
        assert uids and set(uids) == {str(UID)}, (pid, uids)
    mounts = Path(f"/proc/{gateway_pid}/mountinfo").read_text().splitlines()
    assert any(" /run/rclone-gateway " in m and " - tmpfs " in m for m in mounts)
    root = [m.split() for m in mounts if m.split()[4] == "/"]
    assert root and "ro" in root[-1][5].split(","), "the container's / is read-only"
    volume = Path(node.podman("volume", "inspect", "--format", "{{.Mountpoint}}",
                              node.env["BACKUP_VOLUME"]))
    for path in (volume, volume / "older", volume / "older" / "file"):
        assert (path.stat().st_uid, path.stat().st_gid) == (UID, UID), path

    # A module's restic backup and restore, through the container.
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"file{i}.bin").write_bytes(os.urandom(300_000))
    repo = repo_url(MODULE, DEST)
    restic(repo, "init")
    restic(repo, "backup", str(data))
    snapshots = json.loads(restic(repo, "snapshots", "--json").stdout)
    assert len(snapshots) == 1
    restic(repo, "restore", "latest", "--target", str(tmp_path / "out"))
    assert tree(tmp_path / "out" / data.relative_to("/")) == tree(data)
    stored = volume / "dokuwiki" / MODULE_UUID
    assert (stored / "config").is_file() and stored.stat().st_uid == UID

    # A node's WebDAV upload (as the node agent sends its cluster backup).
    body = os.urandom(100_000)
    path = f"/{DEST}/cluster/dump-{os.getpid()}.json.gz.gpg"
    assert request("MKCOL", f"/{DEST}/cluster/", NODE)[0] == 201
    assert request("PUT", path, NODE, body)[0] in (201, 204)
    assert request("GET", path, NODE) == (200, body)
    uploaded = volume / "cluster" / path.rsplit("/", 1)[1]
    assert uploaded.read_bytes() == body and uploaded.stat().st_uid == UID

    # systemctl reload: a destination added to Redis is served once ExecReload has run.
    (volume / "offsite").mkdir()
    os.chown(volume / "offsite", UID, UID)
    node.cluster.add_destination(
        NEW_DEST, provider="rclone", url="rclone:offsite", name="offsite",
        basepath="/srv/repo/offsite", rclone_conf=f"[{NEW_DEST}]\ntype = local\n")
    node.run("ExecReload")
    wait_for(lambda: health().get("destinations", {}).get(NEW_DEST, {}).get("state") == "ok",
             "the new destination to be served after the reload", 60)
    new_repo = repo_url(MODULE, NEW_DEST)
    restic(new_repo, "init")
    restic(new_repo, "backup", str(data))
    assert (volume / "offsite" / "dokuwiki" / MODULE_UUID / "config").is_file()
    processes = container_processes(gateway_pid)

    # systemctl stop: the unit's stop signal through podman, an upload in flight that
    # finishes after it; exit 0 within TimeoutStopSec.
    waiter = subprocess.Popen(["podman", "wait", cid], env=node.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    last = os.urandom(2_000_000)
    upload = UploadAcrossStop(node, f"/{DEST}/cluster/last-{os.getpid()}.json.gz.gpg", last)
    upload.start()
    assert upload.half_sent.wait(30)
    # /health counts itself among the requests in flight
    wait_for(lambda: health().get("inflight", 0) >= 2, "the upload to be in flight", 30)
    stopping = time.monotonic()
    node.run("ExecStop", timeout=seconds(settings["TimeoutStopSec"][0]) + 30)
    stop_took = time.monotonic() - stopping
    out, err = waiter.communicate(timeout=60)
    upload.join(30)
    assert upload.status in (201, 204), upload.status
    assert (volume / "cluster" / upload.path.rsplit("/", 1)[1]).read_bytes() == last
    node.run("ExecStopPost")
    print(f"stopped in {stop_took:.1f} s; podman wait: {out.strip()!r} {err.strip()!r}")
    assert stop_took < seconds(settings["TimeoutStopSec"][0])
    assert out.strip() == "0", (out, err, node.log_text()[-3000:])
    left = [pid for pid, start in processes.items() if _start_time(pid) == start]
    assert not left, f"processes of the container outlived it: {left}"
    log = node.log_text()
    assert "SIGHUP: re-reading Redis" in log
    assert "stopping: no new connections" in log and re.search(r"\bstopped\b", log)
    assert "Traceback" not in log, log[-3000:]
    assert node.podman("ps", "--all", "--quiet", "--filter", f"name=^{node.name}$") == ""
