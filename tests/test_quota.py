"""Storage quotas end to end (issue 13): a module over its quota gets 507 before its body
is read and nothing is stored, while its locks, its reads and the node's retention always
run; the usage /status reports is the bytes on disk, kept current by uploads and deletes
and found again after a restart. Real redis-server, rclone children, restic; no mocks.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
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
    running_gateway,
    send_request,
    wait_for,
)
from identities import MODULE_PASSWORD as PASSWORD
from identities import NODE

from gateway.access.repository import RepositoryKey
from gateway.insight.scan import Layout, Scanner
from gateway.limits.quota import UsageBook

REPO_ROOT = Path(__file__).resolve().parent.parent

DEST = "9b0e7a11-8f8b-4c43-a1d3-7f3f5f7c1a01"
MODULES = {  # module id -> uuid of its own repository
    "traefik1": "9b0e1111-2f87-4e7b-9a34-0a1d9f9e4b01",
    "dokuwiki1": "9b0e2222-2f87-4e7b-9a34-0a1d9f9e4b02",
    "mail1": "9b0e3333-2f87-4e7b-9a34-0a1d9f9e4b03",
}
QUOTA_KEY = f"rclone-gateway/quota/{DEST}"
APPLY_TIMEOUT = 30.0  # an event applies at once; the periodic re-read alone takes 60 s
SETTLE_TIMEOUT = 30.0  # the debounced listing after a backup, on a loaded machine


def module_user(module: str) -> tuple[str, str]:
    return f"module/{module}", PASSWORD


def app_of(module: str) -> str:
    return re.sub(r"\d+$", "", module)


@dataclass
class Env:
    gateway: GatewayProcess
    cluster: Cluster

    # --- HTTP ------------------------------------------------------------------------------

    def request(self, method: str, path: str, who: tuple[str, str] | None = None, *,
                headers: dict[str, str] | None = None, body: bytes | None = None,
                rest: bool = False) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=30)
        try:
            return send_request(conn, method, path, who, headers=headers, body=body, rest=rest)
        finally:
            conn.close()

    def base(self, module: str) -> str:
        return f"/{DEST}/{app_of(module)}/{MODULES[module]}"

    def post(self, who: tuple[str, str], module: str, kind: str,
             content: bytes) -> tuple[int, str]:
        """POSTs a restic object named by its SHA-256 into `module`'s repository."""
        object_id = hashlib.sha256(content).hexdigest()
        status, _, body = self.request("POST", f"{self.base(module)}/{kind}/{object_id}", who,
                                       body=content, rest=True)
        assert status != 400, body  # a name that does not match would be refused so
        return status, object_id

    def create(self, module: str, config: bytes) -> None:
        """The module makes its repository and uploads its config, as `restic init` does."""
        who = module_user(module)
        status, _, body = self.request("POST", f"{self.base(module)}/?create=true", who, rest=True)
        assert status == 200, body
        status, _, body = self.request("POST", f"{self.base(module)}/config", who, body=config,
                                       rest=True)
        assert status == 200, body

    # --- what the gateway says -------------------------------------------------------------

    def status(self) -> dict:
        code, _, body = self.request("GET", "/status", NODE, headers={"Accept": "application/json"})
        assert code == 200, body
        return json.loads(body)

    def quota_entry(self, module: str) -> dict | None:
        """The module repository's entry in /status "limits" "quotas" (None: not there)."""
        limits = self.status().get("limits")
        if not isinstance(limits, dict):
            return None
        repository = self.base(module)
        for entry in limits.get("quotas", []):
            if entry.get("repository") == repository:
                return entry
        return None

    def wait_listed_after(self, module: str, since: float) -> None:
        """Until the storage scan listed the repository after `since` (wall clock): the
        listing a snapshot upload has the gateway make a few seconds later."""
        def scanned_at() -> object:
            return next((r["scanned_at"] for r in self.status()["repositories"]
                         if r["uuid"] == MODULES[module]), None)
        wait_for(lambda: (scanned_at() or 0) > since,
                 lambda: f"a listing of {module} after {since}: scanned at {scanned_at()}",
                 SETTLE_TIMEOUT)

    def set_quota(self, fields: Mapping[str, str]) -> None:
        """Writes the destination's quota hash and announces it, as the cluster does."""
        pipe = self.cluster.r.pipeline(transaction=True)
        pipe.delete(QUOTA_KEY)
        pipe.hset(QUOTA_KEY, mapping=dict(fields))
        pipe.execute()
        self.cluster.publish("backup-limits-changed")

    def wait_quota(self, expected: Mapping[str, int]) -> None:
        """Until /status shows each module's repository with the quota given."""
        def shown() -> dict[str, object]:
            return {m: (e or {}).get("quota_bytes") for m in expected
                    for e in [self.quota_entry(m)]}
        wait_for(lambda: shown() == dict(expected),
                 lambda: f"the quotas {dict(expected)} in /status, got {shown()} "
                         f"(limits: {self.status().get('limits')})", APPLY_TIMEOUT)

    # --- the storage -----------------------------------------------------------------------

    def repo_dir(self, module: str) -> Path:
        return self.gateway.local_repo / app_of(module) / MODULES[module]

    def files(self, module: str) -> dict[Path, int]:
        """Every file of the repository on disk, with its size."""
        sizes = {}
        for path in self.repo_dir(module).rglob("*"):
            try:
                if path.is_file():
                    sizes[path] = path.stat().st_size
            except FileNotFoundError:  # taken away meanwhile
                continue
        return sizes

    def on_disk(self, module: str) -> int:
        return sum(self.files(module).values())

    def stored(self, module: str, kind: str, object_id: str) -> bool:
        """Whether the object is on disk (data objects sit under a two-hex fan-out)."""
        base = self.repo_dir(module) / kind
        return (base / object_id).exists() or (base / object_id[:2] / object_id).exists()

    def request_path(self, path: Path) -> str:
        """The REST path of a file of a repository on disk."""
        parts = list(path.relative_to(self.gateway.local_repo).parts)
        if len(parts) == 5 and parts[2] == "data":
            del parts[3]  # the fan-out directory
        return "/" + "/".join([DEST, *parts])

    def wait_usage_is_disk(self, module: str, when: str) -> int:
        """Until the bytes /status says the repository holds are those on disk; returns them."""
        def used() -> object:
            return (self.quota_entry(module) or {}).get("used_bytes", "absent")
        wait_for(lambda: used() == self.on_disk(module),
                 lambda: f"{when}: used_bytes of {module} in /status ({used()}) == "
                         f"{self.on_disk(module)} bytes on disk", SETTLE_TIMEOUT)
        return self.on_disk(module)

    # --- the logs ----------------------------------------------------------------------------

    def access_lines(self) -> list[dict]:
        return self.gateway.access_lines()

    def quota_warnings(self, module: str) -> list[str]:
        return [line for line in self.gateway.log_text().splitlines()
                if re.search(rf"WARNING rclone_gateway\.limits .*quota:.*\b{module}\b", line)]

    # --- restic ------------------------------------------------------------------------------

    def url(self, module: str, who: tuple[str, str] | None = None) -> str:
        user, password = who or module_user(module)
        return (f"rest:http://{user.replace('/', '%2F')}:{password}@127.0.0.1:"
                f"{self.gateway.port}{self.base(module)}/")


