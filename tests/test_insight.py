"""Backup insight end to end: what /metrics, /status and `rclone-gateway status` say after
real restic runs, after a restart, about a lock left behind, about free space, and the
status page in a real browser. Real redis-server, rclone children, restic, chromium.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from harness import (
    Cluster,
    GatewayProcess,
    RedisServer,
    fresh_cluster,
    restic,
    restic_process,
    running_gateway,
    send_request,
    wait_for,
)
from identities import MODULE_PASSWORD as PASSWORD
from identities import NODE

DEST = "1a5e0000-8f8b-4c43-a1d3-7f3f5f7c1a01"
MODULES = {  # user -> (module id, uuid)
    "module/traefik1": ("traefik1", "1a5e1111-2f87-4e7b-9a34-0a1d9f9e4b01"),
    "module/dokuwiki1": ("dokuwiki1", "1a5e2222-2f87-4e7b-9a34-0a1d9f9e4b02"),
    "module/mail1": ("mail1", "1a5e3333-2f87-4e7b-9a34-0a1d9f9e4b03"),
    "module/ldap1": ("ldap1", "1a5e4444-2f87-4e7b-9a34-0a1d9f9e4b04"),
}
REPO_ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = REPO_ROOT / "docs" / "status-page.png"


@dataclass
class Env:
    gateway: GatewayProcess
    cluster: Cluster
    workdir: Path

    def request(self, method: str, path: str, who: tuple[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=30)
        try:
            return send_request(conn, method, path, who, headers=headers)
        finally:
            conn.close()

    def status(self) -> dict:
        code, _, body = self.request("GET", "/status", NODE,
                                     headers={"Accept": "application/json"})
        assert code == 200, body
        return json.loads(body)

    def repo(self, user: str) -> dict:
        module_id, module_uuid = MODULES[user]
        for repo in self.status()["repositories"]:
            if repo["uuid"] == module_uuid:
                return repo
        raise AssertionError(f"{module_id} not in /status")

    def metric(self, name: str, module: str) -> float | None:
        _, _, body = self.request("GET", "/metrics")
        pattern = re.compile(
            rf'^{name}{{destination="{DEST}",module="{module}"}} (\S+)$', re.M)
        match = pattern.search(body.decode())
        return float(match.group(1)) if match else None

    def url(self, user: str) -> str:
        module_id, module_uuid = MODULES[user]
        app = re.sub(r"\d+$", "", module_id)
        return (f"rest:http://{user.replace('/', '%2F')}:{PASSWORD}@127.0.0.1:"
                f"{self.gateway.port}/{DEST}/{app}/{module_uuid}/")

    def stored_on_disk(self, user: str) -> int:
        module_id, module_uuid = MODULES[user]
        root = self.gateway.local_repo / re.sub(r"\d+$", "", module_id) / module_uuid
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, REDIS_USER=NODE[0], REDIS_PASSWORD=NODE[1])
        return subprocess.run(
            [sys.executable, "-m", "gateway", "status", "--url", self.gateway.url, *args],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def env(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("insight")
    with fresh_cluster(redis_server) as cluster:
        cluster.add_user(*NODE)
        for user, (module_id, module_uuid) in MODULES.items():
            cluster.add_user(user, PASSWORD)
            cluster.set_module(module_id, module_uuid)
        cluster.set_node_vpn(1, "10.5.4.1")
        cluster.add_destination(DEST, provider="cluster", url="webdav:http://10.5.4.1:4694",
                                name="local disk")
        with running_gateway(redis_server.url, workdir) as gateway:
            yield Env(gateway, cluster, workdir)


def backup(env: Env, user: str, tmp_path: Path, size: int = 200_000) -> dict:
    data = tmp_path / f"data-{MODULES[user][0]}"
    data.mkdir(exist_ok=True)
    (data / f"file-{time.monotonic_ns()}").write_bytes(os.urandom(size))
    restic(env.url(user), "init", check=False)  # may exist already
    restic(env.url(user), "backup", str(data))
    snapshots = json.loads(restic(env.url(user), "snapshots", "--json").stdout)
    return max(snapshots, key=lambda s: s["time"])


def restic_time(snapshot: dict) -> float:
    """restic's snapshot time (RFC 3339 with nanoseconds) as Unix time."""
    match = re.fullmatch(r"(.{19})(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", snapshot["time"])
    assert match, snapshot["time"]
    whole, fraction, zone = match.groups()
    stamp = f"{whole}.{(fraction or '0')[:6]}{zone.replace('Z', '+00:00')}"
    return datetime.fromisoformat(stamp).timestamp()


