"""The gateway end to end: real redis-server, real rclone children, real restic."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import socket
import time
import uuid as uuidlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
    raw_request,
    restic,
    running_gateway,
    send_request,
    wait_for,
)
from identities import (
    DEST,
    DOKUWIKI,
    DOKUWIKI_UUID,
    LDAP,
    LDAP_UUID,
    MAIL,
    MAIL_UUID,
    NODE,
    REMOTE_DEST,
    TRAEFIK,
    TRAEFIK_UUID,
)

PEER_DEST = "6a6a6a6a-1b2a-4d6e-9f70-aa11bb22cc33"
DOKU_OLD, DOKU_OLD_UUID = DOKUWIKI, DOKUWIKI_UUID  # the first of two, see DOKU_NEW
DOKU_NEW = ("module/dokuwiki2", "doku2-secret")
DOKU_NEW_UUID = "11112222-3c55-4b0d-8f4e-5a6b7c8d9e03"
WIKI_OLD = ("module/wiki1", "wiki1-secret")
WIKI_OLD_UUID = "c3c3c3c3-0000-4000-8000-000000000003"
WIKI_NEW = ("module/wiki2", "wiki2-secret")
WIKI_NEW_UUID = "d4d4d4d4-0000-4000-8000-000000000004"
OFF_USER = ("module/nextcloud1", "off-secret")
NOPASS_USER = ("module/samba1", "")
# Modules of their own for the tests that move a module to another repository (a live ACL
# change) or need a repository nobody else touches: no other test depends on them.
RETAIN = ("module/traefik2", "traefik2-secret")
RETAIN_UUID = "e5e5e5e5-0000-4000-8000-000000000005"
APPEND = ("module/traefik3", "traefik3-secret")
APPEND_UUID = "f6f6f6f6-0000-4000-8000-000000000006"
UPLOAD = ("module/traefik4", "traefik4-secret")
UPLOAD_UUID = "a7a7a7a7-0000-4000-8000-000000000007"


@dataclass
class Env:
    gateway: GatewayProcess
    cluster: Cluster
    remote_dir: Path

    @property
    def repo_dir(self) -> Path:
        return self.gateway.local_repo

    def repo_url(self, who: tuple[str, str], app: str, module_uuid: str, dest: str = DEST) -> str:
        user = who[0].replace("/", "%2F")
        return f"rest:http://{user}:{who[1]}@127.0.0.1:{self.gateway.port}/{dest}/{app}/{module_uuid}/"

    def request(
        self,
        method: str,
        path: str,
        who: tuple[str, str] | None = None,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        rest: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=30)
        try:
            return send_request(conn, method, path, who, headers=headers, body=body, rest=rest)
        finally:
            conn.close()


@pytest.fixture(scope="module")
def env(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("gw")
    remote_dir = workdir / "remote-storage"
    remote_dir.mkdir()
    with fresh_cluster(redis_server) as cluster:
        for who in (NODE, TRAEFIK, DOKU_OLD, DOKU_NEW, MAIL, LDAP, WIKI_OLD, WIKI_NEW, RETAIN,
                    APPEND, UPLOAD):
            cluster.add_user(*who)
        for who, module_uuid in ((MAIL, MAIL_UUID), (LDAP, LDAP_UUID), (WIKI_OLD, WIKI_OLD_UUID),
                                 (WIKI_NEW, WIKI_NEW_UUID), (RETAIN, RETAIN_UUID),
                                 (APPEND, APPEND_UUID), (UPLOAD, UPLOAD_UUID)):
            cluster.set_module(who[0].removeprefix("module/"), module_uuid)
        cluster.grant_restore(WIKI_NEW_UUID, WIKI_OLD_UUID)
        cluster.add_user(OFF_USER[0], OFF_USER[1], enabled=False)
        cluster.add_user(NOPASS_USER[0], None, nopass=True)
        cluster.set_module("traefik1", TRAEFIK_UUID)
        cluster.set_module("dokuwiki1", DOKU_OLD_UUID)
        cluster.set_module("dokuwiki2", DOKU_NEW_UUID)
        cluster.set_module("nextcloud1", str(uuidlib.uuid4()))
        cluster.set_module("samba1", str(uuidlib.uuid4()))
        cluster.grant_restore(DOKU_NEW_UUID, DOKU_OLD_UUID)
        cluster.set_node_vpn(1, "10.5.4.1")
        cluster.set_node_vpn(2, "10.5.4.2")
        cluster.set_network("10.5.4.0/24")
        cluster.add_destination(DEST, provider="cluster", url="webdav:http://10.5.4.1:4694",
                                name="local")
        cluster.add_destination(
            REMOTE_DEST, provider="rclone", url="rclone:local", name="remote",
            basepath=str(remote_dir),
            rclone_conf=f"[{REMOTE_DEST}]\ntype = local\n",
        )
        cluster.add_destination(PEER_DEST, provider="cluster", url="webdav:http://10.5.4.2:4694")
        with running_gateway(redis_server.url, workdir) as gateway:
            yield Env(gateway, cluster, remote_dir)


def access_lines(env: Env) -> list[dict]:
    return env.gateway.access_lines()


def repo_status(env: Env, who: tuple[str, str], module_uuid: str) -> int:
    """Status of a module listing the keys of the repository `module_uuid` of its app type:
    200 when the gateway lets it (even before the repository exists), 403 when not."""
    app = who[0].removeprefix("module/").rstrip("0123456789")
    return env.request("GET", f"/{DEST}/{app}/{module_uuid}/keys/", who, rest=True)[0]


def move_module(env: Env, who: tuple[str, str], to_uuid: str, from_uuid: str) -> None:
    """Gives module `who` the uuid `to_uuid` (a live change announced on acl-changed) and
    waits until the gateway applies it: `to_uuid` is its repository, `from_uuid` no more."""
    env.cluster.set_module(who[0].removeprefix("module/"), to_uuid)
    env.cluster.publish("acl-changed")
    wait_for(lambda: (repo_status(env, who, to_uuid), repo_status(env, who, from_uuid))
             == (200, 403), f"{who[0]} to own {to_uuid} instead of {from_uuid}", 30)


@contextlib.contextmanager
def moved_module(env: Env, who: tuple[str, str], home_uuid: str, new_uuid: str) -> Iterator[None]:
    """Module `who` owns `new_uuid` inside the block, `home_uuid` again (applied) after it."""
    move_module(env, who, new_uuid, home_uuid)
    try:
        yield
    finally:
        move_module(env, who, home_uuid, new_uuid)


def stored_object(env: Env, app: str, module_uuid: str, kind: str, object_id: str) -> Path:
    """Where rclone serve restic keeps an object in a local repository."""
    base = env.repo_dir / app / module_uuid / kind
    return base / object_id[:2] / object_id if kind == "data" else base / object_id


def tree(root: Path) -> dict[str, str]:
    """Every file below root with the sha256 of its content."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def make_files(directory: Path, count: int = 5, size: int = 200_000) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (directory / f"file{i}.bin").write_bytes(os.urandom(size))
    return directory