@pytest.fixture
def env(redis_server: RedisServer, tmp_path: Path) -> Iterator[Env]:
    with fresh_cluster(redis_server) as cluster:
        cluster.add_user(*NODE)
        for module, module_uuid in MODULES.items():
            cluster.add_user(*module_user(module))
            cluster.set_module(module, module_uuid)
        cluster.set_node_vpn(1, "10.5.4.1")
        cluster.add_destination(DEST, provider="cluster", url="webdav:http://10.5.4.1:4694",
                                name="local disk")
        with running_gateway(redis_server.url, tmp_path / "gateway") as gateway:
            env = Env(gateway, cluster)
            # Until the first listing of the storage ends, the use of a repository is unknown
            # (uploads let in); and what it lists while uploads run may be counted twice.
            wait_for(lambda: env.status().get("last_scan_at") is not None,
                     "the first listing of the storage", SETTLE_TIMEOUT)
            yield env


def expect_continue_upload(env: Env, who: tuple[str, str], path: str,
                           length: int) -> tuple[list[int], bytes]:
    """Sends the head of a POST with `Expect: 100-continue` and no body; returns the
    statuses of the answers read (a `100` first, if the gateway asked for the body) and the
    final answer's body."""
    head = (f"POST {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: {basic(*who)}\r\n"
            f"Accept: {REST_ACCEPT}\r\nContent-Length: {length}\r\n"
            f"Expect: 100-continue\r\n\r\n").encode()
    statuses: list[int] = []
    buffer = b""
    with socket.create_connection(("127.0.0.1", env.gateway.port), timeout=20) as sock:
        sock.sendall(head)
        while True:
            while b"\r\n\r\n" not in buffer:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:  # waiting for a body it asked for (or never answering)
                    return statuses, b""
                if not chunk:
                    return statuses, b""
                buffer += chunk
            answer, buffer = buffer.split(b"\r\n\r\n", 1)
            lines = answer.decode("iso-8859-1").split("\r\n")
            statuses.append(int(lines[0].split(" ", 2)[1]))
            if statuses[-1] == 100:
                continue  # the gateway waits for the body now: nothing more will come
            headers = {name.strip().lower(): value.strip() for name, _, value in
                       (line.partition(":") for line in lines[1:])}
            length_back = int(headers.get("content-length", "0"))
            while len(buffer) < length_back:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buffer += chunk
            return statuses, buffer[:length_back]


