"""Hardening against hostile callers, end to end against a real gateway: throttled password
guessing, verified uploads, hostile HTTP clients and a fuzz of request heads."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hypothesis
import pytest
from harness import (
    REST_ACCEPT,
    GatewayProcess,
    RedisServer,
    basic,
    fresh_cluster,
    raw_request,
    read_response,
    send_request,
    stop_gateways,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from identities import (
    DEST,
    DOKUWIKI,
    DOKUWIKI_UUID,
    LDAP,
    LDAP_UUID,
    MAIL,
    MAIL_UUID,
    NODE,
    NODE_ID,
    TRAEFIK,
    TRAEFIK_UUID,
)

from gateway.access.throttle import LoginThrottle, ThrottleRules, credential_key

# The modules, by the parts they play here.
ALICE, ALICE_UUID = TRAEFIK, TRAEFIK_UUID
BOB, BOB_UUID = DOKUWIKI, DOKUWIKI_UUID
CAROL, CAROL_UUID = MAIL, MAIL_UUID
DAVE, DAVE_UUID = LDAP, LDAP_UUID
MAX_CONNECTIONS = 400
HEADER_TIMEOUT = 5.0
OBJECT_TYPES = ("data", "index", "keys", "locks", "snapshots")
SMALL_KINDS = ("keys", "locks")  # a module's are at most 64 KiB (spec section 4, "Sizes")


def body_size(kind: str, large: int) -> int:
    """`large` bytes, or a size under the limit of a kind a module may only store small."""
    return 60_000 if kind in SMALL_KINDS else large


@dataclass
class Env:
    gateway: GatewayProcess

    @property
    def port(self) -> int:
        return self.gateway.port

    @property
    def repo_dir(self) -> Path:
        return self.gateway.local_repo

    def request(self, method: str, path: str, who: tuple[str, str] | None = None, *,
                body: bytes | Iterator[bytes] | None = None, rest: bool = True,
                headers: dict[str, str] | None = None,
                conn: http.client.HTTPConnection | None = None,
                ) -> tuple[int, dict[str, str], bytes]:
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            return send_request(conn, method, path, who, headers=headers, body=body, rest=rest)
        finally:
            if own:
                conn.close()


def start_gateway(redis_server: RedisServer, workdir: Path) -> GatewayProcess:
    return GatewayProcess.start(redis_server.url, NODE_ID, workdir,
                                extra_args=["--max-connections", str(MAX_CONNECTIONS)])


@pytest.fixture(scope="module")
def seeded(redis_server: RedisServer) -> Iterator[None]:
    """The cluster of this module in Redis: four modules, node 1, one local destination."""
    with fresh_cluster(redis_server) as cluster:
        for who, module_uuid in ((ALICE, ALICE_UUID), (BOB, BOB_UUID), (CAROL, CAROL_UUID),
                                 (DAVE, DAVE_UUID)):
            cluster.add_user(*who)
            cluster.set_module(who[0].removeprefix("module/"), module_uuid)
        cluster.add_user(*NODE)
        cluster.set_node_vpn(1, "10.5.4.1")
        cluster.set_network("10.5.4.0/24")
        cluster.add_destination(DEST, provider="cluster", url="webdav:http://10.5.4.1:4694")
        yield


@pytest.fixture(scope="module")
def env(seeded: None, redis_server: RedisServer,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """The module's gateway, shared by the tests that leave its login throttle alone (or
    only fail logins of their own). As on a running node, the node agent and the modules
    have logged in once: their credentials are proven, so the fuzz, which also sends a wrong
    `node/1` password, cannot lock them out whatever the order of the tests."""
    gateway = start_gateway(redis_server, tmp_path_factory.mktemp("security"))
    try:
        shared = Env(gateway)
        for who in (NODE, ALICE, BOB):
            assert shared.request("GET", "/", who, rest=False)[0] == 200, who
        yield shared
    finally:
        stop_gateways(gateway)


@pytest.fixture
def own_gateway(seeded: None, redis_server: RedisServer, tmp_path: Path) -> Iterator[Env]:
    """A gateway of the test's own, same cluster: its login throttle has seen nothing, so a
    test that makes 127.0.0.1 guess passwords (or makes it "hot") affects no other test."""
    gateway = start_gateway(redis_server, tmp_path / "gateway")
    try:
        yield Env(gateway)
    finally:
        stop_gateways(gateway)


def repo_path(app: str, module_uuid: str) -> str:
    return f"/{DEST}/{app}/{module_uuid}"


def make_bob_repo(env: Env) -> str:
    """Bob's repository with a config, for requests that must succeed."""
    path = repo_path("dokuwiki", BOB_UUID)
    assert env.request("POST", path + "/?create=true", BOB)[0] == 200
    assert env.request("POST", path + "/config", BOB, body=b"bob's config")[0] == 200
    return path


