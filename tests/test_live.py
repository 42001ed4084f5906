"""Live configuration and fault tolerance: the gateway follows Redis without restarting,
reloads without dropping a request, and survives crashes of Redis, of its rclone
children and of itself. Real redis-server, rclone children and restic throughout.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    REST_ACCEPT,
    Cluster,
    GatewayProcess,
    RedisServer,
    basic,
    fresh_cluster,
    restic,
    stop_gateways,
    stop_process,
    wait_for,
)
from identities import DEST, NODE, NODE_ID, REMOTE_DEST, TRAEFIK, TRAEFIK_UUID

from backends.remote_check import RemoteHealth, error_summary, section_secrets

S3_SECRET = "s3-secret-Zq8Xv4Lm2Np7"
SFTP_PASSWORD = "sftp-password-Hq3Tb9"
MiB = 1024 * 1024
GATEWAY_ARGS = ["--shutdown-grace", "4", "--drain-grace", "120", "--remote-check-timeout", "3"]


# --------------------------------------------------------------------------- helpers


def get(gateway: GatewayProcess, path: str, who: tuple[str, str] | None = None, *,
        method: str = "GET", headers: dict[str, str] | None = None, body: bytes | None = None,
        rest: bool = False) -> tuple[int, bytes]:
    all_headers = dict(headers or {})
    if who is not None:
        all_headers["Authorization"] = basic(*who)
    if rest:
        all_headers["Accept"] = REST_ACCEPT
    conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def health(gateway: GatewayProcess) -> dict:
    status, body = get(gateway, "/health")
    document = json.loads(body)
    document["http_status"] = status
    return document


def backend_pids(gateway: GatewayProcess) -> dict[str, int]:
    return {name: b["pid"] for name, b in health(gateway)["backends"].items()}


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def make_data(directory: Path, total: int, file_size: int = 16 * MiB) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(total // file_size):
        (directory / f"blob{i:03d}.bin").write_bytes(os.urandom(file_size))
    return directory


def repo_url(gateway: GatewayProcess, who: tuple[str, str], app: str, module_uuid: str,
             dest: str = DEST) -> str:
    user = who[0].replace("/", "%2F")
    return f"rest:http://{user}:{who[1]}@{gateway.host}:{gateway.port}/{dest}/{app}/{module_uuid}/"


class Backup(threading.Thread):
    """`restic backup` in the background, throttled so that it lasts a known minimum time."""

    def __init__(self, repo: str, data: Path, limit_kib: int) -> None:
        super().__init__(daemon=True)
        self.repo = repo
        self.data = data
        self.limit_kib = limit_kib
        self.result = None
        self.finished_at: float | None = None

    def run(self) -> None:
        self.result = restic(self.repo, "--limit-upload", str(self.limit_kib), "backup",
                             str(self.data), check=False, timeout=600)
        self.finished_at = time.monotonic()

    def assert_clean(self) -> None:
        self.join(600)
        assert self.result is not None
        assert self.result.returncode == 0, self.result.stderr
        assert "retrying" not in self.result.stderr.lower(), self.result.stderr
        assert "error" not in self.result.stderr.lower(), self.result.stderr


def check_clean(repo: str) -> None:
    result = restic(repo, "check", "--read-data", timeout=600)
    assert "no errors were found" in result.stdout, result.stdout


def server_errors_in_log(gateway: GatewayProcess, since: int) -> list[str]:
    """Access log lines with a 5xx status written after byte offset `since`."""
    with open(gateway.log_path, "rb") as f:
        f.seek(since)
        text = f.read().decode("utf-8", "replace")
    bad = []
    for line in text.splitlines():
        _, sep, payload = line.partition("rclone_gateway.access ")
        if sep and json.loads(payload)["status"] >= 500:
            bad.append(payload)
    return bad


def log_size(gateway: GatewayProcess) -> int:
    return gateway.log_path.stat().st_size


class Traffic(threading.Thread):
    """Small requests in a loop on one keep-alive connection; every failure is kept."""

    def __init__(self, gateway: GatewayProcess, requests: list[tuple[str, str, bool]]) -> None:
        super().__init__(daemon=True)
        self.gateway = gateway
        self.requests = requests
        self.failures: list[str] = []
        self.count = 0
        self.stopping = threading.Event()

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.gateway.host, self.gateway.port, timeout=30)

    def run(self) -> None:
        conn = self._connect()
        while not self.stopping.is_set():
            for method, path, rest in self.requests:
                headers = {"Authorization": basic(*NODE), "Depth": "0"}
                if rest:
                    headers["Accept"] = REST_ACCEPT
                try:
                    conn.request(method, path, headers=headers)
                    response = conn.getresponse()
                    response.read()
                    if response.status >= 500:
                        self.failures.append(f"{method} {path}: {response.status}")
                    self.count += 1
                except (OSError, http.client.HTTPException) as exc:
                    self.failures.append(f"{method} {path}: {exc!r}")
                    conn.close()
                    conn = self._connect()
                    time.sleep(0.05)
        conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


# --------------------------------------------------------------------------- fixtures


@dataclass
class Live:
    redis: RedisServer
    cluster: Cluster
    gateway: GatewayProcess
    workdir: Path
    data: Path  # 256 MiB

    @property
    def data_96(self) -> Path:
        """96 MiB of the data, for shorter backups."""
        subset = self.workdir / "data-96"
        if not subset.exists():
            subset.mkdir()
            for source in sorted(self.data.iterdir())[:6]:
                os.link(source, subset / source.name)
        return subset

    def start_gateway(self, name: str, *extra: str) -> GatewayProcess:
        return GatewayProcess.start(self.redis.url, NODE_ID, self.workdir / name,
                                    extra_args=[*GATEWAY_ARGS, *extra])

    def local_destination(self, uuid: str, name: str) -> Path:
        directory = self.workdir / f"storage-{name}"
        directory.mkdir(exist_ok=True)
        self.cluster.add_destination(uuid, provider="rclone", url="rclone:local", name=name,
                                     basepath=str(directory),
                                     rclone_conf=f"[{uuid}]\ntype = local\n")
        return directory

    def reloads(self) -> int:
        return health(self.gateway)["reloads"]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One gateway for the tests that do not kill it, on a Redis of its own (it gets stopped)."""
    workdir = tmp_path_factory.mktemp("live")
    with RedisServer(workdir / "redis") as redis_server, \
            fresh_cluster(redis_server) as cluster:
        cluster.add_user(*NODE)
        cluster.add_user(*TRAEFIK)
        cluster.set_module("traefik1", TRAEFIK_UUID)
        cluster.set_node_vpn(1, "10.5.4.1")
        cluster.add_destination(DEST, provider="cluster", url="webdav:http://10.5.4.1:4694",
                                name="local")
        data = make_data(workdir / "data", 256 * MiB)
        live = Live(redis_server, cluster, None, workdir, data)  # type: ignore[arg-type]
        live.local_destination(REMOTE_DEST, "remote")
        live.gateway = live.start_gateway("gateway")
        try:
            yield live
        finally:
            stop_gateways(live.gateway)


