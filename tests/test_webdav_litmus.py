"""WebDAV COPY and MOVE through the gateway, and the litmus WebDAV suite (spec section 7).

Real redis-server, real rclone children, real gateway, real litmus: WebDAV through
the gateway must pass exactly the litmus tests that `rclone serve webdav` alone
passes, with the same flags, serving an empty directory.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
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
)

from backends.kinds import Backend
from backends.manager import rclone_argv

DEST = "5e0c3b7a-9d21-4f6e-8a3b-2c4d6e8f0a11"
OTHER_DEST = "6f1d4c8b-0e32-4a7f-9b4c-3d5e7f9a1b22"
NODE = ("node/1", "litmus-node-password-1")
TRAEFIK = ("module/traefik1", "litmus-traefik-password-2")
TRAEFIK_UUID = "7a2e5d9c-1f43-4b80-8c5d-4e6f8a0b2c33"
LITMUS_SUITES = "basic copymove props locks http"
LITMUS_TIMEOUT = 120.0

# One test's outcome in litmus's output, which redraws a line with "\r" as a test runs:
# " 9. copy_nodestcoll....... pass", "18. cond_put_corrupt_token WARNING: ...",
# "    ...................... pass (with 1 warning)".
_SUITE = re.compile(r"-> running `(\w+)'")
_SUMMARY = re.compile(r"<- summary for `(\w+)'")
_TEST = re.compile(r"\s*(\d+)\. (\w+)[. ]*(.*)")
_VERDICT = re.compile(r"\s*\.+ (.*)")


def litmus_results(output: str) -> dict[str, str]:
    """`suite/number.name` -> pass, FAIL, WARNING or SKIPPED, from litmus's output."""
    results: dict[str, str] = {}
    suite, current = "?", None
    for piece in re.split(r"[\r\n]", output):
        if match := _SUITE.match(piece):
            suite, current = match.group(1), None
            continue
        if match := _TEST.fullmatch(piece):
            current = f"{suite}/{int(match.group(1)):02d}.{match.group(2)}"
            rest = match.group(3)
        elif current is not None and (match := _VERDICT.fullmatch(piece)):
            rest = match.group(1)
        else:
            continue
        if rest.startswith("pass"):
            verdict = "WARNING" if "warning" in rest else "pass"
            results[current] = results.get(current, verdict)
        elif rest.startswith(("FAIL", "SKIPPED", "WARNING")):
            verdict = rest.split(None, 1)[0].rstrip(":")
            if results.get(current) != "FAIL":
                results[current] = verdict
    return results


def run_litmus(url: str, workdir: Path, *credentials: str) -> dict[str, str]:
    """Every litmus suite of LITMUS_SUITES against `url`, each test's verdict."""
    litmus = shutil.which("litmus")
    assert litmus is not None, "litmus not installed (run scripts/bootstrap.sh)"
    workdir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [litmus, "--keep-going", url, *credentials],
        cwd=workdir, env={**os.environ, "TESTS": LITMUS_SUITES}, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, errors="replace", timeout=LITMUS_TIMEOUT,
    )
    finished = set(_SUMMARY.findall(result.stdout))
    assert finished == set(LITMUS_SUITES.split()), (
        f"litmus did not finish every suite (exit {result.returncode}):\n"
        f"{result.stdout}\n{result.stderr}")
    return litmus_results(result.stdout)


@dataclass
class Env:
    gateway: GatewayProcess
    cluster: Cluster
    other_storage: Path

    def storage(self, uuid: str = DEST) -> Path:
        """Where a destination's files are: this node's local repository, or a directory."""
        return self.gateway.local_repo if uuid == DEST else self.other_storage

    def request(self, method: str, path: str, who: tuple[str, str] | None = None, *,
                headers: dict[str, str] | None = None,
                body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=30)
        try:
            return send_request(conn, method, path, who, headers=headers, body=body)
        finally:
            conn.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.gateway.port}{path}"