# --------------------------------------------------------------------------- the scenario


@pytest.mark.long(65)
def test_a_module_over_its_quota_fails_keeps_its_backup_and_runs_again_after_the_node_prunes(
        env: Env, tmp_path: Path) -> None:
    module = "traefik1"
    url = env.url(module)
    node_url = env.url(module, NODE)

    # 1. a first backup, no quota yet
    first = tmp_path / "first"
    first.mkdir()
    first_content = os.urandom(300_000)
    (first / "one.bin").write_bytes(first_content)
    restic(url, "init")
    restic(url, "backup", str(first))
    # the gateway lists the repository a few seconds after a snapshot upload: let it, so
    # that no listing runs while the next steps upload and delete
    env.wait_listed_after(module, time.time())
    first_size = env.wait_usage_is_disk(module, "after the first backup")

    # 2. a quota a little above it (binary units, as an operator writes it), announced
    margin_kib = 60
    quota = first_size + margin_kib * 1024
    env.set_quota({module: f"{quota // 1024}K"})
    quota = quota // 1024 * 1024
    env.wait_quota({module: quota})
    assert env.wait_usage_is_disk(module, "with the quota set") == first_size
    first_id = json.loads(restic(url, "snapshots", "--json").stdout)[0]["id"]
    assert env.wait_usage_is_disk(module, "after listing the snapshots") == first_size

    # 3. a second backup of more new data than the margin: refused, fails, stores nothing
    second = tmp_path / "second"
    second.mkdir()
    (second / "two.bin").write_bytes(os.urandom(200_000))
    before = env.files(module)
    lines_before = len(env.access_lines())
    failed = restic(url, "backup", str(second), check=False)
    assert failed.returncode != 0, failed.stdout
    assert "507" in failed.stderr, failed.stderr[-3000:]
    after = env.files(module)
    lines = env.access_lines()[lines_before:]
    refused = [e for e in lines if e["status"] == 507]
    assert refused, "no 507 in the access log"
    assert {(e["method"], e["user"], e["bytes_in"]) for e in refused} == {
        ("POST", f"module/{module}", 0)}, refused  # refused before its body was read
    for entry in refused:
        kind, object_id = entry["path"].split("/")[-2:]
        assert not env.stored(module, kind, object_id), f"refused and stored: {entry}"
    answered = {e["path"] for e in lines if e["method"] == "POST" and 200 <= e["status"] < 300}
    for path in set(after) - set(before):
        assert env.request_path(path) in answered, f"{path} on disk, never answered 2xx"
    used = env.wait_usage_is_disk(module, "after the refused backup")
    assert used <= quota
    assert env.quota_entry(module)["level_percent"] == 80  # type: ignore[index]
    assert env.quota_warnings(module), "no quota warning when it crossed 80 %"

    # 4. the first snapshot is still whole
    restored = tmp_path / "restored"
    restic(url, "restore", "latest", "--target", str(restored))
    assert (restored / first.relative_to("/") / "one.bin").read_bytes() == first_content
    env.wait_usage_is_disk(module, "after the restore")

    # 5. the node forgets the first snapshot and prunes: never refused, frees the space
    pruned = restic(node_url, "forget", first_id, "--prune")
    # the sizes of what the prune deleted are taken away at once, not at a later listing
    assert env.quota_entry(module)["used_bytes"] == env.on_disk(module)  # type: ignore[index]
    assert json.loads(restic(node_url, "snapshots", "--json").stdout) == []
    freed = env.wait_usage_is_disk(module, "after the node's prune")
    assert freed < first_size, (freed, first_size, pruned.stdout)
    assert env.quota_entry(module)["level_percent"] == 0  # type: ignore[index]

    # 6. a third backup (more new data than the margin: it fits only thanks to the prune)
    third = tmp_path / "third"
    third.mkdir()
    third_content = os.urandom(150_000)
    (third / "three.bin").write_bytes(third_content)
    restic(url, "backup", str(third))
    env.wait_listed_after(module, time.time())
    assert len(json.loads(restic(url, "snapshots", "--json").stdout)) == 1
    final = env.wait_usage_is_disk(module, "after the third backup")
    assert final > freed + len(third_content)

    # 7. after a restart the usage comes from the listing of the storage alone
    env.gateway.restart()
    env.wait_quota({module: quota})
    assert env.wait_usage_is_disk(module, "after a restart") == final