@pytest.fixture(scope="module")
def bob_repo(env: Env) -> str:
    return make_bob_repo(env)


# --------------------------------------------------------------------------- password guessing


def test_wrong_passwords_for_one_user_get_429_while_other_users_on_the_address_work(
    own_gateway: Env,
) -> None:
    env = own_gateway
    bob_repo = make_bob_repo(env)
    path = repo_path("ldap", DAVE_UUID) + "/config"
    wrong = ("module/ldap1", "guess-not-the-password")
    conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=30)
    answers: list[tuple[int, dict[str, str], float]] = []
    for _ in range(300):
        started = time.monotonic()
        status, headers, _ = env.request("GET", path, wrong, conn=conn)
        answers.append((status, headers, time.monotonic() - started))
    conn.close()
    statuses = [a[0] for a in answers]
    limits = ThrottleRules()
    refused_from = int(limits.refuse_at)
    assert statuses[:refused_from] == [401] * refused_from
    assert statuses[refused_from:] == [429] * (300 - refused_from)
    # slowed before refused: the 401s past `slow_after` wait, together, at least a second
    slowed = sum(a[2] for a in answers[int(limits.slow_after):refused_from])
    assert slowed >= 1.0, slowed
    for _, headers, _ in answers[refused_from:]:
        assert 1 <= int(headers["retry-after"]) <= 600
    # the right password does not get through either while refused: it is not even checked
    assert env.request("GET", path, DAVE)[0] == 429
    # other users on 127.0.0.1 are not locked out, nor throttled for a single mistake
    assert env.request("GET", bob_repo + "/config", BOB)[0] == 200
    snapshot = b"bob's snapshot"
    snapshot_path = f"{bob_repo}/snapshots/{hashlib.sha256(snapshot).hexdigest()}"
    assert env.request("POST", snapshot_path, BOB, body=snapshot)[0] == 200
    assert env.request("GET", path, ("module/dokuwiki1", "typo"))[0] == 401
    assert env.request("GET", path, NODE)[0] == 404  # no repository there yet: not refused
    assert "guess-not-the-password" not in env.gateway.log_text()


def test_invented_user_names_do_not_lock_out_real_users(own_gateway: Env) -> None:
    """Many names from one address make it 'hot': failing users are refused sooner,
    users that do not fail are not refused at all."""
    env = own_gateway
    bob_repo = make_bob_repo(env)
    conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=30)
    statuses = {env.request("GET", "/", (f"module/invented{i}", "x"), conn=conn)[0]
                for i in range(200)}
    conn.close()
    assert statuses == {401}  # one failure per name: not refused, just wrong
    carol = repo_path("mail", CAROL_UUID) + "/config"
    assert [env.request("GET", carol, ("module/mail1", "wrong"))[0] for _ in range(4)] == [
        401, 401, 401, 429]
    assert env.request("GET", bob_repo + "/config", BOB)[0] == 200


def test_throttle_state_stays_bounded_under_100000_user_names() -> None:
    throttle = LoginThrottle()
    now = 1000.0
    for i in range(100_000):
        name = f"module/{i:06d}" + "x" * (i % 500)
        if throttle.check("127.0.0.1", name, now).allowed:
            throttle.failed("127.0.0.1", name, now)
        now += 0.001
    assert throttle.tracked <= 2 * throttle.limits.capacity
    # the address is hot, so a failing user is refused after a few failures ...
    for _ in range(int(throttle.limits.hot_refuse_at)):
        assert throttle.check("127.0.0.1", "module/real1", now).allowed
        throttle.failed("127.0.0.1", "module/real1", now)
    assert not throttle.check("127.0.0.1", "module/real1", now).allowed
    # ... while another address, and a user without failures, are untouched
    assert throttle.check("127.0.0.1", "module/other1", now).allowed
    assert throttle.check("10.5.4.2", "module/real1", now).allowed


def test_throttle_forgives_with_time() -> None:
    throttle = LoginThrottle(ThrottleRules(half_life=10.0))
    now = 0.0
    for _ in range(10):
        throttle.failed("10.5.4.2", "node/2", now)
    verdict = throttle.check("10.5.4.2", "node/2", now)
    assert not verdict.allowed
    assert not throttle.check("10.5.4.2", "node/2", now + verdict.retry_after - 1).allowed
    assert throttle.check("10.5.4.2", "node/2", now + verdict.retry_after).allowed