def test_figures_after_a_backup_agree_everywhere_and_come_back_after_a_restart(
        env: Env, tmp_path: Path) -> None:
    user = "module/ldap1"  # no other test backs it up
    snapshot = backup(env, user, tmp_path)
    # restic's time is the backup's start; the gateway sees the snapshot file at its end:
    # the gateway's time lies between the two (a loaded machine stretches the run)
    started, ended = restic_time(snapshot) - 1.0, time.time() + 1.0
    on_disk = env.stored_on_disk(user)
    # the scan after the backup is debounced: wait for it
    wait_for(lambda: env.repo(user)["stored_bytes"] == on_disk,
             lambda: f"stored bytes {env.repo(user)['stored_bytes']} == {on_disk} on disk", 60)
    repo = env.repo(user)
    assert started <= repo["last_snapshot_at"] <= ended, (repo, snapshot)
    assert repo["snapshots"] == 1 and repo["objects"]["snapshots"] == 1
    assert repo["uploaded_objects"] >= 4 and repo["uploaded_bytes"] > 0
    assert repo["module"] == "ldap1" and not repo["stale"]
    assert env.metric("rclone_gateway_repository_stored_bytes", "ldap1") == on_disk
    assert env.metric("rclone_gateway_last_snapshot_timestamp_seconds",
                      "ldap1") == repo["last_snapshot_at"]
    cli = env.cli("--json")
    assert cli.returncode == 0, cli.stderr
    from_cli = next(r for r in json.loads(cli.stdout)["repositories"]
                    if r["uuid"] == MODULES[user][1])
    assert (from_cli["stored_bytes"], from_cli["last_snapshot_at"]) == (
        on_disk, repo["last_snapshot_at"])
    table = env.cli()
    assert table.returncode == 0 and "ldap1" in table.stdout

    env.gateway.restart()
    env.gateway.proc.send_signal(signal.SIGUSR1)  # list the storage now (it does at start too)
    wait_for(lambda: any(r["uuid"] == MODULES[user][1] and r["stored_bytes"] == on_disk
                         for r in env.status()["repositories"]),
             lambda: f"the scan after the restart: {env.status()['repositories']}", 60)
    again = env.repo(user)
    # from the storage alone now: the snapshot file's time
    assert started <= again["last_snapshot_at"] <= ended, (again, snapshot)
    assert env.metric("rclone_gateway_repository_stored_bytes", "ldap1") == on_disk