# --------------------------------------------------------------------------- raw HTTP


def test_an_upload_over_quota_is_refused_before_its_body_and_the_rest_still_runs(
        env: Env) -> None:
    module = "mail1"
    who = module_user(module)
    base = env.base(module)
    config = os.urandom(300)
    env.create(module, config)
    assert env.post(who, module, "data", os.urandom(3000))[0] == 200
    env.wait_usage_is_disk(module, "after the first uploads")

    env.set_quota({module: "1K"})  # below what it holds already
    env.wait_quota({module: 1024})

    # over quota, announced with Expect: 100-continue: 507 at once, never a 100
    content = os.urandom(100)
    object_id = hashlib.sha256(content).hexdigest()
    statuses, body = expect_continue_upload(env, who, f"{base}/data/{object_id}", len(content))
    assert statuses == [507], (statuses, body)
    assert b"quota" in body.lower(), body
    # the same without Expect, its body sent: refused too
    status, object_id_plain = env.post(who, module, "data", os.urandom(100))
    assert status == 507
    for refused in (object_id, object_id_plain):
        assert not env.stored(module, "data", refused)
        assert env.request("HEAD", f"{base}/data/{refused}", NODE, rest=True)[0] == 404

    # locks come and go, reads are answered
    lock = json.dumps({"time": "2026-01-01T00:00:00Z", "hostname": "h", "pid": 1}).encode()
    status, lock_id = env.post(who, module, "locks", lock)
    assert status == 200
    assert env.stored(module, "locks", lock_id)
    assert env.request("DELETE", f"{base}/locks/{lock_id}", who, rest=True)[0] == 200
    assert not env.stored(module, "locks", lock_id)
    # counted at once: the lock's bytes came and went with it
    assert env.quota_entry(module)["used_bytes"] == env.on_disk(module)  # type: ignore[index]
    status, _, got = env.request("GET", f"{base}/config", who, rest=True)
    assert (status, got) == (200, config)
    assert env.request("GET", f"{base}/data/", who, rest=True)[0] == 200

    # the node is never refused, not even in a repository over its quota
    status, node_object = env.post(NODE, module, "data", os.urandom(2000))
    assert status == 200
    assert env.stored(module, "data", node_object)

    env.wait_usage_is_disk(module, "after the node's upload")
    entry = env.quota_entry(module)
    assert entry is not None and entry["level_percent"] == 100, entry
    assert entry["module"] == module and entry["destination"] == DEST, entry
    assert env.quota_warnings(module), env.gateway.log_text()[-3000:]