def test_throttle_serves_proven_credentials_and_keeps_refusing_guesses() -> None:
    throttle = LoginThrottle(ThrottleRules(half_life=10.0))
    now = 0.0
    right = credential_key("node/3", b"r" * 32)
    throttle.succeeded(right)
    for i in range(200):
        guess = credential_key("node/3", i.to_bytes(32, "big"))
        if throttle.check("127.0.0.1", "node/3", now, guess).allowed:
            throttle.failed("127.0.0.1", "node/3", now, guess)
    # the holder of the right password is served, however hot its source is
    assert throttle.check("127.0.0.1", "node/3", now, right).allowed
    throttle.succeeded(right)
    # and its success does not wipe the guesser's record
    assert not throttle.check("127.0.0.1", "node/3", now,
                              credential_key("node/3", b"g" * 32)).allowed
    assert not throttle.check("127.0.0.1", "node/3", now).allowed
    # credentials that fail (a password since changed) lose their standing
    throttle.failed("127.0.0.1", "node/3", now, right)
    assert not throttle.check("127.0.0.1", "node/3", now, right).allowed


# --------------------------------------------------------------------------- verified uploads


def stored_object(env: Env, app: str, module_uuid: str, kind: str, object_id: str) -> Path:
    """Where rclone serve restic keeps an object in a local repository."""
    base = env.repo_dir / app / module_uuid / kind
    return base / object_id[:2] / object_id if kind == "data" else base / object_id


@pytest.fixture(scope="module")
def alice_repo(env: Env) -> str:
    path = repo_path("traefik", ALICE_UUID)
    status, _, _ = env.request("POST", path + "/?create=true", NODE)
    assert status == 200
    return path


@pytest.mark.parametrize("kind", OBJECT_TYPES)
def test_module_upload_not_matching_its_name_gets_400_and_leaves_nothing(
    env: Env, alice_repo: str, kind: str
) -> None:
    # several chunks, most of them reaching the backend (keys and locks: one)
    body = os.urandom(body_size(kind, 1_500_000))
    object_id = hashlib.sha256(body[:-1] + bytes([body[-1] ^ 1])).hexdigest()
    status, _, answer = env.request("POST", f"{alice_repo}/{kind}/{object_id}", ALICE,
                                    body=body)
    assert status == 400, answer
    assert b"sha256" in answer
    assert not stored_object(env, "traefik", ALICE_UUID, kind, object_id).exists()
    assert not list(env.repo_dir.rglob(f"*{object_id}*"))
    assert env.request("GET", f"{alice_repo}/{kind}/{object_id}", NODE)[0] == 404
    listing = env.request("GET", f"{alice_repo}/{kind}/", NODE)
    assert listing[0] == 200 and object_id.encode() not in listing[2]


@pytest.mark.parametrize("kind", OBJECT_TYPES)
def test_module_upload_matching_its_name_is_stored(env: Env, alice_repo: str, kind: str) -> None:
    body = os.urandom(body_size(kind, 700_000))
    object_id = hashlib.sha256(body).hexdigest()
    status, _, _ = env.request("POST", f"{alice_repo}/{kind}/{object_id}", ALICE, body=body)
    assert status == 200
    assert stored_object(env, "traefik", ALICE_UUID, kind, object_id).read_bytes() == body
    assert env.request("GET", f"{alice_repo}/{kind}/{object_id}", NODE)[2] == body
    stored = stored_object(env, "traefik", ALICE_UUID, kind, object_id).stat()
    # a retry with the same bytes (its answer was lost) succeeds without writing anything
    status, _, answer = env.request("POST", f"{alice_repo}/{kind}/{object_id}", ALICE, body=body)
    assert (status, answer) == (200, b"object stored already\n")
    # other bytes never replace it
    status, _, answer = env.request("POST", f"{alice_repo}/{kind}/{object_id}", ALICE,
                                    body=b"other bytes")
    assert status == 403 and b"exists" in answer
    after = stored_object(env, "traefik", ALICE_UUID, kind, object_id)
    assert after.read_bytes() == body
    assert (after.stat().st_ino, after.stat().st_mtime_ns) == (stored.st_ino, stored.st_mtime_ns)


def test_empty_and_tiny_uploads_are_verified(env: Env, alice_repo: str) -> None:
    empty_id = hashlib.sha256(b"").hexdigest()
    other_id = hashlib.sha256(b"y").hexdigest()
    assert env.request("POST", f"{alice_repo}/keys/{other_id}", ALICE, body=b"")[0] == 400
    assert env.request("POST", f"{alice_repo}/keys/{other_id}", ALICE, body=b"x")[0] == 400
    assert not stored_object(env, "traefik", ALICE_UUID, "keys", other_id).exists()
    assert env.request("POST", f"{alice_repo}/keys/{empty_id}", ALICE, body=b"")[0] == 200
    assert env.request("POST", f"{alice_repo}/keys/{other_id}", ALICE, body=b"y")[0] == 200