# --------------------------------------------------------------------------- restic


def test_module_backs_up_and_restores(env: Env, tmp_path: Path, restic_binary: str) -> None:
    module_uuid = str(uuidlib.uuid4())  # one repository per restic version
    repo = env.repo_url(TRAEFIK, "traefik", module_uuid)
    data = make_files(tmp_path / "data")
    with moved_module(env, TRAEFIK, TRAEFIK_UUID, module_uuid):
        restic(repo, "init", binary=restic_binary)
        restic(repo, "backup", str(data), binary=restic_binary)
        (data / "file0.bin").write_bytes(os.urandom(300_000))
        restic(repo, "backup", str(data), binary=restic_binary)
        snapshots = restic(repo, "snapshots", "--json", binary=restic_binary).stdout
        assert snapshots.count('"id"') == 2
        restic(repo, "restore", "latest", "--target", str(tmp_path / "out"),
               binary=restic_binary)
    restored = tmp_path / "out" / data.relative_to("/")
    assert tree(restored) == tree(data)


def changes(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    """What differs between two trees: files added, removed and replaced (locks included)."""
    return {
        "added": sorted(after.keys() - before.keys()),
        "removed": sorted(before.keys() - after.keys()),
        "replaced": sorted(k for k in before.keys() & after.keys() if before[k] != after[k]),
    }


@pytest.mark.long(60)
def test_refused_restic_operations_leave_repositories_unchanged(env: Env, tmp_path: Path) -> None:
    """forget and prune as a module, and a backup into a granted repository, all fail.

    restic retries refused requests for about 40 s, so the three run at once.
    """
    ldap = env.repo_url(LDAP, "ldap", LDAP_UUID)
    mail = env.repo_url(MAIL, "mail", MAIL_UUID)
    wiki_old = env.repo_url(WIKI_OLD, "wiki", WIKI_OLD_UUID)
    data = make_files(tmp_path / "data", count=3)
    for repo in (ldap, mail, wiki_old):
        restic(repo, "init")
        restic(repo, "backup", str(data))
    (data / "file0.bin").write_bytes(os.urandom(300_000))
    restic(mail, "backup", str(data))
    # the node forgets a snapshot, so that there is data a prune would delete
    restic(env.repo_url(NODE, "mail", MAIL_UUID), "forget", "--keep-last", "1")
    snapshot = json.loads(restic(ldap, "snapshots", "--json").stdout)[0]["id"]
    dirs = {name: env.repo_dir / name / u
            for name, u in (("ldap", LDAP_UUID), ("mail", MAIL_UUID), ("wiki", WIKI_OLD_UUID))}
    before = {name: tree(d) for name, d in dirs.items()}

    granted = env.repo_url(WIKI_NEW, "wiki", WIKI_OLD_UUID)
    runs = [
        (ldap, "forget", snapshot),
        (mail, "prune"),
        (granted, "backup", str(data)),
    ]
    with ThreadPoolExecutor(len(runs)) as pool:
        results = list(pool.map(lambda run: restic(*run, check=False, timeout=240), runs))
    for run, result in zip(runs, results, strict=True):
        assert result.returncode != 0, (run, result.stdout)
    # a module may add to its own repositories (a prune that cannot delete may have written
    # packs and index first) but neither remove nor replace anything there, and leaves no lock;
    # it may add nothing at all to a repository it only restores from: not an object and not
    # a lock (the locks it took there, it removed), so that tree is exactly as it was
    for name, d in dirs.items():
        diff = changes(before[name], tree(d))
        if name == "wiki":
            assert diff == changes({}, {}), (name, diff)
        else:
            assert diff["removed"] == diff["replaced"] == [], (name, diff)
            assert not [k for k in diff["added"] if k.startswith("locks/")], (name, diff)
    log = env.gateway.log_text()
    assert "modules may not delete backup data" in log
    assert "granted repository is read-only" in log
    assert json.loads(restic(ldap, "snapshots", "--json").stdout)[0]["id"] == snapshot


def test_node_runs_retention_and_checks_through_the_gateway(
        env: Env, tmp_path: Path, restic_binary: str) -> None:
    module_uuid = str(uuidlib.uuid4())
    module_repo = env.repo_url(RETAIN, "traefik", module_uuid)
    with moved_module(env, RETAIN, RETAIN_UUID, module_uuid):
        data = make_files(tmp_path / "data", count=3)
        restic(module_repo, "init", binary=restic_binary)
        restic(module_repo, "backup", str(data), binary=restic_binary)
        (data / "file0.bin").write_bytes(os.urandom(1000))
        restic(module_repo, "backup", str(data), binary=restic_binary)
    node_repo = env.repo_url(NODE, "traefik", module_uuid)
    restic(node_repo, "forget", "--keep-last", "1", "--prune", binary=restic_binary)
    assert restic(node_repo, "snapshots", "--json",
                  binary=restic_binary).stdout.count('"id"') == 1
    check = restic(node_repo, "check", "--read-data", binary=restic_binary)
    assert "no errors were found" in check.stdout


def test_restoring_module_reads_granted_repository_only(env: Env, tmp_path: Path) -> None:
    old_repo = env.repo_url(DOKU_OLD, "dokuwiki", DOKU_OLD_UUID)
    data = make_files(tmp_path / "data", count=3)
    restic(old_repo, "init")
    restic(old_repo, "backup", str(data))

    old_dir = env.repo_dir / "dokuwiki" / DOKU_OLD_UUID
    before = tree(old_dir)
    granted = env.repo_url(DOKU_NEW, "dokuwiki", DOKU_OLD_UUID)
    restic(granted, "restore", "latest", "--target", str(tmp_path / "out"))
    assert tree(tmp_path / "out" / data.relative_to("/")) == tree(data)
    assert tree(old_dir) == before  # the restore's lock is gone again

    # repositories it is not granted (of its own app type and of another), real ones holding
    # a snapshot: restic fails there only because the gateway refuses, and it refuses each
    # of restic's requests with 403
    others = [("dokuwiki", str(uuidlib.uuid4())), ("traefik", str(uuidlib.uuid4()))]
    for app, other_uuid in others:
        node_repo = env.repo_url(NODE, app, other_uuid)
        restic(node_repo, "init")
        restic(node_repo, "backup", str(data))
    with ThreadPoolExecutor(len(others)) as pool:
        results = list(pool.map(
            lambda other: restic(env.repo_url(DOKU_NEW, *other), "snapshots", check=False,
                                 timeout=240),
            others))
    bases = [f"/{DEST}/{app}/{other_uuid}" for app, other_uuid in others]

    def lines_of(entries: list[dict], base: str) -> list[tuple[str, str, int, str]]:
        return [(e["method"], e["path"], e["status"], e["decision"]) for e in entries
                if e.get("user") == DOKU_NEW[0] and e["path"].startswith(base)]

    # an access line is written just after its answer: restic may have exited before
    wait_for(lambda: all(lines_of(access_lines(env), base) for base in bases),
             "an access line of restic's requests for each repository", 30)
    entries = access_lines(env)
    for (app, _), base, result in zip(others, bases, results, strict=True):
        assert result.returncode != 0, (app, result.stdout)
        refused = lines_of(entries, base)
        assert refused, f"no request of restic's for {base} reached the gateway"
        assert {(status, decision) for _, _, status, decision in refused} == {(403, "deny")}, \
            refused
        status, _, body = env.request("GET", f"{base}/config", DOKU_NEW, rest=True)
        assert status == 403 and body.startswith(b"forbidden: "), (status, body)
        assert env.request("GET", f"{base}/config", NODE, rest=True)[0] == 200


def test_append_only_keeps_stored_bytes(env: Env) -> None:
    module_uuid = str(uuidlib.uuid4())
    with moved_module(env, APPEND, APPEND_UUID, module_uuid):
        base = f"/{DEST}/traefik/{module_uuid}"
        assert env.request("POST", f"{base}/?create=true", APPEND, rest=True)[0] == 200
        assert env.request("POST", f"{base}/config", APPEND, body=b"first", rest=True)[0] == 200
        status, _, body = env.request("POST", f"{base}/config", APPEND, body=b"second", rest=True)
        assert status == 403, body
        content = b"object content"
        object_id = hashlib.sha256(content).hexdigest()
        path = f"{base}/data/{object_id}"
        assert env.request("POST", path, APPEND, body=content, rest=True)[0] == 200
        status, _, _ = env.request("POST", path, APPEND, body=b"replaced", rest=True)
        assert status == 403
        stored = env.repo_dir / "traefik" / module_uuid
        assert (stored / "config").read_bytes() == b"first"
        stored_data = stored_object(env, "traefik", module_uuid, "data", object_id)
        assert stored_data.read_bytes() == content
        status, headers, got = env.request("GET", path, APPEND, rest=True)
        assert (status, got) == (200, content)
        assert headers["x-gateway-backend"] == "restic-append-only@node1"


# --------------------------------------------------------------------------- WebDAV


def test_node_webdav_round_trip(env: Env, tmp_path: Path) -> None:
    base = f"/{DEST}/traefik"
    assert env.request("MKCOL", f"/{DEST}/scratch/", NODE)[0] == 201
    assert env.request("MKCOL", f"{base}/", NODE)[0] in (201, 405)  # 405: there already
    meta = b'{"uuid": "x", "name": "traefik1"}'
    assert env.request("PUT", f"{base}/{TRAEFIK_UUID}.json", NODE, body=meta)[0] in (200, 201, 204)
    status, headers, got = env.request("GET", f"{base}/{TRAEFIK_UUID}.json", NODE)
    assert (status, got) == (200, meta)
    assert headers["x-gateway-backend"] == "webdav@node1"

    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1024 * 1024))
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", env.gateway.port, timeout=120)
    with open(big, "rb") as f:
        conn.request("PUT", f"/{DEST}/scratch/big.bin", body=f,
                     headers={"Authorization": basic(*NODE),
                              "Content-Length": str(100 * 1024 * 1024)})
        response = conn.getresponse()
        response.read()
    assert response.status in (200, 201, 204)
    assert hashlib.sha256((env.repo_dir / "scratch" / "big.bin").read_bytes()).hexdigest() == digest
    conn.request("GET", f"/{DEST}/scratch/big.bin", headers={"Authorization": basic(*NODE)})
    response = conn.getresponse()
    hasher = hashlib.sha256()
    while chunk := response.read(1 << 20):
        hasher.update(chunk)
    conn.close()
    assert hasher.hexdigest() == digest

    status, _, body = env.request("PROPFIND", f"/{DEST}/scratch/", NODE, headers={"Depth": "1"})
    assert status == 207 and b"big.bin" in body
    status, _, body = env.request("PROPFIND", f"/{DEST}/scratch/", NODE, headers={"Depth": "0"})
    assert status == 207 and b"big.bin" not in body
    assert env.request("DELETE", f"/{DEST}/scratch/big.bin", NODE)[0] == 204
    assert not (env.repo_dir / "scratch" / "big.bin").exists()
    assert env.request("DELETE", f"/{DEST}/scratch/", NODE)[0] == 204