# --------------------------------------------------------------------------- the default


def test_the_default_quota_holds_for_modules_not_listed_and_a_listed_value_wins(
        env: Env) -> None:
    for module in MODULES:
        env.create(module, os.urandom(100))
        env.wait_usage_is_disk(module, "after the repository was made")

    env.set_quota({"*": "8K", "traefik1": "1M", "mail1": "1K"})
    env.wait_quota({"traefik1": 1 << 20, "dokuwiki1": 8 << 10, "mail1": 1 << 10})

    small, big = os.urandom(4 << 10), os.urandom(16 << 10)
    results = {
        # its own 1M wins over the smaller default
        "traefik1": [env.post(module_user("traefik1"), "traefik1", "data", big)],
        # not listed: the default 8K
        "dokuwiki1": [env.post(module_user("dokuwiki1"), "dokuwiki1", "data", small),
                      env.post(module_user("dokuwiki1"), "dokuwiki1", "data", big)],
        # its own 1K wins over the larger default
        "mail1": [env.post(module_user("mail1"), "mail1", "data", small)],
    }
    assert {m: [status for status, _ in r] for m, r in results.items()} == {
        "traefik1": [200], "dokuwiki1": [200, 507], "mail1": [507]}
    for module, uploads in results.items():
        for status, object_id in uploads:
            assert env.stored(module, "data", object_id) == (status == 200), (module, status)
        env.wait_usage_is_disk(module, "after the uploads")


def test_a_listing_that_fails_keeps_the_count_of_its_destination(tmp_path: Path) -> None:
    """A reload removes the configuration a storage scan runs with (or the remote does not
    answer): the repositories of that destination were not found, yet they are not empty.
    The count of a repository over its quota stays, and so do its figures."""
    dest, uuid, conf, layout = local_layout(tmp_path)
    book = UsageBook()
    scanner = Scanner(str(REPO_ROOT / ".venv" / "bin" / "rclone"), lambda: layout,
                      dict(os.environ), interval=3600.0, pause=0.0,
                      on_scanned=lambda key, figures: book.listed(key, figures.stored_bytes),
                      on_listing=book.listing_started, on_full_scan=book.full_scan_ended)
    key = RepositoryKey(dest, "traefik", uuid)

    assert asyncio.run(scanner.scan_all())
    assert book.used(key) == 5100 and scanner.stored[key].stored_bytes == 5100
    book.added(key, 300)
    conf.unlink()  # the generation whose configuration the scan uses is gone
    assert asyncio.run(scanner.scan_all())
    assert book.used(key) == 5400
    assert book.check(key, 1000, quota=6000) is not None
    assert scanner.stored[key].stored_bytes == 5100


SCAN_DEST = "5ca10000-8f8b-4c43-a1d3-7f3f5f7c1a0f"
SCAN_UUID = "5ca11111-2f87-4e7b-9a34-0a1d9f9e4b0f"


def local_layout(tmp_path: Path) -> tuple[str, str, Path, Layout]:
    """One repository of 5100 bytes in a local destination, as the scanner sees it."""
    dest, uuid = SCAN_DEST, SCAN_UUID
    repo = tmp_path / "storage" / dest / "traefik" / uuid
    (repo / "data" / "ab").mkdir(parents=True)
    (repo / "config").write_bytes(b"c" * 100)
    (repo / "data" / "ab" / ("ab" * 32)).write_bytes(b"d" * 5000)
    conf = tmp_path / "rclone.conf"
    conf.write_text(f"[gateway-tree]\ntype = alias\nremote = {tmp_path / 'storage'}\n")
    return dest, uuid, conf, Layout(conf, "gateway-tree:", {dest: str(tmp_path / "storage" / dest)})


