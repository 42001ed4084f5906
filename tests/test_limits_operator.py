"""The operator's side of the limits: `rclone-gateway limits set` and `limits show`,
`explain` naming the quota and the cap a request meets, the Prometheus families, and the
status page marking a repository over 80 % of its quota. Real redis-server and rclone.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    Cluster,
    GatewayProcess,
    RedisServer,
    free_port,
    fresh_cluster,
    running_gateway,
    send_request,
    wait_for,
)
from identities import NODE
from prometheus_client.parser import text_string_to_metric_families

DEST = "4c1e0000-8f8b-4c43-a1d3-7f3f5f7c1a07"
MODULE = ("module/nextcloud1", "limits-module-secret")
MODULE_UUID = "4c1e1111-2f87-4e7b-9a34-0a1d9f9e4b07"
BASE = f"/{DEST}/nextcloud/{MODULE_UUID}"
REST = {"Accept": "application/vnd.x.restic.rest.v2"}
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Env:
    gateway: GatewayProcess
    cluster: Cluster
    redis_url: str

    def request(self, method: str, path: str, who: tuple[str, str] | None = None,
                body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=30)
        try:
            return send_request(conn, method, path, who, body=body, headers=headers)
        finally:
            conn.close()

    def limits(self) -> dict:
        code, _, body = self.request("GET", "/status", NODE, headers={"Accept": "application/json"})
        assert code == 200, body
        return json.loads(body)["limits"]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        # the node agent's environment: its Redis user is its gateway user
        redis_url = self.redis_url.replace("redis://", "redis://default:@")
        env = dict(os.environ, REDIS_USER=NODE[0], REDIS_PASSWORD=NODE[1], REDIS_URL=redis_url)
        return subprocess.run([sys.executable, "-m", "gateway", *args], env=env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=60)

    def upload(self, size: int) -> int:
        body = os.urandom(size)
        path = f"{BASE}/data/{hashlib.sha256(body).hexdigest()}"
        return self.request("POST", path, MODULE, body=body, headers=REST)[0]


@pytest.fixture
def env(redis_server: RedisServer, tmp_path: Path) -> Iterator[Env]:
    with fresh_cluster(redis_server) as cluster:
        cluster.add_user(*NODE)
        cluster.add_user(*MODULE)
        cluster.set_module("nextcloud1", MODULE_UUID)
        cluster.set_node_vpn(1, "10.5.4.1")
        cluster.add_destination(DEST, provider="cluster", url="webdav:http://10.5.4.1:4694")
        with running_gateway(redis_server.url, tmp_path) as gateway:
            yield Env(gateway, cluster, redis_server.url)


def quota_entry(env: Env) -> dict:
    """The module's entry in /status; empty while the gateway knows neither quota nor use."""
    return next((q for q in env.limits()["quotas"] if q["module"] == "nextcloud1"),
                {"quota_bytes": None, "used_bytes": None, "level_percent": 0})