def test_module_upload_without_content_length_gets_411(env: Env, alice_repo: str) -> None:
    object_id = hashlib.sha256(b"abc").hexdigest()
    head = (f"POST {alice_repo}/data/{object_id} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {basic(*ALICE)}\r\nAccept: {REST_ACCEPT}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n").encode()
    status, _, _ = raw_request("127.0.0.1", env.port, head)
    assert status == 411
    assert not stored_object(env, "traefik", ALICE_UUID, "data", object_id).exists()


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_256_mib_verified_upload_streams_in_bounded_memory(env: Env, alice_repo: str) -> None:
    block = os.urandom(1024 * 1024)
    count = 256
    digest = hashlib.sha256()
    for _ in range(count):
        digest.update(block)
    object_id = digest.hexdigest()
    peak_before = _vm_hwm_kib(env.gateway.pid)
    status, _, _ = env.request(
        "POST", f"{alice_repo}/data/{object_id}", ALICE, body=(block for _ in range(count)),
        headers={"Content-Length": str(count * len(block))},
    )
    assert status == 200
    stored = stored_object(env, "traefik", ALICE_UUID, "data", object_id)
    assert stored.stat().st_size == count * len(block)
    stored.unlink()
    grown_mib = (_vm_hwm_kib(env.gateway.pid) - peak_before) / 1024
    assert grown_mib < 64, f"gateway peak RSS grew by {grown_mib:.0f} MiB"


# --------------------------------------------------------------------------- hostile clients

AUTH_LINE = f"Authorization: {basic(*NODE)}\r\n".encode()
TOKEN = basic(*NODE).removeprefix("Basic ").encode()