def test_module_webdav_reads_own_tree_and_writes_nothing(env: Env) -> None:
    base = f"/{DEST}/traefik"
    meta = b'{"module": "traefik1"}'
    assert env.request("POST", f"{base}/{TRAEFIK_UUID}/?create=true", TRAEFIK, rest=True)[0] == 200
    assert env.request("PUT", f"{base}/{TRAEFIK_UUID}.json", NODE, body=meta)[0] in (200, 201, 204)
    status, _, got = env.request("GET", f"{base}/{TRAEFIK_UUID}.json", TRAEFIK)
    assert (status, got) == (200, meta)
    status, _, body = env.request("PROPFIND", f"{base}/{TRAEFIK_UUID}/", TRAEFIK,
                                  headers={"Depth": "1"})
    assert status == 207 and b"snapshots" in body
    assert env.request("PROPFIND", "/", TRAEFIK, headers={"Depth": "1"})[0] == 207
    assert env.request("PROPFIND", "/", TRAEFIK, headers={"Depth": "infinity"})[0] == 403
    assert env.request("PROPFIND", f"/{DEST}/traefik/", TRAEFIK, headers={"Depth": "1"})[0] == 403
    before = tree(env.repo_dir)
    for method, path in [
        ("PUT", f"{base}/{TRAEFIK_UUID}.json"),
        ("PUT", f"{base}/{TRAEFIK_UUID}/newfile"),
        ("DELETE", f"{base}/{TRAEFIK_UUID}/config"),
        ("MKCOL", f"{base}/{TRAEFIK_UUID}/dir/"),
        ("MOVE", f"{base}/{TRAEFIK_UUID}/config"),
        ("COPY", f"{base}/{TRAEFIK_UUID}/config"),
        ("PROPPATCH", f"{base}/{TRAEFIK_UUID}/config"),
        ("PUT", f"/{DEST}/evil.txt"),
    ]:
        status, _, body = env.request(method, path, TRAEFIK, body=b"x",
                                      headers={"Destination": f"{base}/stolen"})
        assert status == 403, (method, path, body)
        assert body.startswith(b"forbidden: ")
    assert tree(env.repo_dir) == before