@pytest.fixture(scope="module")
def env(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("webdav")
    other_storage = workdir / "other-storage"
    other_storage.mkdir()
    # A database of its own: other modules flush database 0 between their tests.
    with fresh_cluster(redis_server, db=8) as cluster:
        cluster.add_user(*NODE)
        cluster.add_user(*TRAEFIK)
        cluster.set_module("traefik1", TRAEFIK_UUID)
        cluster.set_node_vpn(1, "10.5.4.1")
        cluster.set_network("10.5.4.0/24")
        cluster.add_destination(DEST, provider="cluster", url="webdav:http://10.5.4.1:4694",
                                name="local")
        cluster.add_destination(OTHER_DEST, provider="rclone", url="rclone:local",
                                name="other", basepath=str(other_storage),
                                rclone_conf=f"[{OTHER_DEST}]\ntype = local\n")
        with running_gateway(redis_server.db_url(8), workdir / "gateway") as gateway:
            yield Env(gateway, cluster, other_storage)


@pytest.fixture
def plain_webdav(tmp_path: Path) -> Iterator[str]:
    """`rclone serve webdav` alone, as the gateway starts it but on TCP, serving an empty
    directory; yields its URL."""
    root = tmp_path / "plain-root"
    root.mkdir()
    conf = tmp_path / "plain-conf" / "rclone.conf"
    conf.parent.mkdir()
    conf.touch(mode=0o600)
    port = free_port()
    argv = rclone_argv(str(Path(sys.executable).parent / "rclone"), Backend.WEBDAV, conf,
                       tmp_path / "unused.sock", str(root))
    argv[argv.index("--addr") + 1] = f"127.0.0.1:{port}"
    with open(tmp_path / "plain-rclone.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, process_group=0)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "plain-rclone.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "rclone serve webdav did not listen"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_litmus_results_are_those_of_rclone_alone(
    env: Env, plain_webdav: str, tmp_path: Path
) -> None:
    alone = run_litmus(plain_webdav, tmp_path / "litmus-alone")
    through = run_litmus(env.url(f"/{DEST}/"), tmp_path / "litmus-gateway", *NODE)
    assert "copymove/03.copy_simple" in alone
    differ = sorted(name for name in alone.keys() | through.keys()
                    if alone.get(name) != through.get(name))
    table = "\n".join(f"{name:40} {alone.get(name, '-'):8} {through.get(name, '-')}"
                      for name in sorted(alone.keys() | through.keys()))
    assert not differ, (f"{len(differ)} litmus results differ: {differ}\n"
                        f"{'test':40} {'alone':8} through the gateway\n{table}")


def _file(env: Env, path: str, content: bytes) -> None:
    status = env.request("PUT", f"/{DEST}/{path}", NODE, body=content)[0]
    assert status in (200, 201, 204)


def test_node_copies_and_moves_files_under_a_destination(env: Env) -> None:
    assert env.request("MKCOL", f"/{DEST}/copymove/", NODE)[0] == 201
    _file(env, "copymove/a%20file.txt", b"copied content\n")
    status, _, body = env.request(
        "COPY", f"/{DEST}/copymove/a%20file.txt", NODE,
        headers={"Destination": env.url(f"/{DEST}/copymove/copy%C3%A9.txt")})
    assert status == 201, body
    base = env.storage() / "copymove"
    assert (base / "copyé.txt").read_bytes() == b"copied content\n"
    assert (base / "a file.txt").read_bytes() == b"copied content\n"

    # A path alone names the same host.
    status, _, body = env.request("MOVE", f"/{DEST}/copymove/a%20file.txt", NODE,
                                  headers={"Destination": f"/{DEST}/copymove/moved.txt"})
    assert status == 201, body
    assert (base / "moved.txt").read_bytes() == b"copied content\n"
    assert not (base / "a file.txt").exists()

    # A collection, with everything below it.
    status, _, body = env.request("COPY", f"/{DEST}/copymove/", NODE,
                                  headers={"Destination": env.url(f"/{DEST}/copied/"),
                                           "Depth": "infinity"})
    assert status == 201, body
    assert (env.storage() / "copied" / "moved.txt").read_bytes() == b"copied content\n"


LOCKINFO = (b'<?xml version="1.0" encoding="utf-8"?><lockinfo xmlns="DAV:"><lockscope>'
            b"<exclusive/></lockscope><locktype><write/></locktype></lockinfo>")


def test_lock_holder_writes_with_a_tagged_if(env: Env) -> None:
    _file(env, "locked.txt", b"before\n")
    status, headers, body = env.request("LOCK", f"/{DEST}/locked.txt", NODE, body=LOCKINFO,
                                        headers={"Content-Type": "application/xml"})
    assert status == 200, body
    token = headers["lock-token"]
    try:
        assert env.request("PUT", f"/{DEST}/locked.txt", NODE, body=b"no token\n")[0] == 423
        tagged = f"<{env.url(f'/{DEST}/locked.txt')}> ({token})"
        status, _, body = env.request("PUT", f"/{DEST}/locked.txt", NODE, body=b"after\n",
                                      headers={"If": tagged})
        assert status in (201, 204), body
        assert (env.storage() / "locked.txt").read_bytes() == b"after\n"
        status, _, body = env.request("PUT", f"/{DEST}/locked.txt", NODE, body=b"x",
                                      headers={"If": tagged.replace("locked", "a/../locked")})
        assert (status, b"dot segment" in body) == (400, True)
    finally:
        assert env.request("UNLOCK", f"/{DEST}/locked.txt", NODE,
                           headers={"Lock-Token": token})[0] == 204


def test_module_may_not_copy_or_move(env: Env) -> None:
    for collection in ("traefik/", f"traefik/{TRAEFIK_UUID}/"):
        assert env.request("MKCOL", f"/{DEST}/{collection}", NODE)[0] in (201, 405)
    _file(env, f"traefik/{TRAEFIK_UUID}/config", b"repository config\n")
    for method in ("COPY", "MOVE"):
        status, _, body = env.request(
            method, f"/{DEST}/traefik/{TRAEFIK_UUID}/config", TRAEFIK,
            headers={"Destination": env.url(f"/{DEST}/traefik/{TRAEFIK_UUID}/stolen")})
        assert status == 403, body
    assert sorted(p.name for p in (env.storage() / "traefik" / TRAEFIK_UUID).iterdir()) == [
        "config"]


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(("destination", "status", "reason"), [
    ("/{other}/elsewhere.txt", 403, b"Destination must stay under the same destination"),
    ("{url}/{other}/elsewhere.txt", 403, b"Destination must stay under the same destination"),
    ("/", 403, b"Destination must stay under the same destination"),
    ("http://127.0.0.1:1/{dest}/x.txt", 400, b"another host"),
    ("ftp://127.0.0.1/{dest}/x.txt", 400, b"scheme"),
    ("/{dest}/sub/../x.txt", 400, b"dot segment"),
    ("/{dest}/%2e%2E/x.txt", 400, b"dot segment"),
    ("/{dest}/a%2Fb.txt", 400, b"escaped '/'"),
    ("/{dest}/a%zz.txt", 400, b"malformed percent-escape"),
    ("/{dest}//x.txt", 400, b"empty path segment"),
    ("/{dest}/x.txt?query", 400, b"query or fragment"),
])
def test_bad_or_foreign_destinations_are_refused_and_nothing_is_copied(
    env: Env, destination: str, status: int, reason: bytes
) -> None:
    _file(env, "source.txt", b"source\n")
    before = {uuid: files(env.storage(uuid)) for uuid in (DEST, OTHER_DEST)}
    value = destination.format(dest=DEST, other=OTHER_DEST, url=env.url(""))
    for method in ("COPY", "MOVE"):
        got, _, body = env.request(method, f"/{DEST}/source.txt", NODE,
                                   headers={"Destination": value})
        assert (got, reason in body) == (status, True), body
    assert {uuid: files(env.storage(uuid)) for uuid in (DEST, OTHER_DEST)} == before


def test_copy_without_destination_is_a_bad_request(env: Env) -> None:
    _file(env, "lonely.txt", b"lonely\n")
    status, _, body = env.request("COPY", f"/{DEST}/lonely.txt", NODE)
    assert status == 400 and b"Destination" in body
