"""Large request and response bodies end to end: bodies of several MiB, and of about
200 KiB and 64 KiB, either side of the size where the gateway may stop handling a body
piece by piece. They are stored and read back byte for byte, refused whole when they do
not hash to their name, cut cleanly when their client leaves, carried on kept-alive and
pipelined connections, held to the bandwidth limits (set before or during a transfer) and
counted in the access log and the metrics. Real redis-server and rclone children; the
clients are http.client and raw sockets.

Pinned elsewhere with bodies of several MiB, not again here:
- a node's WebDAV PUT then GET, byte for byte (100 MiB):
  test_gateway.py::test_node_webdav_round_trip (here: the 200 KiB and 64 KiB ones);
- a module's upload whose client leaves after 2 of 4 MiB leaves nothing and is logged
  499: test_gateway.py::test_aborted_upload_leaves_no_partial_object (here: a node's);
- a module's upload limit on a large upload (256 MiB under 32M):
  test_bandwidth.py::test_an_upload_never_goes_faster_than_its_module_limit_and_streams;
- the gateway's download limit on a module's GET (64 MiB under 16M):
  test_bandwidth.py::test_a_download_never_goes_faster_than_the_gateway_limit;
- a limit changed (4M to 16M) or lifted by its schedule during an upload:
  test_bandwidth.py::test_a_limit_changed_in_redis_applies_to_the_upload_running and
  ::test_a_schedule_switching_the_limit_off_lifts_it_mid_upload (here: a limit set
  during a transfer that had none);
- memory: test_gateway.py::test_one_gib_upload_streams_in_flat_memory,
  test_security.py::test_256_mib_verified_upload_streams_in_bounded_memory.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    REST_ACCEPT,
    ModuleRepositories,
    RedisServer,
    ResponseReader,
    basic,
    read_response,
    send_request,
    wait_for,
)
from identities import MODULE_PASSWORD as PASSWORD
from identities import NODE
from prometheus_client.parser import text_string_to_metric_families

DEST = "b16b0d1e-8f8b-4c43-a1d3-7f3f5f7c1a01"
MODULE = "traefik1"
MODULES = {MODULE: ("traefik", "b16b1111-2f87-4e7b-9a34-0a1d9f9e4b01")}
KiB = 1024
MiB = 1024 * KiB
BIG = 8 * MiB + 3  # not a whole number of pages, pieces or reads
SIZES = {"8MiB": BIG, "200KiB": 200 * KiB + 3, "64KiB": 64 * KiB}
TIMEOUT = 120.0  # a client's socket timeout: far beyond any transfer here
DIGEST_MISMATCH = b"body does not match the object name (sha256)\n"
RATE = 8 * MiB  # bytes a second: the limits set here
RATE_TEXT = "8M"
LIMITED = 16 * MiB  # a transfer under a limit: 2 s at RATE
SLOW_ENOUGH = 0.85  # a limited transfer takes at least this share of the time it needs
BURST = 1 * MiB  # what a limit lets through at once, and more
# Bytes of a download that may have passed the limiter when the client stops reading
# for a while: the gateway's socket send buffer at its largest, the 64 KiB the client's
# receive buffer is held to (small_window), the pieces the gateway holds, a burst.
IN_FLIGHT = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2]) + 2 * MiB


class Env(ModuleRepositories):
    DEST, NODE, PASSWORD, MODULES = DEST, NODE, PASSWORD, MODULES


@pytest.fixture(scope="module")
def env(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("large-bodies")
    with Env.serving(redis_server, workdir) as shared:
        shared.create_repository(MODULE)
        yield shared


# --------------------------------------------------------------------------- callers


@dataclass(frozen=True)
class Way:
    """How a caller stores and reads objects: the module through Restic REST (an object
    of its repository, its upload verified against the name), the node through Restic
    REST (the same repository, not verified) or WebDAV (a file at the destination's root).
    """

    name: str
    user: tuple[str, str]
    rest: bool
    limit_prefix: str  # its bwlimit fields: its module's, or the gateway's ("")

    def __str__(self) -> str:
        return self.name

    @property
    def upload_method(self) -> str:
        return "POST" if self.rest else "PUT"

    @property
    def stored_statuses(self) -> tuple[int, ...]:
        return (200,) if self.rest else (201, 204)

    def path(self, env: Env, digest: str) -> str:
        return f"{env.base(MODULE)}/data/{digest}" if self.rest else f"/{DEST}/{digest}.bin"

    def stored(self, env: Env, digest: str) -> Path:
        return env.stored(MODULE, digest) if self.rest else env.gateway.local_repo / (
            f"{digest}.bin")

    def limit(self, direction: str) -> str:
        return self.limit_prefix + direction

    def headers(self) -> dict[str, str]:
        headers = {"Authorization": basic(*self.user)}
        if self.rest:
            headers["Accept"] = REST_ACCEPT
        return headers

    def head(self, method: str, path: str, length: int | None = None) -> bytes:
        """The head of a request as this caller, on the wire."""
        lines = [f"{method} {path} HTTP/1.1", "Host: gateway",
                 *(f"{name}: {value}" for name, value in self.headers().items())]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


MODULE_REST = Way("module-rest", (f"module/{MODULE}", PASSWORD), True, f"module/{MODULE}/")
NODE_REST = Way("node-rest", NODE, True, "")
NODE_WEBDAV = Way("node-webdav", NODE, False, "")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def request(env: Env, way: Way, method: str, path: str, body: bytes | None = None
            ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(env.gateway.host, env.gateway.port, timeout=TIMEOUT)
    try:
        return send_request(conn, method, path, way.user, body=body, rest=way.rest)
    finally:
        conn.close()


def store(env: Env, way: Way, content: bytes) -> str:
    """Uploads `content` as `way`, named by its SHA-256; its path."""
    path = way.path(env, sha256(content))
    status, _, answer = request(env, way, way.upload_method, path, content)
    assert status in way.stored_statuses, (status, answer)
    return path


def assert_held(took: float, held: int, what: str, reported: object) -> None:
    """`what` took `took` seconds, of which `held` bytes had to pass at RATE: no faster
    than the limit allows them (less the SLOW_ENOUGH margin)."""
    assert took >= SLOW_ENOUGH * held / RATE, (
        f"{what} in {took:.2f} s: faster than {RATE_TEXT} allows for {held / MiB:.1f} MiB "
        f"({held / RATE:.1f} s); limit reported: {reported}")


def small_window(env: Env) -> http.client.HTTPConnection:
    """A connection whose receive buffer is held to 64 KiB: what the gateway sends ahead
    of a client that does not read stays in the gateway's send buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
    sock.settimeout(TIMEOUT)
    sock.connect((env.gateway.host, env.gateway.port))
    conn = http.client.HTTPConnection(env.gateway.host, env.gateway.port, timeout=TIMEOUT)
    conn.sock = sock
    return conn


# --------------------------------------------------------------------------- the log


def log_offset(env: Env) -> int:
    return env.gateway.log_path.stat().st_size


def access_lines_of(env: Env, since: int, method: str, path: str) -> list[dict]:
    return [e for e in env.gateway.access_lines(since)
            if e["method"] == method and e.get("path") == path]


GATEWAY_ERROR = re.compile(r"\S+ \S+ (ERROR|CRITICAL) |Traceback")


def gateway_errors(env: Env, since: int) -> list[str]:
    """The gateway's own errors logged from byte `since` on: its ERROR lines and
    tracebacks (its children's lines it logs as INFO), and access lines of a 5xx, the
    reject lines of requests it could not handle among them."""
    text = env.gateway.log_path.read_bytes()[since:].decode("utf-8", "replace")
    errors = []
    for line in text.splitlines():
        if GATEWAY_ERROR.match(line):
            errors.append(line)
        elif line.startswith("{"):
            with contextlib.suppress(ValueError, TypeError):
                if json.loads(line).get("status", 0) >= 500:
                    errors.append(line)
    return errors


def scrape(env: Env) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    conn = http.client.HTTPConnection(env.gateway.host, env.gateway.port, timeout=TIMEOUT)
    try:
        status, _, body = send_request(conn, "GET", "/metrics")
    finally:
        conn.close()
    assert status == 200, body
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples}