def test_repository_created_through_rest_is_visible_over_webdav_at_once(env: Env) -> None:
    env.request("PROPFIND", "/", NODE, headers={"Depth": "1"})
    env.request("PROPFIND", f"/{DEST}/", NODE, headers={"Depth": "1"})
    env.request("PROPFIND", f"/{DEST}/cachetest/", NODE, headers={"Depth": "1"})
    module_uuid = str(uuidlib.uuid4())
    base = f"/{DEST}/cachetest/{module_uuid}"
    assert env.request("POST", f"{base}/?create=true", NODE, rest=True)[0] == 200
    assert env.request("POST", f"{base}/config", NODE, body=b"cfg", rest=True)[0] == 200
    status, _, body = env.request("PROPFIND", f"{base}/config", NODE, headers={"Depth": "0"})
    assert status == 207, body


def test_remote_destination_served_from_its_basepath(env: Env) -> None:
    path = f"/{REMOTE_DEST}/meta.json"
    assert env.request("PUT", path, NODE, body=b"{}")[0] in (200, 201, 204)
    assert (env.remote_dir / "meta.json").read_bytes() == b"{}"


# --------------------------------------------------------------------------- access rules


REPO = f"/{DEST}/traefik/{TRAEFIK_UUID}"


@pytest.mark.parametrize(
    ("who", "method", "path", "rest", "expected"),
    [
        (NODE, "GET", f"{REPO}/config", True, {200, 404}),
        (NODE, "PROPFIND", "/", False, {207}),
        (TRAEFIK, "GET", f"{REPO}/keys/", True, {200}),
        (TRAEFIK, "DELETE", f"{REPO}/data/{'a' * 64}", True, {403}),
        (TRAEFIK, "GET", f"/{DEST}/dokuwiki/{DOKU_OLD_UUID}/config", True, {403}),
        (DOKU_NEW, "GET", f"/{DEST}/dokuwiki/{DOKU_OLD_UUID}/keys/", True, {200, 404}),
        (DOKU_NEW, "POST", f"/{DEST}/dokuwiki/{DOKU_OLD_UUID}/data/{'b' * 64}", True, {403}),
        (OFF_USER, "GET", "/", False, {401}),
        (NOPASS_USER, "GET", "/", False, {401}),
        (("module/ghost1", "x"), "GET", "/", False, {401}),
        ((NODE[0], "wrong"), "GET", "/", False, {401}),
        (("admin", "x"), "GET", "/", False, {401}),
        (None, "GET", f"{REPO}/config", True, {401}),
        (NODE, "GET", f"/{PEER_DEST}/x/y/config", True, {503}),
        (NODE, "GET", "/99999999-0000-0000-0000-000000000000/a/b/config", True, {404}),
    ],
)
def test_callers(env: Env, who, method: str, path: str, rest: bool, expected: set[int]) -> None:
    status, headers, body = env.request(method, path, who, rest=rest)
    assert status in expected, body
    if status == 401:
        assert headers["www-authenticate"] == 'Basic realm="ns8-rclone-gateway"'