# --------------------------------------------------------------------------- pure parts


def test_failed_remote_is_retried_with_growing_backoff() -> None:
    remotes = RemoteHealth(min_backoff=2, max_backoff=10)
    assert remotes.to_check({"a": "f1", "b": "f1"}, now=0) == ["a", "b"]
    remotes.record("a", "f1", None, now=0)
    remotes.record("b", "f1", "connection refused", now=0)
    assert remotes.failing() == {"b"}
    assert remotes.to_check({"a": "f1", "b": "f1"}, now=1) == []
    assert remotes.to_check({"a": "f1", "b": "f1"}, now=2) == ["b"]
    delays = []
    for attempt in range(2, 6):
        remotes.record("b", "f1", "connection refused", now=100)
        delays.append(remotes.verdicts["b"].retry_at - 100)
        assert remotes.verdicts["b"].attempts == attempt
    assert delays == [4, 8, 10, 10]
    # a changed configuration is checked at once, and starts its backoff afresh
    assert remotes.to_check({"a": "f1", "b": "f2"}, now=100) == ["b"]
    remotes.record("b", "f2", "still refused", now=100)
    assert remotes.verdicts["b"].attempts == 1
    remotes.keep_only({"a"})
    assert remotes.failing() == frozenset()


def test_remote_error_summary_names_the_cause_without_secrets() -> None:
    section = ["type = sftp", "host = 127.0.0.1", f"pass = {SFTP_PASSWORD}",
               "key_pem = -----BEGIN KEY-----", "endpoint = https://me:pw@host"]
    secrets = section_secrets(section)
    assert secrets == [SFTP_PASSWORD, "-----BEGIN KEY-----"]
    stderr = (
        "2026/11/26 08:56:46 NOTICE: a: No host key validation is being performed.\n"
        "2026/11/26 08:56:46 CRITICAL: Failed to create file system for \"x:\": NewFs: "
        f"couldn't connect SSH: dial tcp 127.0.0.1:1 as bob:{SFTP_PASSWORD}: refused"
        " (via https://me:pw@host)\n"
    )
    summary = error_summary(stderr, secrets)
    assert summary.startswith("Failed to create file system")
    assert "couldn't connect SSH: dial tcp 127.0.0.1:1" in summary
    assert SFTP_PASSWORD not in summary and "me:pw" not in summary
    assert "2026/11/26" not in summary