def test_a_listing_asked_for_during_a_scan_runs_next(tmp_path: Path) -> None:
    """`rclone-gateway status --rescan` (POST /status) while a scan runs: a listing starts
    once that one ends, not an hour later."""
    _, _, _, layout = local_layout(tmp_path)

    async def scenario() -> tuple[float, float | None]:
        scanner = Scanner(str(REPO_ROOT / ".venv" / "bin" / "rclone"), lambda: layout,
                          dict(os.environ), interval=3600.0, pause=0.5)
        scanner.start()
        try:
            await asyncio.sleep(0.2)  # the first scan is under way (it pauses before rclone)
            asked_at = time.time()
            scanner.scan_all_soon()
            deadline = time.monotonic() + 60
            while (scanner.last_full_scan or 0) < asked_at and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            return asked_at, scanner.last_full_scan
        finally:
            await scanner.close()

    asked_at, listed_at = asyncio.run(scenario())
    assert listed_at is not None and listed_at >= asked_at


# --------------------------------------------------------------------------- small objects

SMALL_MAX = 64 * 1024  # spec section 4, "Sizes": config, keys and locks


def test_a_modules_config_keys_and_locks_over_64_kib_are_refused_before_their_body(
        env: Env, tmp_path: Path) -> None:
    """Issue "Real links and real storage", 9: a lock, which no quota refuses, could store
    anything. 64 KiB passes; one byte more is 413 before the body (never a 100), and
    nothing is stored; a chunked body is cut past the limit and leaves nothing. Nodes
    are not limited."""
    module = "dokuwiki1"
    who = module_user(module)
    base = env.base(module)
    assert env.request("POST", f"{base}/?create=true", who, rest=True)[0] == 200
    lines_before = len(env.access_lines())

    def config_stored() -> bool:
        return (env.repo_dir(module) / "config").exists()

    # config: named `config`, not by its hash
    statuses, body = expect_continue_upload(env, who, f"{base}/config", SMALL_MAX + 1)
    assert statuses == [413], (statuses, body)
    status, _, body = env.request("POST", f"{base}/config", who, body=os.urandom(SMALL_MAX + 1),
                                  rest=True)
    assert status == 413, body
    assert not config_stored()
    conn = http.client.HTTPConnection("127.0.0.1", env.gateway.port, timeout=30)
    try:  # chunked: no Content-Length to refuse it by, cut once past the limit
        status, _, body = send_request(
            conn, "POST", f"{base}/config", who, rest=True,
            body=iter([os.urandom(16 * 1024) for _ in range(5)]))
    finally:
        conn.close()
    assert status == 413, body
    # The 413 goes out as the gateway cuts the upload: rclone may still be writing the part
    # it received, then removes it. Nothing there for 2 s in a row: it is done with it.
    quiet_since: list[float] = []

    def nothing_left_for_a_while() -> bool:
        if env.request("HEAD", f"{base}/config", NODE, rest=True)[0] != 404 or config_stored():
            quiet_since.clear()
            return False
        quiet_since[:] = quiet_since or [time.monotonic()]
        return time.monotonic() - quiet_since[0] >= 2.0

    wait_for(nothing_left_for_a_while, "no config left behind", SETTLE_TIMEOUT)
    config = os.urandom(SMALL_MAX)
    status, _, body = env.request("POST", f"{base}/config", who, body=config, rest=True)
    assert status == 200, body

    # keys and locks: named by their SHA-256
    for kind in ("keys", "locks"):
        exact = os.urandom(SMALL_MAX)
        assert env.post(who, module, kind, exact)[0] == 200, kind
        assert env.stored(module, kind, hashlib.sha256(exact).hexdigest())
        for size in (SMALL_MAX + 1, 4 << 20):
            content = os.urandom(size)
            object_id = hashlib.sha256(content).hexdigest()
            statuses, body = expect_continue_upload(env, who, f"{base}/{kind}/{object_id}",
                                                    size)
            assert statuses == [413], (kind, size, statuses, body)
            status, refused_id = env.post(who, module, kind, content)
            assert status == 413, (kind, size, status)
            assert not env.stored(module, kind, refused_id)
    def refused_lines() -> list[dict]:
        return [e for e in env.access_lines()[lines_before:] if e["status"] == 413]
    # config 3 (Expect, Content-Length, chunked), keys and locks 4 each; a line is written
    # as its request ends, which may come a moment after its answer
    wait_for(lambda: len(refused_lines()) >= 11,
             lambda: f"11 refusals in the access log: {refused_lines()}", SETTLE_TIMEOUT)
    refused = refused_lines()
    assert len(refused) == 11, refused
    assert {e["reason"] for e in refused} == {"object too large for its kind"}, refused
    assert {e["bytes_in"] for e in refused if e["path"].rsplit("/", 1)[-1] != "config"} == {0}

    # the node is not limited: a big lock of its own, in the module's repository
    status, node_lock = env.post(NODE, module, "locks", os.urandom(4 << 20))
    assert status == 200
    assert env.stored(module, "locks", node_lock)