def exchange(port: int, data: bytes, timeout: float = 10) -> tuple[list[bytes], bool]:
    """Sends `data`, reads until the server closes: (status lines seen, closed by server)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            return _status_lines(received), False
    return _status_lines(received), True


def _status_lines(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.")]


OVERSIZED = {
    "request line": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"\r\n",
    "header field": b"GET / HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"X-Big: " + b"b" * 9000
                    + b"\r\n\r\n",
    "header count": b"GET / HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE
                    + b"".join(b"X-%d: v\r\n" % i for i in range(120)) + b"\r\n",
    "whole head": b"GET / HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE
                  + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 4000) for i in range(10)) + b"\r\n",
}


@pytest.mark.parametrize("data", OVERSIZED.values(), ids=OVERSIZED.keys())
def test_oversized_request_heads_get_431(env: Env, data: bytes) -> None:
    status, _, body = raw_request("127.0.0.1", env.port, data)
    assert status == 431
    assert len(body) < 64 and b"v" * 10 not in body and b"a" * 10 not in body


def test_a_request_head_trickled_past_its_limit_gets_431(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        received = b""
        try:
            for i in range(60):  # 60 KiB in pieces: the head limit is 32 KiB
                if select.select([sock], [], [], 0.005)[0]:
                    break  # answered: sending more would only turn the close into a reset
                sock.sendall(b"X-%d: %s\r\n" % (i, b"v" * 1000))
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    assert received.startswith(b"HTTP/1.1 431 "), received[:80]


HTTP2_PREFACES = {
    "the whole preface and a SETTINGS frame":
        [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"],
    # The parser waits for the preface's last 6 bytes: before the fix, a 408 after 5 s.
    "its first 18 bytes": [b"PRI * HTTP/2.0\r\n\r\n"],
    "a PRI line of HTTP/1.1": [b"PRI // HTTP/1.1\r\n\r\n"],
    "in pieces, after an empty line": [b"\r\nP", b"R", b"I * HTTP/2.0\r\n\r\n"],
}


@pytest.mark.parametrize("pieces", HTTP2_PREFACES.values(), ids=HTTP2_PREFACES.keys())
def test_a_connection_that_opens_with_http2s_preface_gets_400(env: Env,
                                                              pieces: list[bytes]) -> None:
    log_offset = env.gateway.log_path.stat().st_size
    with socket.create_connection(("127.0.0.1", env.port), timeout=2 * HEADER_TIMEOUT) as sock:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.05)
        status, headers, body = read_response(sock)
    assert (status, body) == (400, b"HTTP/2 is not served here: use HTTP/1.1\n"), (status, body)
    assert headers["connection"] == "close"

    # The module's gateway is shared: a line of an earlier test may come after the offset.
    def refused() -> list[dict]:
        return [line for line in new_log_lines(env.gateway, log_offset)
                if line.get("reason") == "HTTP/2 is not served here: use HTTP/1.1"]

    deadline = time.monotonic() + 15
    while not (lines := refused()):
        assert time.monotonic() < deadline, "no access line"
        time.sleep(0.05)
    assert [(line["status"], line["source"]) for line in lines] == [(400, "127.0.0.1")]


def test_pri_later_in_a_connection_is_not_taken_for_http2(env: Env) -> None:
    """Only a connection's first bytes can be HTTP/2's preface: later, a packet may start
    with "PRI " inside a field value, in the first request as in the next ones."""
    with socket.create_connection(("127.0.0.1", env.port), timeout=2 * HEADER_TIMEOUT) as sock:
        for _ in range(2):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"X-A: ")
            time.sleep(0.05)
            sock.sendall(b"PRI \r\n\r\n")
            status, _, body = read_response(sock)
            assert status == 200, (status, body)


SMUGGLING = {
    "content-length and transfer-encoding":
        b"POST /health HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE
        + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate content-length":
        b"POST /health HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE
        + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "obsolete line folding":
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"X-A: a\r\n b\r\n\r\n",
    "bare CR":
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"X-A: a\rb\r\n\r\n",
}
FOLLOW_UP = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("data", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_ambiguous_framing_gets_400_and_the_connection_closes(env: Env, data: bytes) -> None:
    # A request pipelined after it is never answered: the connection is closed at once.
    statuses, closed = exchange(env.port, data + FOLLOW_UP)
    assert closed
    assert len(statuses) == 1 and statuses[0].split()[1] == b"400", statuses
    status, _, body = raw_request("127.0.0.1", env.port, data)
    assert status == 400
    assert TOKEN not in body and b"Authorization" not in body and b"X-A" not in body
    assert len(body) < 64


def test_malformed_requests_leave_no_request_bytes_in_the_log(env: Env) -> None:
    for data in [*SMUGGLING.values(), *OVERSIZED.values(),
                 b"G(T / HTTP/1.1\r\n" + AUTH_LINE + b"\r\n",
                 b"GET / HTTP/7.1\r\n" + AUTH_LINE + b"\r\n"]:
        assert raw_request("127.0.0.1", env.port, data)[0] in (400, 431)
    log = env.gateway.log_text()
    assert TOKEN.decode() not in log
    assert "Traceback" not in log
    assert '"decision": "reject"' in log


@pytest.mark.parametrize("value", [b"Basic \x80" + TOKEN, b"Basic \xc3\xa9", b"\xff\xfe"])
def test_non_ascii_credentials_get_401(env: Env, value: bytes) -> None:
    data = b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: " + value + b"\r\n\r\n"
    assert raw_request("127.0.0.1", env.port, data)[0] == 401


def _answer_now(sock: socket.socket, wait: float) -> bytes:
    if not select.select([sock], [], [], wait)[0]:
        return b""
    try:
        return sock.recv(4096)
    except OSError:
        return b""


def test_connections_over_the_cap_get_503(env: Env) -> None:
    extra = 5
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS + extra):
            held.append(socket.create_connection(("127.0.0.1", env.port), timeout=5))
        answers = [b""] * len(held)
        deadline = time.monotonic() + 3  # the 503s of a loaded gateway may take a while
        while True:
            time.sleep(0.2)
            for i, sock in enumerate(held):
                answers[i] = answers[i] or _answer_now(sock, 0.0)
            rejected = [a for a in answers if a.startswith(b"HTTP/")]
            dropped = sum(1 for sock, a in zip(held, answers, strict=True)
                          if not a and select.select([sock], [], [], 0)[0])
            alive = len(held) - len(rejected) - dropped
            if alive <= MAX_CONNECTIONS or time.monotonic() > deadline:
                break
        assert alive <= MAX_CONNECTIONS
        assert rejected and all(
            a.startswith(b"HTTP/1.1 503 ") and b"Retry-After: " in a for a in rejected)
        if alive == MAX_CONNECTIONS:  # no slot freed meanwhile (a slow machine may free some)
            assert len(rejected) >= extra
            status, headers, _ = raw_request("127.0.0.1", env.port, FOLLOW_UP, timeout=5)
            assert status == 503 and int(headers["retry-after"]) >= 1
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 15
    while raw_request("127.0.0.1", env.port, FOLLOW_UP)[0] != 200:
        assert time.monotonic() < deadline, "the gateway did not take connections again"
        time.sleep(0.05)


# Run in a process of its own, so that its 300 sockets and the test's legitimate client do
# not share one interpreter: argv is the port, the connection count and how long to go on.
# Opens the connections, each with an unfinished head, prints when they are all open, then
# sends every connection one more header byte every 0.25 s (never a complete head) until the
# gateway has closed them all or the time is up, and prints for each connection the seconds
# from just before it was opened to its close, and the first bytes the gateway sent on it.
SLOW_CLIENTS = r"""
import json, selectors, socket, sys, time