# --------------------------------------------------------------------------- live changes


def test_acl_change_applies_at_once_without_backend_restart(live: Live) -> None:
    # a reload an earlier test started may still be under way: let it end first
    settled = health(live.gateway)
    for _ in range(60):
        time.sleep(1.0)
        before = health(live.gateway)
        if before["reloads"] == settled["reloads"] and before["status"] == "ok":
            break
        settled = before
    else:
        raise AssertionError(f"the gateway kept reloading: {settled}")
    who = ("module/wiki7", "wiki7-secret")
    conn = http.client.HTTPConnection(live.gateway.host, live.gateway.port, timeout=5)

    def status() -> int:
        conn.request("PROPFIND", "/", headers={"Authorization": basic(*who), "Depth": "0"})
        response = conn.getresponse()
        response.read()
        return response.status

    assert status() == 401
    live.cluster.add_user(*who)
    live.cluster.set_module("wiki7", str(uuidlib.uuid4()))
    published = time.monotonic()
    live.cluster.publish("acl-changed")
    # A few tries, not a poll: repeated failures would be slowed down by the login throttle
    # and measure it instead of the configuration change. Usually the first one passes; the
    # later ones are margin for a loaded machine (the resync interval here is far longer).
    for at in (0.2, 0.6, 1.5, 3.0):
        time.sleep(max(0.0, published + at - time.monotonic()))
        if status() == 207:
            print(f"the new module authenticates {at} s after the event")
            break
    else:
        raise AssertionError("the new module could not authenticate 3 s after the event")
    conn.close()
    after = health(live.gateway)
    assert after["reloads"] == before["reloads"]
    assert {n: b["pid"] for n, b in after["backends"].items()} == {
        n: b["pid"] for n, b in before["backends"].items()}

    # SIGHUP re-reads Redis: a change nobody announced is picked up, no backend restarts
    quiet = ("module/wiki9", "wiki9-secret")
    live.cluster.add_user(*quiet)
    live.cluster.set_module("wiki9", str(uuidlib.uuid4()))
    live.cluster.remove_user(who[0])
    time.sleep(0.5)
    assert status_of(live, quiet) == 401 and status_of(live, who) == 207
    live.gateway.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: status_of(live, quiet) == 207, "SIGHUP to apply the quiet change", 3,
             interval=0.05)
    assert status_of(live, who) == 401
    assert backend_pids(live.gateway) == {
        n: b["pid"] for n, b in before["backends"].items()}
    live.cluster.remove_user(quiet[0])
    live.cluster.publish("acl-changed")


def new_repository(live: Live, module_uuid: str) -> str:
    """Gives traefik1 a new module uuid and initialises its repository."""
    live.cluster.set_module("traefik1", module_uuid)
    live.cluster.publish("acl-changed")
    config = f"/{DEST}/traefik/{module_uuid}/config"
    wait_for(lambda: get(live.gateway, config, TRAEFIK, method="HEAD", rest=True)[0] == 404,
             "the module's new uuid", 5, interval=0.05)
    repo = repo_url(live.gateway, TRAEFIK, "traefik", module_uuid)
    restic(repo, "init")
    return repo


def status_of(live: Live, who: tuple[str, str]) -> int:
    return get(live.gateway, "/", who, method="PROPFIND", headers={"Depth": "0"})[0]