def test_no_password_or_authorization_reaches_the_log(env: Env) -> None:
    env.request("GET", "/", (NODE[0], "wrong-password-xyz"))
    log = env.gateway.log_text()
    for secret in (NODE[1], TRAEFIK[1], "wrong-password-xyz", basic(*NODE)):
        assert secret not in log


@pytest.mark.parametrize(
    "target",
    [
        "/a/../b", "/a/%2e%2e/b", "/a/%2E%2e/b", "/a/./b", "/a/%2e/b", "/a//b", "//a",
        "/a%2fb", "/a%2Fb", "/a\\b", "/a%5Cb", "/a%00b", "/a%01b", "/a%0d%0ab", "/a%7fb",
        "/a%zz", "/a%4", "/%ff", "/%c3", "/" + "a" * 256, "/" + "%61" * 256,
        "/" + "/".join(["a" * 250] * 17),
    ],
)
def test_non_canonical_targets_get_400(env: Env, target: str) -> None:
    request = (f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(*NODE)}\r\n"
               "Connection: close\r\n\r\n").encode("latin-1")
    status, _, body = raw_request("127.0.0.1", env.gateway.port, request)
    assert status == 400, body


def test_non_canonical_targets_are_refused_before_credentials(env: Env) -> None:
    status, _, body = raw_request(
        "127.0.0.1", env.gateway.port,
        b"GET /a/../b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 400
    assert b"dot segment" in body


def test_probe_needs_no_credentials_only_for_get_and_head(env: Env) -> None:
    probe = f"/{DEST}/_probe_rest_404"
    assert env.request("GET", probe, rest=True)[0] == 404
    assert env.request("HEAD", probe)[0] == 404
    assert env.request("GET", f"/{PEER_DEST}/_probe_rest_404")[0] == 503
    assert env.request("GET", "/11111111-0000-0000-0000-000000000000/_probe_rest_404")[0] == 503
    for method, path in [
        ("POST", probe), ("DELETE", probe), ("PUT", probe), ("PROPFIND", probe),
        ("GET", f"/{DEST}/traefik/_probe_rest_404"),
        ("GET", f"{REPO}/_probe_rest_404"),
        ("GET", f"{probe}/"),
        ("GET", f"{probe}?x=1"),
    ]:
        assert env.request(method, path)[0] == 401, (method, path)


def test_untrusted_source_is_refused_before_anything(env: Env) -> None:
    request = (f"GET /{DEST}/_probe_rest_404 HTTP/1.1\r\nHost: x\r\n"
               f"Authorization: {basic(*NODE)}\r\nConnection: close\r\n\r\n").encode()
    status, _, body = raw_request("127.0.0.1", env.gateway.port, request, source="127.0.0.2")
    assert status == 403, body
    status, _, _ = raw_request(
        "127.0.0.1", env.gateway.port,
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", source="127.0.0.2")
    assert status == 403


def test_new_module_authenticates_after_acl_event_without_backend_restart(env: Env) -> None:
    before = env.gateway.rclone_serve_pids()
    who = ("module/wiki7", "wiki-secret")
    assert env.request("GET", "/", who)[0] == 401
    env.cluster.add_user(*who)
    env.cluster.set_module("wiki7", str(uuidlib.uuid4()))
    env.cluster.publish("acl-changed")
    wait_for(lambda: env.request("PROPFIND", "/", who, headers={"Depth": "0"})[0] == 207,
             "the new module to authenticate", 30)
    assert env.gateway.rclone_serve_pids() == before


# --------------------------------------------------------------------------- failure modes


def test_aborted_upload_leaves_no_partial_object(env: Env) -> None:
    module_uuid = UPLOAD_UUID
    base = f"/{DEST}/traefik/{module_uuid}"
    assert env.request("POST", f"{base}/?create=true", UPLOAD, rest=True)[0] == 200
    assert env.request("POST", f"{base}/config", UPLOAD, body=b"cfg", rest=True)[0] == 200
    content = os.urandom(4 * 1024 * 1024)
    object_id = hashlib.sha256(content).hexdigest()
    head = (f"POST {base}/data/{object_id} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {basic(*UPLOAD)}\r\nAccept: {REST_ACCEPT}\r\n"
            f"Content-Length: {len(content)}\r\n\r\n").encode()
    data_dir = env.repo_dir / "traefik" / module_uuid / "data"

    def partial_sizes() -> list[int]:
        sizes = []
        for path in data_dir.rglob(object_id + "*"):
            with contextlib.suppress(OSError):  # removed meanwhile
                sizes.append(path.stat().st_size)
        return sizes

    def posts() -> list[dict]:
        return [e for e in access_lines(env)
                if e["method"] == "POST" and e["path"] == f"{base}/data/{object_id}"]

    with socket.create_connection(("127.0.0.1", env.gateway.port)) as sock:
        sock.sendall(head + content[: len(content) // 2])
        # the upload is under way: the backend has started writing the object
        wait_for(lambda: any(size > 0 for size in partial_sizes()),
                 "the partial object to be written", 30)
    wait_for(posts, "the access line of the aborted upload", 30)
    wait_for(lambda: not partial_sizes(), "the partial object to be removed", 30)
    assert env.request("HEAD", f"{base}/config", NODE, rest=True)[0] == 200
    assert not stored_object(env, "traefik", module_uuid, "data", object_id).exists()
    status, _, _ = env.request("HEAD", f"{base}/data/{object_id}", NODE, rest=True)
    assert status == 404
    assert [(e["status"], e["reason"], e["source"]) for e in posts()] == [
        (499, "client went away", "127.0.0.1")]


@pytest.mark.parametrize("sent", [0, 16 * 1024], ids=["no-body", "part-of-it"])
def test_a_chunked_config_whose_client_goes_away_leaves_nothing(env: Env, sent: int) -> None:
    """rclone reads an upload of unknown length under 100 KiB whole before it stores it,
    and takes a connection that ends in the middle of the chunks for the body's end: a
    chunked `config` cut short was stored as far as it came (empty when the client left
    after the head, which goes on alone after a second). A chunked body that fails now
    ends in a chunk rclone cannot parse, which fails the upload."""
    who = (f"module/chunked{sent + 1}", "chunked-secret")  # a repository of its own
    module_uuid = str(uuidlib.uuid4())
    env.cluster.add_user(*who)
    env.cluster.set_module(who[0].removeprefix("module/"), module_uuid)
    env.cluster.publish("acl-changed")
    base = f"/{DEST}/chunked/{module_uuid}"
    wait_for(lambda: env.request("POST", f"{base}/?create=true", who, rest=True)[0] == 200,
             "the new module to create its repository", 30)
    head = (f"POST {base}/config HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {basic(*who)}\r\nAccept: {REST_ACCEPT}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n").encode()
    body = b"%x\r\n%b\r\n" % (sent, os.urandom(sent)) if sent else b""
    config = env.repo_dir / "chunked" / module_uuid / "config"

    def posts() -> list[dict]:
        return [e for e in access_lines(env)
                if e["method"] == "POST" and e["path"] == f"{base}/config"]

    with socket.create_connection(("127.0.0.1", env.gateway.port)) as sock:
        sock.sendall(head + body)
        time.sleep(2.0)  # the head has gone on alone (after 1 s), and the piece with it
    wait_for(posts, "the access line of the cut upload", 30)
    quiet_since: list[float] = []

    def nothing_for_a_while() -> bool:
        if config.exists() or env.request("HEAD", f"{base}/config", NODE, rest=True)[0] != 404:
            quiet_since.clear()
            return False
        quiet_since[:] = quiet_since or [time.monotonic()]
        return time.monotonic() - quiet_since[0] >= 2.0

    wait_for(nothing_for_a_while, lambda: f"no config left behind ({config.exists()})", 30)
    assert [e["status"] for e in posts()] == [499]
    content = os.urandom(1024)  # the module's next try is stored
    assert env.request("POST", f"{base}/config", who, body=content, rest=True)[0] == 200
    assert config.read_bytes() == content


def test_an_upload_whose_client_pauses_past_the_backends_head_timeout_is_stored(
        env: Env) -> None:
    """rclone drops a connection that sends no request head within 10 s. A module's upload
    holds its first piece back until the next arrives (to check the name on the whole
    body), so a client pausing after its first piece left the backend without a head: a
    502 after 10 s. The head now goes ahead of the body's first piece when that is late."""
    module_uuid = UPLOAD_UUID
    base = f"/{DEST}/traefik/{module_uuid}"
    env.request("POST", f"{base}/?create=true", UPLOAD, rest=True)  # may exist already
    # several at once: an idle kept-alive connection to the backend, reused, is not cut
    contents = [os.urandom(8192) for _ in range(6)]
    sockets = []
    for content in contents:
        head = (f"POST {base}/data/{hashlib.sha256(content).hexdigest()} HTTP/1.1\r\n"
                f"Host: x\r\nAuthorization: {basic(*UPLOAD)}\r\nAccept: {REST_ACCEPT}\r\n"
                f"Content-Length: {len(content)}\r\nConnection: close\r\n\r\n").encode()
        sock = socket.create_connection(("127.0.0.1", env.gateway.port), timeout=60)
        sock.sendall(head + content[:1024])
        sockets.append(sock)
    time.sleep(12)  # past rclone's 10 s for a request head
    answers = []
    for sock, content in zip(sockets, contents, strict=True):
        with sock:
            sock.sendall(content[1024:])
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            answers.append(answer.split(b"\r\n", 1)[0])
    assert answers == [b"HTTP/1.1 200 OK"] * len(contents)
    for content in contents:
        stored = stored_object(env, "traefik", module_uuid, "data",
                               hashlib.sha256(content).hexdigest())
        assert stored.read_bytes() == content


def test_bad_credentials_encodings_get_401_not_500(env: Env) -> None:
    for value in ["Basic", "Basic !!!", "Basic " + "a" * 10, "Bearer x", "Basic Og==",
                  "basic bm9kZS8xOg=="]:
        status, _, _ = env.request("GET", "/", headers={"Authorization": value})
        assert status == 401, value


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _reset_vm_hwm(pid: int) -> None:
    """Sets the process's peak RSS (VmHWM) back to its current RSS (proc(5), clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


# Peak RSS of the gateway while it streams 1 GiB. Measured on the 2-core test machine: about
# 55 MiB, whatever ran before in the module (the peak is reset before the upload); the target
# is 64 MiB. The bound is twice the measurement, so a regression that doubles it (a body
# buffered whole, a copy too many per chunk, an unbounded queue) fails.
PEAK_RSS_BOUND_MIB = 110


@pytest.mark.serial  # a bound on the gateway's peak RSS
def test_one_gib_upload_streams_in_flat_memory(env: Env) -> None:
    size = 1024 * 1024 * 1024
    block_size = 1024 * 1024
    sent = hashlib.sha256()

    def body() -> Iterator[bytes]:
        # reproducible bytes, each block different (a block lost, repeated or out of order,
        # or one byte changed, changes the digest); hashed as they are sent
        rng = random.Random(0x6A7E)
        for _ in range(size // block_size):
            block = rng.randbytes(block_size)
            sent.update(block)
            yield block

    stored = env.repo_dir / "bigfile.bin"
    pid = env.gateway.pid
    _reset_vm_hwm(pid)
    rss_before_mib = _vm_rss_kib(pid) / 1024
    try:
        conn = http.client.HTTPConnection("127.0.0.1", env.gateway.port, timeout=300)
        conn.request("PUT", f"/{DEST}/bigfile.bin", body=body(),
                     headers={"Authorization": basic(*NODE), "Content-Length": str(size)})
        response = conn.getresponse()
        response.read()
        conn.close()
        peak_mib = _vm_hwm_kib(pid) / 1024
        print(f"gateway RSS before the upload {rss_before_mib:.1f} MiB, "
              f"peak during it {peak_mib:.1f} MiB (bound {PEAK_RSS_BOUND_MIB} MiB)")
        assert response.status in (200, 201, 204)
        assert stored.stat().st_size == size
        assert _file_sha256(stored) == sent.hexdigest(), "stored bytes differ from those sent"
        assert peak_mib < PEAK_RSS_BOUND_MIB, (
            f"gateway peak RSS {peak_mib:.0f} MiB (before the upload {rss_before_mib:.0f} MiB)")
    finally:
        stored.unlink(missing_ok=True)


def test_health_reports_backends(env: Env) -> None:
    status, _, body = env.request("GET", "/health")
    assert status == 200
    document = json.loads(body)
    assert document["status"] == "ok"
    assert set(document["backends"]) == {"restic", "restic-append-only", "webdav"}
    assert all(b["state"] == "running" for b in document["backends"].values())
    assert document["destinations"][DEST]["served"] == "here"
    assert NODE[1] not in body.decode()