port, count, limit = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
opened, socks = [], []
for _ in range(count):
    opened.append(time.monotonic())
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    sock.setblocking(False)
    socks.append(sock)
print(json.dumps({"first": opened[0], "last": time.monotonic()}), flush=True)
selector = selectors.DefaultSelector()
for i, sock in enumerate(socks):
    selector.register(sock, selectors.EVENT_READ, i)
closed, answers = {}, {}
deadline = time.monotonic() + limit
next_byte = time.monotonic() + 0.25
while len(closed) < count and time.monotonic() < deadline:
    for key, _ in selector.select(0.05):
        i = key.data
        try:
            answers[i] = key.fileobj.recv(4096)[:12].decode("latin-1")
        except OSError:
            answers[i] = ""
        closed[i] = time.monotonic()
        selector.unregister(key.fileobj)
    if time.monotonic() >= next_byte:
        next_byte += 0.25
        for i, sock in enumerate(socks):
            if i not in closed:
                try:
                    sock.send(b"a")
                except OSError:
                    closed[i], answers[i] = time.monotonic(), ""
                    selector.unregister(sock)
print(json.dumps({"waited": [closed[i] - opened[i] for i in sorted(closed)],
                  "answers": sorted(set(answers.values())), "kept": count - len(closed)}),
      flush=True)