def test_added_destination_is_served_and_broken_ones_do_not_stop_the_others(
        live: Live) -> None:
    gateway_pid = live.gateway.pid
    added = "a0a0a0a0-0000-4000-8000-00000000000a"
    sftp = "b0b0b0b0-0000-4000-8000-00000000000b"
    s3 = "c0c0c0c0-0000-4000-8000-00000000000c"
    bogus = "d0d0d0d0-0000-4000-8000-00000000000d"
    added_dir = live.local_destination(added, "added")
    obscured = subprocess.run([str(Path(sys.executable).parent / "rclone"), "obscure",
                               SFTP_PASSWORD], capture_output=True, text=True,
                              check=True).stdout.strip()
    live.cluster.add_destination(
        sftp, provider="rclone", url="rclone:sftp", name="unreachable", basepath="backups",
        rclone_conf=f"[{sftp}]\ntype = sftp\nhost = 127.0.0.1\nport = 1\nuser = bob\n"
                    f"pass = {obscured}\n")
    live.cluster.add_destination(
        s3, provider="aws", url="s3:127.0.0.1:1/bucket/path", name="bad endpoint",
        rclone_conf=f"[{s3}]\ntype = s3\nprovider = Other\naccess_key_id = AKIAEXAMPLE\n"
                    f"secret_access_key = {S3_SECRET}\nendpoint = http://127.0.0.1:1\n")
    live.cluster.add_destination(bogus, provider="rclone", url="rclone:x", basepath="x",
                                 name="no such type", rclone_conf=f"[{bogus}]\ntype = nosuch\n")
    try:
        live.cluster.publish("backup-destination-changed")

        def settled() -> dict | None:
            document = health(live.gateway)
            destinations = document["destinations"]
            if destinations.get(added, {}).get("state") != "ok":
                return None
            if any(destinations.get(u, {}).get("state") != "error" for u in (sftp, s3, bogus)):
                return None
            return document

        document = wait_for(settled, "the new destinations to settle", 30)
        assert document["status"] == "ok" and document["http_status"] == 200
        destinations = document["destinations"]
        assert "connect" in destinations[sftp]["error"], destinations[sftp]
        assert "127.0.0.1:1" in destinations[s3]["error"], destinations[s3]
        assert "nosuch" in destinations[bogus]["error"], destinations[bogus]

        # the new destination, and those served before, are served
        assert get(live.gateway, f"/{added}/meta.json", NODE, method="PUT",
                   body=b"{}")[0] in (200, 201, 204)
        assert (added_dir / "meta.json").read_bytes() == b"{}"
        assert get(live.gateway, f"/{REMOTE_DEST}/", NODE, method="PROPFIND",
                   headers={"Depth": "1"})[0] == 207
        assert get(live.gateway, f"/{DEST}/", NODE, method="PROPFIND",
                   headers={"Depth": "1"})[0] == 207
        assert get(live.gateway, f"/{added}/_probe_rest_404")[0] == 404
        for broken in (sftp, s3, bogus):
            assert get(live.gateway, f"/{broken}/_probe_rest_404")[0] == 503
            assert get(live.gateway, f"/{broken}/x.json", NODE)[0] == 503

        # the broken ones are retried, with growing delays
        wait_for(lambda: health(live.gateway)["destinations"][sftp].get("attempts", 0) >= 2,
                 "a second check of the unreachable remote", 20)

        # once its configuration is fixed, a broken destination is served too
        fixed_dir = live.workdir / "storage-fixed"
        fixed_dir.mkdir()
        live.cluster.add_destination(bogus, provider="rclone", url="rclone:x", name="fixed",
                                     basepath=str(fixed_dir),
                                     rclone_conf=f"[{bogus}]\ntype = local\n")
        live.cluster.publish("backup-destination-changed")
        wait_for(lambda: health(live.gateway)["destinations"][bogus]["state"] == "ok",
                 "the fixed destination to be served", 20)
        assert get(live.gateway, f"/{bogus}/x.json", NODE, method="PUT",
                   body=b"1")[0] in (200, 201, 204)
        assert (fixed_dir / "x.json").read_bytes() == b"1"

        text = json.dumps(health(live.gateway)) + live.gateway.log_text()
        for secret in (S3_SECRET, obscured, SFTP_PASSWORD, "AKIAEXAMPLE"):
            assert secret not in text
        assert live.gateway.pid == gateway_pid and live.gateway.proc.poll() is None
    finally:
        for uuid in (added, sftp, s3, bogus):
            live.cluster.remove_destination(uuid)
        live.cluster.publish("backup-destination-changed")
    wait_for(lambda: set(health(live.gateway)["destinations"]) == {DEST, REMOTE_DEST},
             "the extra destinations to go", 20)