def test_restic_init_backup_and_unlock_pass_the_size_limit(env: Env, tmp_path: Path) -> None:
    module = "traefik1"
    url = env.url(module)
    source = tmp_path / "source"
    source.mkdir()
    (source / "file.bin").write_bytes(os.urandom(200_000))
    restic(url, "init")
    restic(url, "backup", str(source))
    restic(url, "unlock")
    restic(url, "check")
    assert not [e for e in env.access_lines() if e["status"] == 413]


# --------------------------------------------------------------------------- whole repositories


@pytest.mark.long(60)
def test_a_repository_the_node_deletes_or_moves_whole_holds_nothing_after(
        env: Env, tmp_path: Path) -> None:
    """Issue "Real links and real storage", 8: after a node's WebDAV DELETE of a repository
    directory (or of its app directory), or a MOVE of it away, the module re-inits and backs
    up under its quota; a MOVE back brings its bytes back, counted at once."""
    source = tmp_path / "big"
    source.mkdir()
    (source / "big.bin").write_bytes(os.urandom(1_500_000))
    small = tmp_path / "small"
    small.mkdir()
    (small / "small.bin").write_bytes(os.urandom(100_000))

    for module in MODULES:
        restic(env.url(module), "init")
        restic(env.url(module), "backup", str(source))
        env.wait_listed_after(module, time.time())
        assert env.wait_usage_is_disk(module, "after the first backup") > 1_500_000
    env.set_quota({"*": "1M"})
    env.wait_quota(dict.fromkeys(MODULES, 1 << 20))

    def node_webdav(method: str, path: str, headers: dict[str, str] | None = None) -> int:
        status, _, body = env.request(method, path, NODE, headers=headers)
        assert 200 <= status < 300, (method, path, status, body)
        return status

    def backs_up_again(module: str, when: str) -> None:
        assert not env.repo_dir(module).exists(), when
        # at once: the count of the repository gone is dropped with it
        assert env.quota_entry(module)["used_bytes"] == 0, (  # type: ignore[index]
            when, env.quota_entry(module))
        restic(env.url(module), "init")
        backup = restic(env.url(module), "backup", str(small), check=False)
        assert backup.returncode == 0, (when, backup.stderr[-2000:])
        env.wait_listed_after(module, time.time())
        assert env.wait_usage_is_disk(module, when) < 1 << 20

    # the repository directory itself
    node_webdav("DELETE", env.base("traefik1") + "/")
    backs_up_again("traefik1", "after a DELETE of the repository")
    # its app directory
    node_webdav("DELETE", f"/{DEST}/{app_of('dokuwiki1')}")
    backs_up_again("dokuwiki1", "after a DELETE of the app directory")
    # moved away, then back over the new one
    module = "mail1"
    kept = f"/{DEST}/{app_of(module)}/{MODULES[module]}-kept"
    address = f"http://127.0.0.1:{env.gateway.port}"
    node_webdav("MOVE", env.base(module), {"Destination": address + kept})
    backs_up_again(module, "after a MOVE of the repository away")
    node_webdav("MOVE", kept, {"Destination": address + env.base(module), "Overwrite": "T"})
    big = env.on_disk(module)
    assert big > 1_500_000
    # the bytes moved back are counted at once, and again by a listing
    assert env.quota_entry(module)["used_bytes"] >= big  # type: ignore[index]
    assert env.wait_usage_is_disk(module, "after a MOVE back") == big
    assert env.post(module_user(module), module, "data", os.urandom(1000))[0] == 507