def test_limits_set_writes_the_keys_the_gateway_applies_and_show_prints_them(env: Env) -> None:
    assert env.request("POST", f"{BASE}/?create=true", MODULE, headers=REST)[0] == 200
    for args in (("quota", DEST, "nextcloud1", "10K"), ("bwlimit", "module/nextcloud1/upload",
                                                           "00:00,4M 12:00,4M"),
                 ("concurrency", "node", "3")):
        done = env.cli("limits", "set", *args)
        assert done.returncode == 0, done.stderr
    redis = env.cluster.r
    assert redis.hget(f"rclone-gateway/quota/{DEST}", "nextcloud1") == "10K"
    assert redis.hget("rclone-gateway/bwlimit", "module/nextcloud1/upload") == "00:00,4M 12:00,4M"
    assert redis.hget("rclone-gateway/concurrency", "node") == "3"
    # the gateway applied them, announced by the command's event (the periodic re-read is
    # a minute away)
    wait_for(lambda: env.limits()["concurrency"]["node_cap"] == 3, "the node cap")
    limits = env.limits()
    assert limits["bandwidth"]["module/nextcloud1/upload"]["rate_now"] == 4 << 20
    wait_for(lambda: quota_entry(env)["quota_bytes"] == 10240, "the quota")

    assert env.upload(6000) == 200
    wait_for(lambda: quota_entry(env)["used_bytes"] == 6000, "the upload counted")
    shown = env.cli("limits", "show", "--url", env.gateway.url)
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if "nextcloud1" in line
               and DEST in line)
    assert "5.9 KiB" in row and "10.0 KiB" in row and "58 %" in row, shown.stdout
    assert "module/nextcloud1/upload" in shown.stdout and "4.0 MiB/s" in shown.stdout
    assert "per node user: 3" in shown.stdout

    # a value that does not parse is refused before anything is written
    bad = env.cli("limits", "set", "bwlimit", "upload", "10X")
    assert bad.returncode == 2 and "not a size" in bad.stderr
    assert redis.hget("rclone-gateway/bwlimit", "upload") is None
    assert env.cli("limits", "set", "concurrency", "module", "0").returncode == 2
    assert env.cli("limits", "set", "quota", DEST, "nextcloud1").returncode == 2
    # `none` removes a field
    assert env.cli("limits", "set", "concurrency", "node", "none").returncode == 0
    assert redis.hget("rclone-gateway/concurrency", "node") is None
    wait_for(lambda: env.limits()["concurrency"]["node_cap"] is None, "the node cap removed")
    # a port nothing listens on: free_port() hands it to no other test either (the port
    # after the gateway's was handed to the next gateway of the suite, in parallel)
    down = env.cli("limits", "show", "--url", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 3


def test_explain_says_when_a_quota_or_a_cap_would_refuse(env: Env) -> None:
    assert env.request("POST", f"{BASE}/?create=true", MODULE, headers=REST)[0] == 200
    env.cluster.r.hset(f"rclone-gateway/quota/{DEST}", "nextcloud1", "8000")
    env.cluster.publish("backup-limits-changed")
    wait_for(lambda: quota_entry(env)["quota_bytes"] == 8000, "the quota")
    assert env.upload(5000) == 200
    wait_for(lambda: quota_entry(env)["used_bytes"] == 5000, "the upload counted")
    path = f"{BASE}/data/{'ab' * 32}"
    common = ("explain", "--user", MODULE[0], "--method", "POST", "--rest", "--path", path,
              "--url", env.gateway.url)
    over = env.cli(*common, "--size", "4000")
    assert over.returncode == 1, over.stdout + over.stderr
    assert "quota: 8000 bytes; the repository holds 5000 bytes" in over.stdout
    assert "answer: 507" in over.stdout
    fits = env.cli(*common, "--size", "2000")
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert "in flight: at most 8 requests of module/nextcloud1 at once" in fits.stdout
    # and the gateway answers what explain said
    assert env.upload(4000) == 507
    assert env.upload(2000) == 200
    # a lock is never refused, and explain does not pretend it would be
    lock = env.cli("explain", "--user", MODULE[0], "--method", "POST", "--rest", "--path",
                   f"{BASE}/locks/{'cd' * 32}", "--size", "100000", "--url", env.gateway.url)
    assert lock.returncode == 0 and "quota" not in lock.stdout


def test_metrics_and_the_status_page_show_a_quota_crossed(env: Env) -> None:
    assert env.request("POST", f"{BASE}/?create=true", MODULE, headers=REST)[0] == 200
    env.cluster.r.hset(f"rclone-gateway/quota/{DEST}", "nextcloud1", "10000")
    env.cluster.r.hset("rclone-gateway/bwlimit", "download", "64M")
    env.cluster.publish("backup-limits-changed")
    wait_for(lambda: quota_entry(env)["quota_bytes"] == 10000, "the quota")
    assert env.upload(8500) == 200  # 85 %
    wait_for(lambda: quota_entry(env)["level_percent"] == 80, "the 80 % crossing")
    assert "quota: module nextcloud1 holds" in env.gateway.log_text()

    _, _, body = env.request("GET", "/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode())
               for s in family.samples}
    where = (("destination", DEST), ("module", "nextcloud1"))
    assert samples[("rclone_gateway_quota_bytes", where)] == 10000
    assert samples[("rclone_gateway_quota_used_bytes", where)] == 8500
    assert samples[("rclone_gateway_quota_level_percent", where)] == 80
    assert samples[("rclone_gateway_quota_crossings_total", (("level", "80"),))] == 1
    assert samples[("rclone_gateway_bandwidth_limit_bytes_per_second",
                    (("direction", "download"), ("scope", "gateway")))] == 64 << 20

    _, _, page = env.request("GET", "/status", NODE, headers={"Accept": "text/html"})
    text = page.decode()
    assert "over 80 % of quota" in text and "85 % of 9.8 KiB" in text, text


def test_the_count_follows_webdav_writes_and_deletes_without_a_quota(env: Env) -> None:
    """No quota key: a Restic REST DELETE and a WebDAV write into a repository have it
    listed again, and the count follows the storage."""
    assert env.request("POST", f"{BASE}/?create=true", MODULE, headers=REST)[0] == 200
    body = os.urandom(7000)
    object_path = f"{BASE}/data/{hashlib.sha256(body).hexdigest()}"
    assert env.request("POST", object_path, MODULE, body=body, headers=REST)[0] == 200
    wait_for(lambda: quota_entry(env)["used_bytes"] == 7000, "the upload counted", 30)

    note = os.urandom(3000)  # a node's file beside the restic layout, through WebDAV
    assert env.request("PUT", f"{BASE}/notes.bin", NODE, body=note)[0] in (200, 201, 204)
    wait_for(lambda: quota_entry(env)["used_bytes"] == 10000, "the WebDAV write counted", 30)

    assert env.request("DELETE", object_path, NODE, headers=REST)[0] in (200, 204)
    wait_for(lambda: quota_entry(env)["used_bytes"] == 3000, "the delete counted", 30)
    on_disk = sum(f.stat().st_size for f in
                  (env.gateway.local_repo / "nextcloud" / MODULE_UUID).rglob("*") if f.is_file())
    assert on_disk == 3000