@pytest.mark.long(45)
def test_backup_runs_through_20_destination_changes_and_sighups(live: Live) -> None:
    """256 MiB, throttled to at least 36 s, while the destinations change 20 times."""
    module_uuid = str(uuidlib.uuid4())
    repo = new_repository(live, module_uuid)
    offset = log_size(live.gateway)
    (live.gateway.local_repo / "probe.bin").write_bytes(b"x" * 1000)
    (live.workdir / "storage-remote" / "probe.bin").write_bytes(b"y" * 1000)
    traffic = Traffic(live.gateway, [
        ("GET", f"/{DEST}/probe.bin", False),
        ("GET", f"/{REMOTE_DEST}/probe.bin", False),
        ("PROPFIND", f"/{DEST}/", False),
        ("HEAD", f"/{DEST}/traefik/{module_uuid}/config", True),
    ])
    extra = "e0e0e0e0-0000-4000-8000-00000000000e"
    backup = Backup(repo, live.data, limit_kib=7 * 1024)
    start_reloads = live.reloads()
    backup.start()
    traffic.start()
    try:
        time.sleep(1)
        for change in range(20):
            before = live.reloads()
            if change % 2 == 0:
                live.local_destination(extra, f"extra{change}")
            else:
                live.cluster.remove_destination(extra)
            live.cluster.publish("backup-destination-changed")
            if change % 5 == 4:
                live.gateway.proc.send_signal(signal.SIGHUP)
            wait_for(lambda b=before: live.reloads() > b, f"reload {change + 1}", 30, interval=0.05)
        changes_done = time.monotonic()
        assert backup.is_alive(), "the backup ended before the changes did: test is void"
    finally:
        traffic.stop()
        backup.join(600)
        live.cluster.remove_destination(extra)
        live.cluster.publish("backup-destination-changed")
    assert backup.finished_at is not None and backup.finished_at > changes_done
    backup.assert_clean()
    assert live.reloads() - start_reloads >= 20
    assert traffic.count > 100 and traffic.failures == []
    assert server_errors_in_log(live.gateway, offset) == []
    check_clean(repo)
    wait_for(lambda: len(live.gateway.rclone_serve_pids()) == 3,
             "old generations to be stopped", 30)
    live.cluster.set_module("traefik1", TRAEFIK_UUID)
    live.cluster.publish("acl-changed")


@pytest.mark.long(20)
def test_backup_survives_redis_stopped_for_10s(live: Live) -> None:
    module_uuid = str(uuidlib.uuid4())
    repo = new_repository(live, module_uuid)
    offset = log_size(live.gateway)
    backup = Backup(repo, live.data_96, limit_kib=6 * 1024)  # 96 MiB: 16 s at least
    backup.start()
    redis_pid = live.redis.proc.pid
    time.sleep(2)
    stop_process(redis_pid)
    stopped = time.monotonic()
    try:
        document = wait_for(lambda: (
            d if (d := health(live.gateway))["status"] == "degraded" else None),
            "health to say degraded", 8, interval=0.2)
        assert document["http_status"] == 200 and document["redis"]["connected"] is False
        # still serving, with the configuration it had
        assert status_of(live, NODE) == 207
        time.sleep(max(0.0, 10 - (time.monotonic() - stopped)))
        assert backup.is_alive(), "the backup ended before Redis came back: test is void"
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    wait_for(lambda: health(live.gateway)["status"] == "ok", "health to say ok again", 15,
             interval=0.2)
    # events are followed again
    who = ("module/wiki8", "wiki8-secret")
    live.cluster.add_user(*who)
    live.cluster.set_module("wiki8", str(uuidlib.uuid4()))
    live.cluster.publish("acl-changed")
    wait_for(lambda: status_of(live, who) == 207, "an event after the pause", 5, interval=0.05)
    backup.assert_clean()
    assert server_errors_in_log(live.gateway, offset) == []
    check_clean(repo)
    live.cluster.remove_user(who[0])
    live.cluster.set_module("traefik1", TRAEFIK_UUID)
    live.cluster.publish("acl-changed")