# --------------------------------------------------------------------------- tests

# A node's WebDAV PUT and GET of several MiB: test_gateway.py::test_node_webdav_round_trip.
ROUND_TRIPS = [pytest.param(way, size, id=f"{way}-{label}")
               for way in (MODULE_REST, NODE_REST, NODE_WEBDAV)
               for label, size in SIZES.items() if not (way is NODE_WEBDAV and size == BIG)]


@pytest.mark.parametrize(("way", "size"), ROUND_TRIPS)
def test_an_upload_is_stored_and_read_back_byte_for_byte(env: Env, way: Way,
                                                         size: int) -> None:
    content = os.urandom(size)
    digest = sha256(content)
    path = store(env, way, content)
    assert file_sha256(way.stored(env, digest)) == digest, "stored bytes differ from those sent"
    status, headers, got = request(env, way, "GET", path)
    assert (status, headers["content-length"], len(got)) == (200, str(size), size)
    assert sha256(got) == digest, "the bytes read back differ from those sent"
    status, headers, got = request(env, way, "HEAD", path)
    assert (status, headers["content-length"], got) == (200, str(size), b"")


@pytest.mark.parametrize(("way", "size"), ROUND_TRIPS)
def test_an_encoded_upload_is_stored_as_sent_not_decoded(env: Env, way: Way,
                                                         size: int) -> None:
    """A body sent with a Content-Encoding is the client's bytes: a proxy passes them on as
    they are (the name of a module's object is their hash), and never decodes them."""
    content = gzip.compress(os.urandom(size // 2) + bytes(size - size // 2), mtime=0)
    digest = sha256(content)
    conn = http.client.HTTPConnection(env.gateway.host, env.gateway.port, timeout=TIMEOUT)
    try:
        status, _, answer = send_request(conn, way.upload_method, way.path(env, digest),
                                         way.user, headers={"Content-Encoding": "gzip"},
                                         body=content, rest=way.rest)
    finally:
        conn.close()
    assert status in way.stored_statuses, (status, answer)
    assert file_sha256(way.stored(env, digest)) == digest, "stored bytes differ from those sent"


@pytest.mark.parametrize("size", SIZES.values(), ids=list(SIZES))
def test_a_module_upload_that_does_not_hash_to_its_name_is_refused_and_leaves_nothing(
        env: Env, size: int) -> None:
    content = bytearray(os.urandom(size))
    digest = sha256(content)
    content[-1] ^= 1  # the last byte: the mismatch shows only once the whole body is in
    path = MODULE_REST.path(env, digest)
    since = log_offset(env)
    with socket.create_connection((env.gateway.host, env.gateway.port),
                                  timeout=TIMEOUT) as sock:
        sock.sendall(MODULE_REST.head("POST", path, size) + content)
        answers = ResponseReader(sock)
        status, headers, answer = answers.read()
        assert (status, answer) == (400, DIGEST_MISMATCH), (status, answer[:200])
        assert "close" not in headers.get("connection", "").lower(), headers
        # the 400 comes once the backend has dropped what it received: on the same
        # connection, the object is not there
        sock.sendall(MODULE_REST.head("HEAD", path))
        assert answers.read(head_only=True)[0] == 404
    assert not MODULE_REST.stored(env, digest).exists()
    assert not list(env.gateway.local_repo.rglob(f"*{digest}*"))
    for way in (MODULE_REST, NODE_REST):
        for method in ("HEAD", "GET"):
            assert request(env, way, method, path)[0] == 404, (way, method)
    entries = wait_for(lambda: access_lines_of(env, since, "POST", path),
                       "the access line of the refused upload", gateway=env.gateway)
    assert [(e["status"], e["reason"], e["bytes_in"]) for e in entries] == [
        (400, "upload does not match its object name", size)]
    assert gateway_errors(env, since) == []
    # the module's next try, with the right bytes, is stored
    content[-1] ^= 1
    store(env, MODULE_REST, bytes(content))
    assert file_sha256(MODULE_REST.stored(env, digest)) == digest


@pytest.mark.parametrize("pipelined", [False, True], ids=["in-turn", "pipelined"])
@pytest.mark.parametrize("way", [MODULE_REST, NODE_REST], ids=str)
@pytest.mark.parametrize("size", SIZES.values(), ids=list(SIZES))
def test_one_connection_carries_a_large_upload_and_the_requests_after_it(
        env: Env, way: Way, size: int, pipelined: bool) -> None:
    """An upload, then a GET of a small object, a HEAD and a GET of the uploaded one, all
    on one connection: each waiting for the answer before it (in turn), or all sent at
    once behind the upload's body (pipelined)."""
    small = os.urandom(1000)
    small_path = store(env, way, small)
    content = os.urandom(size)
    path = way.path(env, sha256(content))
    requests = [way.head(way.upload_method, path, size) + content, way.head("GET", small_path),
                way.head("HEAD", path), way.head("GET", path)]
    head_only = [False, False, True, False]
    since = log_offset(env)
    answers = []
    with socket.create_connection((env.gateway.host, env.gateway.port),
                                  timeout=TIMEOUT) as sock:
        responses = ResponseReader(sock)
        if pipelined:
            sock.sendall(b"".join(requests))
        for data, head in zip(requests, head_only, strict=True):
            if not pipelined:
                sock.sendall(data)
            status, headers, body = responses.read(head_only=head)
            answers.append((status, headers.get("content-length"), len(body), sha256(body)))
    assert answers == [
        (200, "0", 0, sha256(b"")),
        (200, str(len(small)), len(small), sha256(small)),
        (200, str(size), 0, sha256(b"")),
        (200, str(size), size, sha256(content)),
    ]
    assert file_sha256(way.stored(env, sha256(content))) == sha256(content)
    assert gateway_errors(env, since) == []


@pytest.mark.parametrize("size", SIZES.values(), ids=list(SIZES))
def test_an_upload_answered_before_its_body_is_in_leaves_the_connection_serving(
        env: Env, size: int) -> None:
    """rclone answers a WebDAV PUT under a file 404 before it read the body: the client
    gets the 404, the rest of its body is read and dropped, and its next request on the
    connection is answered; one access line, no error."""
    store(env, NODE_WEBDAV, b"x")  # a file, <digest>.bin, the PUT's would-be parent
    parent = NODE_WEBDAV.path(env, sha256(b"x"))
    path = f"{parent}/child-{size}.bin"
    content = os.urandom(size)
    since = log_offset(env)
    with socket.create_connection((env.gateway.host, env.gateway.port),
                                  timeout=TIMEOUT) as sock:
        responses = ResponseReader(sock)
        sending = threading.Thread(target=sock.sendall, daemon=True,
                                   args=(NODE_WEBDAV.head("PUT", path, size) + content,))
        sending.start()  # in a thread: the answer may come before the body is all sent
        answer = responses.read()
        sending.join(TIMEOUT)
        sock.sendall(NODE_WEBDAV.head("GET", parent))
        after = responses.read()
    assert (answer[0], after[0], after[2]) == (404, 200, b"x"), (answer, after)
    entries = wait_for(lambda: access_lines_of(env, since, "PUT", path),
                       "the access line of the answered upload", gateway=env.gateway)
    assert [entry["status"] for entry in entries] == [404]
    assert gateway_errors(env, since) == []


@dataclass(frozen=True)
class CutUpload:
    content: bytes  # the whole body, of which `sent` bytes went
    digest: str
    path: str
    stored: Path  # where the backend writes it
    sent: int
    since: int  # the gateway log's offset before it
    entry: dict  # its access line


def cut_upload(env: Env, way: Way, method: str, size: int, *,
               partial_written: bool) -> CutUpload:
    """An upload of `size` bytes whose client sends 3/8 of its body and closes the
    connection (once the backend wrote part of it, when `partial_written`): its one
    access line says 499, client went away."""
    content = os.urandom(size)
    digest = sha256(content)
    path, stored = way.path(env, digest), way.stored(env, digest)
    sent = size * 3 // 8
    since = log_offset(env)
    with socket.create_connection((env.gateway.host, env.gateway.port),
                                  timeout=TIMEOUT) as sock:
        sock.sendall(way.head(method, path, size) + content[:sent])
        if partial_written:
            wait_for(lambda: size_of(stored) > 0, "the partial object to be written",
                     gateway=env.gateway)
    entries = wait_for(lambda: access_lines_of(env, since, method, path),
                       "the access line of the cut upload", gateway=env.gateway)
    assert [(e["status"], e["reason"]) for e in entries] == [(499, "client went away")]
    return CutUpload(content, digest, path, stored, sent, since, entries[0])


@pytest.mark.parametrize("size", SIZES.values(), ids=list(SIZES))
def test_a_node_upload_whose_client_leaves_midway_leaves_nothing(env: Env, size: int) -> None:
    way = NODE_REST
    # under way: the backend writes the object as it arrives
    cut = cut_upload(env, way, "POST", size, partial_written=True)
    assert cut.entry["bytes_in"] <= cut.sent

    def left() -> list[object]:
        found: list[object] = list(cut.stored.parent.glob(f"*{cut.digest}*"))
        found += [(w.name, status) for w in (NODE_REST, MODULE_REST)
                  if (status := request(env, w, "HEAD", cut.path)[0]) != 404]
        return found

    wait_for(lambda: not left(), lambda: f"nothing left of the cut upload: {left()}",
             gateway=env.gateway)
    assert gateway_errors(env, cut.since) == []
    store(env, way, cut.content)  # the retry is stored whole
    assert file_sha256(cut.stored) == cut.digest


@pytest.mark.parametrize("way", [MODULE_REST, NODE_WEBDAV], ids=str)
def test_a_download_whose_client_leaves_midway_leaves_the_gateway_serving(
        env: Env, way: Way) -> None:
    # large enough that the gateway cannot have handed it all to the sockets
    size = max(BIG, MiB + IN_FLIGHT + MiB)
    content = os.urandom(size)
    path = store(env, way, content)
    small = os.urandom(1000)
    small_path = store(env, way, small)
    since = log_offset(env)
    conn = small_window(env)
    try:
        conn.request("GET", path, headers=way.headers())
        response = conn.getresponse()
        assert response.status == 200
        first = response.read(MiB)
    finally:
        conn.close()  # the rest unread
    assert first == content[:MiB]
    entries = wait_for(lambda: access_lines_of(env, since, "GET", path),
                       "the access line of the cut download", gateway=env.gateway)
    assert [(e["status"], e["reason"]) for e in entries] == [(499, "client went away")]
    assert MiB <= entries[0]["bytes_out"] < size, entries
    # a client that leaves is no internal error (aiohttp's own 500 line and ERROR before)
    assert gateway_errors(env, since) == []
    # the same backend serves the next requests whole
    assert request(env, way, "GET", small_path)[::2] == (200, small)
    status, _, got = request(env, way, "GET", path)
    assert (status, len(got), sha256(got)) == (200, size, sha256(content))


@pytest.mark.parametrize("size", SIZES.values(), ids=list(SIZES))
def test_a_webdav_put_whose_client_leaves_midway_leaves_no_file_of_its_length(
        env: Env, size: int) -> None:
    way = NODE_WEBDAV
    # rclone's WebDAV server writes a small file only once its body ended
    cut = cut_upload(env, way, "PUT", size, partial_written=size == BIG)
    # whatever the backend keeps of it, never a file of the announced length
    assert size_of(cut.stored) <= cut.sent
    status, headers, _ = request(env, way, "HEAD", cut.path)
    assert status == 404 or int(headers["content-length"]) <= cut.sent, (status, headers)
    assert gateway_errors(env, cut.since) == []
    store(env, way, cut.content)  # the retry is stored whole
    assert file_sha256(cut.stored) == cut.digest


# The gateway's download limit on a module's GET, and a module's upload limit: see the top.
@pytest.mark.parametrize(("way", "direction"), [(MODULE_REST, "download"),
                                                (NODE_WEBDAV, "upload"),
                                                (NODE_WEBDAV, "download")],
                         ids=["module-rest-download", "node-webdav-upload",
                              "node-webdav-download"])
def test_a_limit_holds_a_large_transfer(limits: Env, way: Way, direction: str) -> None:
    env = limits
    content = os.urandom(LIMITED)
    digest = sha256(content)
    if direction == "download":
        path = store(env, way, content)  # before the limit
    reported = env.set_limits({way.limit(direction): RATE_TEXT})
    began = time.monotonic()
    if direction == "upload":
        store(env, way, content)
        assert file_sha256(way.stored(env, digest)) == digest
    else:
        status, _, got = request(env, way, "GET", path)
        assert (status, sha256(got)) == (200, digest)
    took = time.monotonic() - began
    print(f"{way} {direction} of {LIMITED / MiB:.0f} MiB under {RATE_TEXT}: {took:.2f} s "
          f"(the limit needs {LIMITED / RATE:.1f} s)")
    assert_held(took, LIMITED - BURST, f"{LIMITED / MiB:.0f} MiB", reported)


@pytest.mark.parametrize("way", [MODULE_REST, NODE_WEBDAV], ids=str)
def test_a_limit_set_during_an_unlimited_upload_holds_the_rest_of_it(
        limits: Env, way: Way) -> None:
    """A client sends its first MiB slowly, in pieces; once the backend writes it, a limit
    is set, and the client sends the rest at once: the rest passes at the limit's rate."""
    env = limits
    content = os.urandom(LIMITED)
    digest = sha256(content)
    stored = way.stored(env, digest)
    first = MiB
    with socket.create_connection((env.gateway.host, env.gateway.port),
                                  timeout=TIMEOUT) as sock:
        sock.sendall(way.head(way.upload_method, way.path(env, digest), LIMITED))
        for start in range(0, first, 64 * KiB):
            sock.sendall(content[start:start + 64 * KiB])
            time.sleep(0.01)
        wait_for(lambda: size_of(stored) > 0, "the upload to be under way",
                 gateway=env.gateway)
        reported = env.set_limits({way.limit("upload"): RATE_TEXT})
        changed = time.monotonic()
        sock.sendall(memoryview(content)[first:])
        status, _, answer = read_response(sock)
        took = time.monotonic() - changed
    assert status in way.stored_statuses, (status, answer)
    assert file_sha256(stored) == digest
    rest = LIMITED - first  # none of it had passed the gateway when the limit was set
    print(f"{way}: the last {rest / MiB:.0f} MiB of an upload under {RATE_TEXT} set "
          f"midway: {took:.2f} s (the limit needs {rest / RATE:.1f} s)")
    assert_held(took, rest - BURST, f"the last {rest / MiB:.0f} MiB", reported)


@pytest.mark.parametrize("way", [MODULE_REST, NODE_WEBDAV], ids=str)
def test_a_limit_set_during_an_unlimited_download_holds_the_rest_of_it(
        limits: Env, way: Way) -> None:
    """A client reads the first MiB of a download, a limit is set, and it reads the rest:
    what had not passed the gateway by then passes at the limit's rate."""
    env = limits
    size = MiB + IN_FLIGHT + LIMITED
    content = os.urandom(size)
    path = store(env, way, content)
    conn = small_window(env)
    try:
        conn.request("GET", path, headers=way.headers())
        response = conn.getresponse()
        assert response.status == 200
        first = response.read(MiB)
        reported = env.set_limits({way.limit("download"): RATE_TEXT})
        changed = time.monotonic()
        rest = response.read()
        took = time.monotonic() - changed
    finally:
        conn.close()
    assert sha256(first + rest) == sha256(content), (len(first), len(rest), size)
    print(f"{way}: the last {len(rest) / MiB:.1f} MiB of a download under {RATE_TEXT} set "
          f"midway: {took:.2f} s (at most {IN_FLIGHT / MiB:.0f} MiB of them in flight)")
    assert_held(took, LIMITED, f"the last {len(rest) / MiB:.1f} MiB", reported)


@pytest.mark.parametrize(("way", "size"), [
    pytest.param(way, size, id=f"{way}-{label}")
    for way in (MODULE_REST, NODE_REST, NODE_WEBDAV) for label, size in SIZES.items()])
def test_the_access_log_and_the_metrics_count_every_byte(env: Env, way: Way,
                                                         size: int) -> None:
    content = os.urandom(size)
    path = way.path(env, sha256(content))
    caller, protocol = way.user[0].split("/")[0], "rest" if way.rest else "webdav"
    labels = frozenset({("caller", caller), ("protocol", protocol)})
    before = scrape(env)
    since = log_offset(env)
    status, _, answer = request(env, way, way.upload_method, path, content)
    assert status in way.stored_statuses, (status, answer)
    status, _, got = request(env, way, "GET", path)
    assert (status, sha256(got)) == (200, sha256(content))
    uploads = wait_for(lambda: access_lines_of(env, since, way.upload_method, path),
                       "the access line of the upload", gateway=env.gateway)
    downloads = wait_for(lambda: access_lines_of(env, since, "GET", path),
                         "the access line of the download", gateway=env.gateway)
    assert [(e["bytes_in"], e["bytes_out"]) for e in uploads] == [(size, len(answer))]
    assert [(e["status"], e["bytes_in"], e["bytes_out"]) for e in downloads] == [
        (200, 0, size)]
    after = scrape(env)

    def grown(name: str) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    # nothing else of this caller and protocol ran meanwhile
    assert grown("rclone_gateway_received_bytes_total") == size
    assert grown("rclone_gateway_sent_bytes_total") == size + len(answer)