"""


@pytest.mark.serial  # latencies against a baseline taken just before
def test_300_slow_header_connections_are_dropped_and_do_not_delay_others(
    env: Env, bob_repo: str
) -> None:
    """300 clients trickle a request head that never ends: each is dropped once the header
    timeout has passed (not before, and not kept alive by its trickle), and meanwhile a
    legitimate client is served as fast as before. A gateway that let slow heads hold up
    others would make it wait for their drop, about HEADER_TIMEOUT: the bounds on latency
    are far below that, and far above what a loaded machine adds."""
    path = bob_repo + "/config"

    def legitimate() -> float:
        started = time.monotonic()
        status, _, _ = env.request("GET", path, BOB)
        assert status == 200
        return time.monotonic() - started

    baseline = max(legitimate() for _ in range(5))
    slow = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLIENTS, str(env.port), "300", str(3 * HEADER_TIMEOUT)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert slow.stdout is not None
        opened = json.loads(slow.stdout.readline() or "null")
        assert opened is not None, "the slow clients did not start"
        # every slow connection is held from `last` until at least `first` + HEADER_TIMEOUT
        held_until = opened["first"] + HEADER_TIMEOUT - 0.5
        assert opened["last"] < held_until, "opening the slow connections took too long"
        latencies = []
        while time.monotonic() < held_until or len(latencies) < 3:
            latencies.append(legitimate())
            time.sleep(0.1)
        result = json.loads(slow.communicate(timeout=3 * HEADER_TIMEOUT + 30)[0])
    finally:
        if slow.poll() is None:
            slow.kill()
        slow.wait()
    assert statistics.median(latencies) < baseline + 1.0, (baseline, latencies)
    assert max(latencies) < baseline + HEADER_TIMEOUT / 2, (baseline, latencies)
    assert result["kept"] == 0, f"{result['kept']} slow clients kept"
    assert set(result["answers"]) <= {"", "HTTP/1.1 408"}, result["answers"]
    waited = sorted(result["waited"])
    assert waited[0] >= HEADER_TIMEOUT - 0.5, waited[0]
    assert waited[-1] <= 2 * HEADER_TIMEOUT, waited[-1]
    assert legitimate() < baseline + HEADER_TIMEOUT / 2


# --------------------------------------------------------------------------- fuzz

# A fixed number of examples per fuzz test, all sent: no time budget. Their seed is
# pytest-randomly's (so that --randomly-seed=N replays them) unless GATEWAY_FUZZ_SEED is set;
# each fuzz test prints it, and adds it to its failure.
FUZZ_EXAMPLES = 500
ANSWER_TIMEOUT = 15.0  # seconds for the answer to a complete request: more is a hang
CUT_AFTER = 2.0  # seconds of silence after which a request with bytes inserted is ended

METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PROPFIND", b"MKCOL",
           b"MOVE", b"COPY", b"LOCK", b"PATCH", b"TRACE", b"SEARCH"]
BAD_METHODS = [b"CONNECT", b"get", b"G\x00T", b"", b"PRI"]
GOOD_SEGMENTS = [DEST, "traefik", ALICE_UUID, "config", "data", "keys", "locks", "a" * 64,
                 "_probe_rest_404", "health", "metrics", f"{ALICE_UUID}.json", "~x", "%41"]
BAD_SEGMENTS = ["", ".", "..", "%2e", "%2f", "%00", "%", "%zz", "%c3%a9", "%ff", "\\", "#",
                "\xc3\xa9", "*", "a b", "http:"]
QUERIES = [b"", b"", b"", b"?create=true", b"?x", b"?", b"?%zz", b"?a=%00"]
ALICE_AUTH = f"Authorization: {basic(*ALICE)}".encode()
FIELDS = [
    f"Accept: {REST_ACCEPT}".encode(), f"Accept: {REST_ACCEPT}".encode(),
    ALICE_AUTH, ALICE_AUTH, ALICE_AUTH, ALICE_AUTH,
    f"Authorization: {basic('node/1', 'wrong')}".encode(), b"Authorization: Basic !!!",
    b"Authorization: Bearer x", b"Depth: 0", b"Depth: 1", b"Depth: infinity",
    b"Content-Length: 0", b"Expect: 100-continue", b"Connection: close",
    f"Destination: http://x/{DEST}/traefik/{ALICE_UUID}/y".encode(), b"Range: bytes=0-1",
    b"X-Gateway-Forwarded: 1", b"Accept-Encoding: gzip",
]
BAD_FIELDS = [
    b"Host: x", b"Host: \xff",
    b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 99999999999999999999",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked",
    b"Connection: keep-alive, Upgrade", b"Upgrade: websocket", b"Bad Name: x", b": empty",
    b"X: \x00", b"X: a\rb", b"X: a\nb", b" folded", b"X: \xff\xfe",
]


@dataclass(frozen=True)
class Fuzzed:
    head: bytes
    body: bytes  # what the framing fields of the head, as drawn, announce
    inserted: bool  # random bytes were inserted into the head: its framing may be another


def body_for(fields: list[bytes]) -> bytes:
    """The body the framing fields announce (conflicting ones get a 400 before any body)."""
    if any(f.startswith(b"Transfer-Encoding:") and f.endswith(b"chunked") for f in fields):
        return b"0\r\n\r\n"
    return b"hello" if b"Content-Length: 5" in fields else b""


@st.composite
def requests_to_fuzz(draw: st.DrawFn, hostile: bool) -> Fuzzed:
    """Requests near what the gateway serves, each complete with the body its fields
    announce; hostile ones add bad methods, versions, fields and framing, and insert a few
    random bytes into the head of a third of them."""
    def pick(good: list[bytes], bad: list[bytes]) -> bytes:
        return draw(st.sampled_from(good + bad if hostile else good))

    segments = GOOD_SEGMENTS * 3 + BAD_SEGMENTS
    target = ("/" + "/".join(draw(st.lists(st.sampled_from(segments), max_size=6)))).encode()
    target += draw(st.sampled_from([b"", b"", b"/"])) + draw(st.sampled_from(QUERIES))
    version = pick([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"], [b"HTTP/2.0", b"HTTP/1.x", b""])
    line = b" ".join([pick(METHODS, BAD_METHODS), target, version])
    fields = draw(st.lists(st.sampled_from(FIELDS + BAD_FIELDS if hostile else FIELDS),
                           max_size=5))
    if not hostile or draw(st.booleans()):
        fields.insert(0, b"Host: x")
    head = line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"
    inserted = hostile and draw(st.sampled_from([False, False, True]))
    if inserted:
        at = draw(st.integers(0, len(head) - 4))
        head = head[:at] + draw(st.binary(min_size=1, max_size=4)) + head[at:]
    return Fuzzed(head, body_for(fields), inserted)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str]]:
    """Status and lower-cased headers of the final answer on `sock` (1xx skipped); status 0
    when the connection closes without one."""
    received = b""
    while True:
        while b"\r\n\r\n" not in received:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return 0, {}
            received += chunk
        head, received = received.split(b"\r\n\r\n", 1)
        lines = head.decode("iso-8859-1").split("\r\n")
        assert lines[0].startswith("HTTP/"), lines[0]
        status = int(lines[0].split()[1])
        if not 100 <= status < 200:
            break
    headers = {}
    for field in lines[1:]:
        name, _, value = field.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def foreign_probe(head: bytes) -> bool:
    """Whether `head` is a health probe of a destination not served here (spec section 4,
    step 3: the gateway itself answers 503)."""
    method, _, rest = head.split(b"\r\n", 1)[0].partition(b" ")
    path, _, query = rest.split(b" ", 1)[0].partition(b"?")
    segments = path.split(b"/")
    return (method in (b"GET", b"HEAD") and not query and len(segments) == 3
            and segments[0] == b"" and segments[2] == b"_probe_rest_404"
            and segments[1] != DEST.encode())


def new_log_lines(gateway: GatewayProcess, offset: int) -> list[dict]:
    """The gateway's JSON log lines after byte `offset` of its log."""
    lines = gateway.log_path.read_bytes()[offset:].decode("utf-8", "replace").splitlines()
    parsed = []
    for line in lines:
        with contextlib.suppress(ValueError):  # not JSON, or still being written
            parsed.append(json.loads(line))
    return [line for line in parsed if isinstance(line, dict)]