@pytest.mark.long(20)
def test_killed_children_are_restarted_during_a_backup(live: Live) -> None:
    module_uuid = str(uuidlib.uuid4())
    repo = new_repository(live, module_uuid)
    backup = Backup(repo, live.data_96, limit_kib=8 * 1024)  # 96 MiB: 12 s at least
    backup.start()
    time.sleep(2)
    for name in ("restic-append-only", "restic", "webdav"):
        old = backend_pids(live.gateway)[name]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda n=name, o=old: (
            (b := health(live.gateway)["backends"][n])["state"] == "running"
            and b["pid"] not in (None, o)), f"{name} to be restarted", 15)
        time.sleep(1)
    assert backup.is_alive(), "the backup ended before the kills did: test is void"
    backup.join(600)
    assert backup.result is not None and backup.result.returncode == 0, backup.result.stderr
    check_clean(repo)
    assert all(b["restarts"] >= 1 for b in health(live.gateway)["backends"].values())
    assert status_of(live, NODE) == 207
    live.cluster.set_module("traefik1", TRAEFIK_UUID)
    live.cluster.publish("acl-changed")


# --------------------------------------------------------------------------- stopping


class Upload(threading.Thread):
    """A restic object POSTed over a raw socket at a bounded rate."""

    def __init__(self, gateway: GatewayProcess, module_uuid: str, size: int, rate: int) -> None:
        super().__init__(daemon=True)
        self.block = os.urandom(MiB)
        self.size = size
        self.rate = rate
        digest = hashlib.sha256()
        for _ in range(size // MiB):
            digest.update(self.block)
        self.object_id = digest.hexdigest()
        self.path = f"/{DEST}/traefik/{module_uuid}/data/{self.object_id}"
        self.gateway = gateway
        self.sent = 0
        self.status: int | None = None
        self.error: str | None = None
        self.started = threading.Event()

    def run(self) -> None:
        head = (f"POST {self.path} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: {basic(*TRAEFIK)}\r\nAccept: {REST_ACCEPT}\r\n"
                f"Content-Length: {self.size}\r\n\r\n").encode()
        try:
            with socket.create_connection((self.gateway.host, self.gateway.port),
                                          timeout=30) as sock:
                sock.sendall(head)
                self.started.set()
                began = time.monotonic()
                while self.sent < self.size:
                    sock.sendall(self.block)
                    self.sent += len(self.block)
                    ahead = self.sent / self.rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
                reply = sock.recv(4096)
                self.status = int(reply.split()[1]) if reply else 0
        except OSError as exc:
            self.error = repr(exc)
            self.started.set()

    def stored(self, repo_dir: Path, module_uuid: str) -> list[Path]:
        data = repo_dir / "traefik" / module_uuid / "data"
        return [p for p in data.rglob(f"*{self.object_id}*") if p.is_file()]

    def digest_of(self, path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(MiB):
                digest.update(chunk)
        return digest.hexdigest()


@pytest.mark.serial  # the exit within 7 s of SIGTERM with a 4 s grace
def test_sigterm_finishes_in_flight_within_grace_and_leaves_no_partial_object(
        live: Live) -> None:
    gateway = live.start_gateway("sigterm")
    try:
        module_uuid = TRAEFIK_UUID
        assert get(gateway, f"/{DEST}/traefik/{module_uuid}/?create=true", TRAEFIK,
                   method="POST", rest=True)[0] == 200
        slow = Upload(gateway, module_uuid, 256 * MiB, rate=16 * MiB)  # 16 s: cannot finish
        quick = Upload(gateway, module_uuid, 16 * MiB, rate=8 * MiB)  # 2 s: finishes
        # a client that keeps sending requests on its keep-alive connection, and an idle one
        busy = Traffic(gateway, [("PROPFIND", f"/{DEST}/", False)])
        idle = http.client.HTTPConnection(gateway.host, gateway.port, timeout=30)
        idle.request("PROPFIND", "/", headers={"Authorization": basic(*NODE), "Depth": "0"})
        idle.getresponse().read()
        children = gateway.rclone_serve_pids()
        assert len(children) == 3
        slow.start()
        slow.started.wait(10)
        time.sleep(1)
        quick.start()
        busy.start()
        quick.started.wait(10)
        time.sleep(0.5)
        assert slow.sent < slow.size
        signalled = time.monotonic()
        code = gateway.stop(signal.SIGTERM, timeout=30)
        took = time.monotonic() - signalled
        busy.stop()
        slow.join(30)
        quick.join(30)
        assert code == 0, gateway.log_text()[-3000:]
        # the grace covers cutting what is left and stopping the children; slack for load
        assert took < 4 + 3, f"exited {took:.1f} s after SIGTERM with a 4 s grace"
        assert gateway.leftover_pids == [], "rclone children outlived the gateway"
        assert not any(running(pid) for pid in children)
        assert quick.status == 200, (quick.status, quick.error)
        [stored] = quick.stored(gateway.local_repo, module_uuid)
        assert quick.digest_of(stored) == quick.object_id
        assert slow.status != 200
        assert slow.stored(gateway.local_repo, module_uuid) == [], "partial object left"
        assert busy.count > 0
    finally:
        gateway.stop(signal.SIGKILL, timeout=10)
        gateway.kill_leftovers()


def post_object(gateway: GatewayProcess, module_uuid: str, content: bytes) -> list[int]:
    """POSTs a restic object as traefik1 the way restic does: again after a 5xx (3 tries)."""
    object_id = hashlib.sha256(content).hexdigest()
    statuses = []
    for _ in range(3):
        statuses.append(get(gateway, f"/{DEST}/traefik/{module_uuid}/data/{object_id}",
                            TRAEFIK, method="POST", body=content, rest=True)[0])
        if statuses[-1] < 500:
            break
    return statuses


def test_partial_object_left_by_a_crash_does_not_block_the_retry(live: Live) -> None:
    module_uuid = str(uuidlib.uuid4())
    new_repository(live, module_uuid)
    content = os.urandom(3 * MiB)
    object_id = hashlib.sha256(content).hexdigest()
    stored = live.gateway.local_repo / "traefik" / module_uuid / "data" / object_id[:2] / object_id
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_bytes(content[: MiB])  # what a backend killed mid-upload leaves behind
    try:
        assert post_object(live.gateway, module_uuid, content) == [503, 200]
        assert stored.read_bytes() == content
        # a complete object stays: the same bytes again are a retry, answered without a write;
        # other bytes under its name are refused
        before = stored.stat()
        assert post_object(live.gateway, module_uuid, content) == [200]
        path = f"/{DEST}/traefik/{module_uuid}/data/{object_id}"
        assert get(live.gateway, path, TRAEFIK, method="POST", body=b"other" + content,
                   rest=True)[0] == 403
        assert stored.read_bytes() == content
        assert (stored.stat().st_ino, stored.stat().st_mtime_ns) == (
            before.st_ino, before.st_mtime_ns)
    finally:
        live.cluster.set_module("traefik1", TRAEFIK_UUID)
        live.cluster.publish("acl-changed")


def test_sigkill_of_the_gateway_leaves_no_rclone_and_blocks_no_retry(live: Live) -> None:
    live.cluster.set_module("traefik1", TRAEFIK_UUID)
    gateway = live.start_gateway("sigkill")
    try:
        module_uuid = TRAEFIK_UUID
        assert get(gateway, f"/{DEST}/traefik/{module_uuid}/?create=true", TRAEFIK,
                   method="POST", rest=True)[0] == 200
        children = gateway.rclone_serve_pids()
        assert len(children) == 3
        upload = Upload(gateway, module_uuid, 64 * MiB, rate=16 * MiB)
        upload.start()
        upload.started.wait(10)
        time.sleep(1.5)
        assert upload.stored(gateway.local_repo, module_uuid), "upload not under way"
        gateway.stop(signal.SIGKILL, timeout=10)
        assert gateway.leftover_pids == [], "rclone children outlived the gateway"
        assert not any(running(pid) for pid in children)
        upload.join(30)
        # restarted, the gateway takes the same object again, whatever the crash left
        gateway.restart()
        content = upload.block * (upload.size // MiB)
        assert post_object(gateway, module_uuid, content)[-1] == 200
        [stored] = upload.stored(gateway.local_repo, module_uuid)
        assert upload.digest_of(stored) == upload.object_id
    finally:
        gateway.stop(signal.SIGKILL, timeout=10)
        gateway.kill_leftovers()