def test_a_lock_left_by_a_killed_restic_ages_and_goes_when_the_node_removes_it(
        env: Env, tmp_path: Path) -> None:
    user = "module/mail1"
    backup(env, user, tmp_path, size=1000)
    proc = restic_process(env.url(user), "backup", "--stdin", "--stdin-filename", "big")
    try:
        assert proc.stdin is not None
        proc.stdin.write(os.urandom(1 << 20))
        proc.stdin.flush()
        wait_for(lambda: env.repo(user)["locks"] >= 1, "restic's lock", 60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    first = env.repo(user)["oldest_lock_age"]
    wait_for(lambda: env.repo(user)["oldest_lock_age"] >= first + 1.5,
             "the lock to age", 20)
    assert env.metric("rclone_gateway_repository_oldest_lock_age_seconds", "mail1") >= 1
    # the node removes the lock (restic unlock: its process is gone, so it is stale)
    node_url = env.url(user).replace(f"{user.replace('/', '%2F')}:{PASSWORD}",
                                     f"{NODE[0].replace('/', '%2F')}:{NODE[1]}")
    restic(node_url, "unlock")
    wait_for(lambda: env.repo(user)["locks"] == 0, "the lock to go", 20)
    assert env.metric("rclone_gateway_repository_oldest_lock_age_seconds", "mail1") == 0


def test_free_space_of_a_local_destination_is_that_of_its_disk(env: Env) -> None:
    wait_for(lambda: any(d["uuid"] == DEST and d["free_bytes"] is not None
                         for d in env.status()["destinations"]),
             lambda: f"the free space: {env.status()['destinations']}", 60)
    # the disk is measured around a listing asked for now: other writers on the machine
    # (a test run beside this one) move it between two readings
    before = os.statvfs(env.gateway.local_repo)
    # the listing runs under `nice`: a machine busy with other work makes it wait
    rescan = env.cli("--rescan", "--json", timeout=300)
    assert rescan.returncode == 0, rescan.stderr
    after = os.statvfs(env.gateway.local_repo)
    free = next(d for d in json.loads(rescan.stdout)["destinations"]
                if d["uuid"] == DEST)["free_bytes"]
    low, high = sorted(d.f_bavail * d.f_frsize for d in (before, after))
    assert 0.99 * low <= free <= 1.01 * high, (free, low, high)


def test_status_is_for_nodes_only(env: Env) -> None:
    user = "module/traefik1"
    assert env.request("GET", "/status", (user, PASSWORD))[0] == 403
    assert env.request("GET", "/status")[0] == 401


@pytest.mark.long(25)
def test_the_status_page_in_a_browser_marks_the_stale_repository(
        env: Env, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed (scripts/bootstrap.sh installs it)"
    for user in ("module/traefik1", "module/mail1"):
        backup(env, user, tmp_path, size=5000)
    # dokuwiki1 last backed up 30 h ago: its repository written straight to the disk,
    # as by a gateway that ran then, its snapshot time set back
    module_uuid = MODULES["module/dokuwiki1"][1]
    stale_repo = env.gateway.local_repo / "dokuwiki" / module_uuid
    data = tmp_path / "stale"
    data.mkdir()
    (data / "f").write_bytes(os.urandom(3000))
    restic(str(stale_repo), "init")
    restic(str(stale_repo), "backup", str(data))
    old = time.time() - 30 * 3600
    for snapshot in (stale_repo / "snapshots").iterdir():
        os.utime(snapshot, (old, old))
    # has the gateway list the storage, and waits for it (under `nice`: slow on a busy machine)
    rescan = env.cli("--rescan", "--json", timeout=300)
    assert rescan.returncode == 0, rescan.stderr
    assert any(r["uuid"] == module_uuid for r in json.loads(rescan.stdout)["repositories"])
    assert env.repo("module/dokuwiki1")["stale"]
    stale = env.cli("--stale", "26h")
    assert stale.returncode == 1 and "dokuwiki1" in stale.stderr, stale

    code, _, page = env.request("GET", "/status", NODE, headers={"Accept": "text/html"})
    assert code == 200
    html_file = tmp_path / "status.html"
    html_file.write_bytes(page)
    shot = tmp_path / "status.png"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'chromium'}"]
    dom = subprocess.run([*common, "--dump-dom", html_file.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rows = re.findall(r"<tr[^>]*>.*?</tr>", dom.stdout, re.S)
    stale_rows = [r for r in rows if "dokuwiki1" in r]
    assert stale_rows and 'class="warn"' in stale_rows[0] and "no snapshot in 26 h" in (
        stale_rows[0]) and "\u26a0" in stale_rows[0]
    for fresh in ("traefik1", "mail1"):
        row = next(r for r in rows if fresh in r)
        assert 'class="warn"' not in row
    result = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1100,520",
                             html_file.as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.stat().st_size > 10_000, result.stderr[-2000:]
    phone = tmp_path / "status-phone.png"
    result = subprocess.run([*common, f"--screenshot={phone}", "--window-size=390,844",
                             html_file.as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and phone.stat().st_size > 5_000
    if os.environ.get("UPDATE_DOCS_SCREENSHOT"):
        shutil.copy(shot, SCREENSHOT)
        shutil.copy(phone, SCREENSHOT.with_name("status-page-phone.png"))
    print(f"screenshots: {shot} {phone}")