def gateway_5xx(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line.get("answered_by") == "gateway"
            and line.get("status", 0) >= 500]


def send_and_check(env: Env, fuzzed: Fuzzed) -> bool:
    """The request gets an answer, not a 5xx of the gateway's own (a backend's is passed
    on), and the gateway lives on. Only a request with bytes inserted into its head may
    leave the gateway waiting for more body than it has (it announces another length):
    after CUT_AFTER seconds of silence the client ends it, and the gateway must have
    accounted for it as a request its client left (499). Returns whether it was cut."""
    log_offset = env.gateway.log_path.stat().st_size
    with socket.create_connection(("127.0.0.1", env.port), timeout=ANSWER_TIMEOUT) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(fuzzed.head + fuzzed.body)
        cut = fuzzed.inserted and not select.select([sock], [], [], CUT_AFTER)[0]
        if cut:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        try:
            status, headers = read_answer(sock)
        except TimeoutError:
            pytest.fail(f"no answer and no close within {ANSWER_TIMEOUT} s to {fuzzed}")
    assert env.gateway.proc is not None and env.gateway.proc.poll() is None, "gateway died"
    if status == 0:
        assert cut, f"closed without an answer: {fuzzed}"
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while not any(line.get("status") == 499 for line in
                      new_log_lines(env.gateway, log_offset)):
            assert time.monotonic() < deadline, (
                f"closed without an answer, and not as a request its client left: {fuzzed}"
                f"\n{new_log_lines(env.gateway, log_offset)}")
            time.sleep(0.05)
        return True
    if status >= 500 and "x-gateway-backend" not in headers:
        assert status == 503 and foreign_probe(fuzzed.head), (status, headers, fuzzed)
    return cut


def fuzz_seed(config: pytest.Config) -> int:
    if value := os.environ.get("GATEWAY_FUZZ_SEED"):
        return int(value)
    seed = config.getoption("randomly_seed", None)
    return seed if isinstance(seed, int) else random.SystemRandom().randrange(2**32)


def run_fuzz(env: Env, config: pytest.Config, hostile: bool) -> None:
    seed = fuzz_seed(config)
    replay = f"fuzz seed {seed}: replay with GATEWAY_FUZZ_SEED={seed}"
    print(replay)
    log_offset = env.gateway.log_path.stat().st_size
    sent = cut = 0

    @hypothesis.seed(seed)
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(requests_to_fuzz(hostile=hostile))
    def fuzz(fuzzed: Fuzzed) -> None:
        nonlocal sent, cut
        sent += 1
        cut += send_and_check(env, fuzzed)

    started = time.monotonic()
    try:
        fuzz()
        assert sent >= FUZZ_EXAMPLES, f"only {sent} of {FUZZ_EXAMPLES} examples sent"
        # the same from the gateway's side: its own answers with a 5xx were probes only
        for line in gateway_5xx(new_log_lines(env.gateway, log_offset)):
            assert line["status"] == 503 and line["rule"] == "probe", line
    except BaseException as exc:
        exc.add_note(replay)
        raise
    print(f"{sent} examples in {time.monotonic() - started:.1f} s, {cut} ended by the client")


def test_fuzzed_requests_get_answers_and_no_5xx_of_the_gateway(
    env: Env, pytestconfig: pytest.Config
) -> None:
    run_fuzz(env, pytestconfig, hostile=False)


def test_fuzzed_hostile_requests_get_answers_and_no_5xx_of_the_gateway(
    env: Env, pytestconfig: pytest.Config
) -> None:
    run_fuzz(env, pytestconfig, hostile=True)


def test_the_gateway_is_healthy_and_quiet_after_the_fuzz(env: Env) -> None:
    assert env.gateway.health_status() == 200
    log = env.gateway.log_text()
    assert "Traceback" not in log
    assert "error handling a request" not in log
    assert NODE[1] not in log and TOKEN.decode() not in log
    # whatever wrong passwords were sent as node/1, the node agent is served
    assert env.request("GET", "/", NODE, rest=False)[0] == 200
