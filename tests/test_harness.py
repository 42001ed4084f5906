from __future__ import annotations

import asyncio
import hashlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import _long_tests_first
from harness import (
    PORT_RANGE,
    Cluster,
    RedisServer,
    ResponseReader,
    basic,
    free_port,
    raw_request,
    restic,
    wait_for,
    wait_until,
)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        body = f"{self.client_address[0]} {self.headers.get('Authorization')}".encode()
        self.send_response(201)
        self.send_header("X-Test", "yes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_cluster_writes_acl_lines_as_acl_list(cluster: Cluster) -> None:
    digest = hashlib.sha256(b"s3cret").hexdigest()
    line = cluster.add_user("module/traefik1", "s3cret")
    assert line.startswith("user module/traefik1 on ")
    assert f"#{digest}" in line.split()
    assert cluster.r.smembers("cluster/acls") == {line}

    replaced = cluster.add_user("module/traefik1", "s3cret", enabled=False, nopass=True,
                                extra_hashes=["ab" * 32])
    assert {"off", "nopass", f"#{digest}", "#" + "ab" * 32} <= set(replaced.split())
    assert cluster.r.smembers("cluster/acls") == {replaced}

    cluster.add_user("node/1", "other")
    cluster.remove_user("module/traefik1")
    assert [m.split()[1] for m in cluster.r.smembers("cluster/acls")] == ["node/1"]

    cluster.add_destination("d1", provider="rclone", url="s3:x/y", rclone_conf="[d1]\n")
    assert cluster.r.hgetall("cluster/backup_repository/d1")["provider"] == "rclone"
    cluster.remove_destination("d1")
    assert not cluster.r.exists("cluster/backup_repository/d1")
    assert cluster.r.hlen("private/nodes/backup_destination/rclone_conf") == 0


def test_redis_server_stops() -> None:
    server = RedisServer()
    client = server.client()
    assert client.ping()
    client.close()
    server.stop()
    assert server.proc is not None and server.proc.returncode is not None
    assert not server.dir.exists()


def test_raw_request(http_server: ThreadingHTTPServer) -> None:
    port = http_server.server_address[1]
    request = (f"GET /x HTTP/1.1\r\nHost: a\r\nAuthorization: {basic('node/1', 'pw')}\r\n"
               "Connection: close\r\n\r\n").encode()
    status, headers, body = raw_request("127.0.0.1", port, request, source="127.0.0.2")
    assert status == 201
    assert headers["x-test"] == "yes"
    assert body == b"127.0.0.2 Basic bm9kZS8xOnB3"

    chunked = b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n"
    assert raw_request("127.0.0.1", port, chunked)[::2] == (200, b"hello world")

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        closer = threading.Thread(target=lambda: listener.accept()[0].close(), daemon=True)
        closer.start()
        assert raw_request("127.0.0.1", listener.getsockname()[1], b"GET / HTTP/1.1\r\n\r\n") \
            == (0, {}, b"")
        closer.join(5)
    assert free_port() > 0


def test_response_reader_reads_pipelined_answers_in_turn(
        http_server: ThreadingHTTPServer) -> None:
    port = http_server.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"".join(b"GET /%b HTTP/1.1\r\nHost: a\r\n\r\n" % path
                              for path in (b"chunked", b"x", b"chunked")))
        answers = ResponseReader(sock)
        assert [answers.read()[::2] for _ in range(3)] == [
            (200, b"hello world"), (201, b"127.0.0.1 None"), (200, b"hello world")]


def test_restic_runs_the_real_client(tmp_path) -> None:
    repo = str(tmp_path / "repo")
    restic(repo, "init", password="pw")
    assert restic(repo, "snapshots", "--json").stdout.strip() == "[]"
    failed = restic(repo, "snapshots", password="wrong", check=False)
    assert failed.returncode != 0


def test_wait_for_returns_the_first_true_value_or_fails_saying_what_it_waited_for() -> None:
    values = iter([0, "", None, "found", "later"])
    assert wait_for(lambda: next(values), "a value", 5, interval=0.01) == "found"
    looks: list[int] = []
    with pytest.raises(AssertionError) as failed:  # `what` is asked when the time is up
        wait_for(lambda: looks.append(1), lambda: f"the state after {len(looks)} looks", 0.2,
                 interval=0.01)
    assert len(looks) >= 2
    assert (f"timed out after 0.2 s waiting for the state after {len(looks)} looks"
            in str(failed.value))
    with pytest.raises(AssertionError, match=r"waiting for nothing"):
        asyncio.run(wait_until(lambda: False, "nothing", 0.1))


def test_free_port_never_hands_out_a_port_twice_to_processes_asking_at_once() -> None:
    """As the xdist workers of a run, or two runs, do. The kernel's choice of a free port
    repeated itself about 130 times in 2000 choices."""
    tests = Path(__file__).resolve().parent
    code = (f"import sys; sys.path.insert(0, {str(tests)!r}); import harness; "
            "print(*(harness.free_port() for _ in range(300)))")
    askers = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
              for _ in range(3)]
    ports = [int(port) for asker in askers for port in asker.communicate(timeout=60)[0].split()]
    assert all(asker.returncode == 0 for asker in askers)
    assert len(ports) == len(set(ports)) == 900
    assert all(port in PORT_RANGE for port in ports)


def test_long_tests_go_to_the_heads_of_the_runs_worksteal_hands_out() -> None:
    class Item:
        def __init__(self, name: str, seconds: float = 0.0) -> None:
            self.name, self.seconds = name, seconds

        def get_closest_marker(self, name: str) -> pytest.Mark | None:
            return pytest.mark.long(self.seconds).mark if self.seconds else None

    items = [Item(f"t{i}") for i in range(20)]
    for position, seconds in ((3, 30.0), (17, 150.0), (9, 100.0), (12, 60.0), (0, 50.0)):
        items[position].seconds = seconds
    ordered = list(items)
    _long_tests_first(ordered, 3)  # type: ignore[arg-type]
    assert sorted(i.name for i in ordered) == sorted(i.name for i in items)
    runs = [ordered[0:6], ordered[6:13], ordered[13:20]]  # 20 // 3, 14 // 2, 7
    assert [[i.seconds for i in run if i.seconds] for run in runs] == [
        [150.0], [100.0, 30.0], [60.0, 50.0]]
    assert all(run[0].seconds for run in runs)
    assert [i.name for i in ordered if not i.seconds] == [i.name for i in items if not i.seconds]
