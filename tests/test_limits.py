"""Concurrency caps, live limits and bad values (issue 13), end to end: real redis-server,
the gateway and its rclone children. Requests are held in flight by sending a restic
upload's head and only part of its body, so what is counted is known exactly.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
    send_request,
    stop_gateways,
    wait_for,
)
from identities import MODULE_PASSWORD, NODE, NODE_ID

DEST = "13d00000-8f8b-4c43-a1d3-7f3f5f7c1a01"
MODULE = ("module/traefik1", MODULE_PASSWORD)
MODULE_ID, MODULE_UUID, APP = "traefik1", "13d01111-2f87-4e7b-9a34-0a1d9f9e4b01", "traefik"
REPO = f"/{DEST}/{APP}/{MODULE_UUID}"
CONCURRENCY = "rclone-gateway/concurrency"
BWLIMIT = "rclone-gateway/bwlimit"
QUOTA = f"rclone-gateway/quota/{DEST}"
LIMITS_CHANGED = "backup-limits-changed"
BODY_SIZE = 4096
SENT_FIRST = 1024  # of the body, before the request is held
DEADLINE = 30.0  # for anything the gateway should do soon


class Held:
    """A restic object upload held in flight: its head and part of its body sent, the rest
    waiting for `finish`."""

    def __init__(self, port: int, who: tuple[str, str]) -> None:
        self.body = os.urandom(BODY_SIZE)
        object_id = hashlib.sha256(self.body).hexdigest()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        head = (f"POST {REPO}/data/{object_id} HTTP/1.1\r\nHost: gateway\r\n"
                f"Authorization: {basic(*who)}\r\nAccept: {REST_ACCEPT}\r\n"
                f"Content-Length: {BODY_SIZE}\r\n\r\n").encode()
        self.sock.sendall(head + self.body[:SENT_FIRST])
        self.sent = SENT_FIRST
        self.answer: tuple[int, dict[str, str]] | None = None

    def nudge(self) -> None:
        """Sends a little more of the body, not all. The gateway holds a module's last chunk
        back until the next one comes, and with it the head of the request it sends on:
        rclone's server closes a connection that shows no request head for 10 s."""
        self.sock.sendall(self.body[self.sent : self.sent + SENT_FIRST])
        self.sent += SENT_FIRST

    def readable(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def read_answer(self) -> tuple[int, dict[str, str]]:
        """The status and headers (lower-case names) of the answer; status 0: closed."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                self.answer = (0, {})
                return self.answer
            data += chunk
        lines = data.split(b"\r\n\r\n", 1)[0].decode("iso-8859-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.answer = (int(lines[0].split()[1]), headers)
        return self.answer

    def finish(self) -> int:
        """Sends the rest of the body; the status of the answer."""
        self.sock.sendall(self.body[self.sent :])
        return self.read_answer()[0]

    def close(self) -> None:
        self.sock.close()


@dataclass
class Env:
    gateway: GatewayProcess
    cluster: Cluster
    held: list[Held] = field(default_factory=list)

    def request(self, method: str, path: str, who: tuple[str, str] | None = None,
                headers: dict[str, str] | None = None,
                rest: bool = False) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=DEADLINE)
        try:
            return send_request(conn, method, path, who, headers=headers, rest=rest)
        finally:
            conn.close()

    def get_config(self, who: tuple[str, str]) -> tuple[int, dict[str, str]]:
        """A short request of `who`: GET of the repository's config (Restic REST)."""
        status, headers, _ = self.request("GET", f"{REPO}/config", who, rest=True)
        return status, headers

    def hold(self, who: tuple[str, str]) -> Held:
        held = Held(self.gateway.port, who)
        self.held.append(held)
        return held

    def in_flight(self, expected: dict[str, int], *nudged: Held) -> None:
        """Waits until /status counts `expected` in flight; then nudges `nudged` (their
        first part of the body was read by then: the next part comes apart from it)."""
        wait_for(lambda: self.concurrency().get("in_flight") == expected,
                 lambda: f"in flight {expected}: {self.concurrency()}")
        for held in nudged:
            held.nudge()

    def status(self) -> dict:
        code, _, body = self.request("GET", "/status", NODE,
                                     headers={"Accept": "application/json"})
        assert code == 200, body
        return json.loads(body)

    def limits(self) -> dict:
        """/status's "limits" ({} when it has none)."""
        return self.status().get("limits", {})

    def concurrency(self) -> dict:
        return self.limits().get("concurrency", {})

    def publish(self) -> None:
        self.cluster.publish(LIMITS_CHANGED)

    def warnings(self, key: str, field_name: str) -> list[str]:
        """The gateway's log lines about a bad value of `field_name` of `key`."""
        pattern = re.compile(
            rf"rclone_gateway\.limits:? limits: {re.escape(key)} field "
            rf"'{re.escape(field_name)}': ")
        return [line for line in self.gateway.log_text().splitlines() if pattern.search(line)]


@pytest.fixture
def start(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., Env]]:
    """Starts a gateway of its own with these Limits keys in Redis, the module's repository
    initialised."""
    envs: list[Env] = []
    with fresh_cluster(redis_server) as cluster:

        def start_gateway(extra_args: tuple[str, ...] = (), **hashes: dict[str, str]) -> Env:
            cluster.add_user(*NODE)
            cluster.add_user(*MODULE)
            cluster.set_module(MODULE_ID, MODULE_UUID)
            cluster.set_node_vpn(1, "10.5.4.1")
            cluster.add_destination(DEST, provider="cluster", url="webdav:http://10.5.4.1:4694",
                                    name="local disk")
            keys = {"concurrency": CONCURRENCY, "bwlimit": BWLIMIT, "quota": QUOTA}
            for name, mapping in hashes.items():
                cluster.r.hset(keys[name], mapping=mapping)
            gateway = GatewayProcess.start(redis_server.url, NODE_ID, tmp_path / "gateway",
                                           extra_args=extra_args)
            env = Env(gateway, cluster)
            envs.append(env)
            user, password = MODULE
            restic(f"rest:http://{user.replace('/', '%2F')}:{password}@127.0.0.1:"
                   f"{gateway.port}{REPO}/", "init")
            return env

        try:
            yield start_gateway
        finally:
            for env in envs:
                for held in env.held:
                    held.close()
            stop_gateways(*(env.gateway for env in envs))


def until_status(env: Env, who: tuple[str, str], wanted: int) -> float:
    """Sends short requests of `who` until one is answered `wanted`; the seconds it took."""
    started = time.monotonic()
    seen: list[int] = []

    def answered() -> bool:
        status, headers = env.get_config(who)
        seen.append(status)
        if status == 503:
            assert headers.get("retry-after"), headers
        return status == wanted

    wait_for(answered, lambda: f"a {wanted} for {who[0]} (answers: {sorted(set(seen))})",
             interval=0.005)
    return time.monotonic() - started


def test_twenty_parallel_uploads_of_a_module_capped_at_eight(
        start: Callable[..., Env]) -> None:
    env = start(concurrency={"module": "8"})
    uploads = [env.hold(MODULE) for _ in range(20)]
    # the 8 admitted wait for the rest of their body; the 12 others are answered at once
    wait_for(lambda: sum(h.readable() for h in uploads) >= 12,
             lambda: f"12 answers, have {sum(h.readable() for h in uploads)} of 20")
    refused = [h for h in uploads if h.readable()]
    admitted = [h for h in uploads if h not in refused]
    answers = [held.read_answer() for held in refused]
    assert [status for status, _ in answers] == [503] * 12, (
        f"over the cap of 8, 12 answered 503 at once: {answers}")
    assert all(headers.get("retry-after", "").isdigit() for _, headers in answers), answers

    env.in_flight({MODULE[0]: 8}, *admitted)
    concurrency = env.concurrency()
    assert concurrency["refused"] == {"module": 12}, concurrency
    assert concurrency["module_cap"] == 8
    # node credentials have their own count: served while the module is at its cap
    assert env.get_config(NODE)[0] == 200
    assert env.request("PROPFIND", "/", NODE, headers={"Depth": "0"})[0] == 207
    # credentials and the access policy answer first: such refusals are not counted
    assert env.get_config((MODULE[0], "wrong password"))[0] == 401
    other_repo = f"/{DEST}/{APP}/13d09999-2f87-4e7b-9a34-0a1d9f9e4b09/config"
    assert env.request("GET", other_repo, MODULE, rest=True)[0] == 403
    assert env.concurrency()["refused"] == {"module": 12}

    assert [held.finish() for held in admitted] == [200] * 8
    env.in_flight({})
    assert env.get_config(MODULE)[0] == 200
    again = [env.hold(MODULE) for _ in range(8)]
    env.in_flight({MODULE[0]: 8}, *again)
    assert env.get_config(MODULE)[0] == 503  # the ninth: the count is exact again
    assert [held.finish() for held in again] == [200] * 8
    assert env.concurrency()["refused"] == {"module": 13}


def test_a_node_cap_applies_to_node_users_only(start: Callable[..., Env]) -> None:
    env = start(concurrency={"node": "2"})
    node_uploads = [env.hold(NODE), env.hold(NODE)]
    # the two held uploads take the node's two places: a third node request is refused
    until_status(env, NODE, 503)
    assert not any(h.readable() for h in node_uploads)
    # modules are not counted with the node, and keep their own cap of 8
    module_uploads = [env.hold(MODULE) for _ in range(3)]
    env.in_flight({NODE[0]: 2, MODULE[0]: 3}, *node_uploads, *module_uploads)
    assert env.get_config(MODULE)[0] == 200
    concurrency = env.concurrency()
    assert (concurrency["node_cap"], concurrency["module_cap"]) == (2, 8), concurrency
    assert set(concurrency["refused"]) == {"node"}, concurrency
    assert env.get_config(NODE)[0] == 503

    assert [held.finish() for held in node_uploads + module_uploads] == [200] * 5
    env.in_flight({})
    assert env.get_config(NODE)[0] == 200


def test_a_changed_cap_applies_at_once_without_dropping_requests_in_flight(
        start: Callable[..., Env]) -> None:
    env = start()  # no field in Redis: the default cap of 8
    first = env.hold(MODULE)
    assert env.get_config(MODULE)[0] == 200

    env.cluster.r.hset(CONCURRENCY, "module", "1")
    published = time.monotonic()
    env.publish()
    until_status(env, MODULE, 503)  # beside the held upload, the cap of 1 is reached
    lowered = time.monotonic() - published
    env.in_flight({MODULE[0]: 1}, first)
    assert env.concurrency()["module_cap"] == 1
    assert not first.readable()  # still in flight, not dropped

    env.cluster.r.hdel(CONCURRENCY, "module")  # no field: the default cap again
    published = time.monotonic()
    env.publish()
    until_status(env, MODULE, 200)
    removed = time.monotonic() - published
    assert env.concurrency()["module_cap"] == 8
    assert first.finish() == 200
    env.in_flight({})
    # a client that goes away in the middle gives its place back too
    gone = env.hold(MODULE)
    env.in_flight({MODULE[0]: 1})
    gone.close()
    env.in_flight({})
    print(f"cap 1 in force {lowered * 1000:.1f} ms after the publish; "
          f"the default again {removed * 1000:.1f} ms after the next")


def test_bad_values_are_ignored_logged_once_and_the_last_good_ones_stay(
        start: Callable[..., Env]) -> None:
    env = start(concurrency={"module": "1", "node": "5"}, quota={"*": "1G"},
                bwlimit={"upload": "32M", "download": "off"})
    fields = {  # (key, field) -> the bad values written, one after the other
        (QUOTA, "*"): ["-5", "lots"],
        (BWLIMIT, "upload"): ["10X", "25:00,1M"],
        (CONCURRENCY, "module"): ["0", "-3"],
        (CONCURRENCY, "node"): ["abc", "9" * 5000],  # past int()'s digits
        (BWLIMIT, "module/traefik1/download"): ["10X"],  # never had a good value
        (QUOTA, MODULE_ID): ["9" * 400, "\u00b2"],  # past a float; a digit to isdigit()
    }
    redis_client = env.cluster.r
    touched = 0

    def reread() -> None:
        """Another read of the Limits keys: a good field changed, seen in /status."""
        nonlocal touched
        touched += 1
        redis_client.hset(BWLIMIT, "download", f"{touched}M")
        env.publish()
        wait_for(lambda: env.limits().get("bandwidth", {}).get("download", {}).get(
            "schedule") == f"{touched}M", lambda: f"download {touched}M in {env.limits()}")

    def last_good_values_in_force() -> None:
        assert env.gateway.health_status() == 200
        limits = env.limits()
        concurrency, bandwidth = limits["concurrency"], limits["bandwidth"]
        assert (concurrency["module_cap"], concurrency["node_cap"]) == (1, 5), concurrency
        assert bandwidth["upload"]["schedule"] == "32M", bandwidth
        assert "module/traefik1/download" not in bandwidth, bandwidth
        ours = [q for q in limits["quotas"] if q["module"] == MODULE_ID]
        assert [q["quota_bytes"] for q in ours] == [1 << 30], limits["quotas"]
        # the cap of 1 holds: a second request of the module beside a held one is refused
        held = env.hold(MODULE)
        env.in_flight({MODULE[0]: 1}, held)
        status, headers = env.get_config(MODULE)
        assert status == 503 and headers.get("retry-after"), (status, headers)
        assert held.finish() == 200  # under the quota of 1 GiB: stored

    # the cap of 1 read at start: beside a held upload, the module is refused
    held = env.hold(MODULE)
    until_status(env, MODULE, 503)
    held.nudge()
    assert held.finish() == 200
    for round_ in range(2):
        for (key, name), values in fields.items():
            value = values[min(round_, len(values) - 1)]
            redis_client.hset(key, name, value)
        env.publish()
        for (key, name), values in fields.items():
            expected = min(round_ + 1, len(values))
            wait_for(lambda key=key, name=name, expected=expected: len(
                env.warnings(key, name)) >= expected,
                lambda key=key, name=name: f"a warning about {key} {name!r}: "
                f"{env.warnings(key, name)}")
        last_good_values_in_force()
        for _ in range(3):
            reread()
        env.gateway.proc.send_signal(signal.SIGHUP)  # re-read, listeners told even unchanged
        reread()
        for (key, name), values in fields.items():
            lines = env.warnings(key, name)
            written = values[: round_ + 1]
            assert len(lines) == len(written), (key, name, lines)
            for line, value in zip(lines, written, strict=True):
                assert value.split(",")[0][:40] in line and "WARNING" in line, line
        last_good_values_in_force()

    log = env.gateway.log_text()
    assert "Traceback" not in log and "configuration failed" not in log, log[-4000:]
    assert '"status": 500' not in log and '"status":500' not in log

    # a field removed is a limit removed, even after bad values
    redis_client.hdel(CONCURRENCY, "module", "node")
    env.publish()
    wait_for(lambda: env.concurrency().get("module_cap") == 8
             and env.concurrency().get("node_cap") is None,
             lambda: f"the default caps: {env.concurrency()}")
    held = env.hold(MODULE)
    assert env.get_config(MODULE)[0] == 200
    assert held.finish() == 200
    # gone, it has no last good value: a bad one now leaves the default in force
    redis_client.hset(CONCURRENCY, "module", "-3")
    env.publish()
    wait_for(lambda: len(env.warnings(CONCURRENCY, "module")) == 3,
             lambda: f"a third warning: {env.warnings(CONCURRENCY, 'module')}")
    reread()
    assert env.concurrency()["module_cap"] == 8
    assert len(env.warnings(CONCURRENCY, "module")) == 3


# --------------------------------------------------------------------------- wrong Redis types

WRONG_TYPES: dict[str, Callable[[object, str], object]] = {  # Redis type -> how to write one
    "string": lambda r, key: r.set(key, "10M"),  # type: ignore[attr-defined]
    "list": lambda r, key: r.rpush(key, "module", "1"),  # type: ignore[attr-defined]
    "set": lambda r, key: r.sadd(key, "module"),  # type: ignore[attr-defined]
    "zset": lambda r, key: r.zadd(key, {"module": 1}),  # type: ignore[attr-defined]
    "stream": lambda r, key: r.xadd(key, {"module": "1"}),  # type: ignore[attr-defined]
}
GOOD_LIMITS = {CONCURRENCY: {"node": "5"}, BWLIMIT: {"upload": "32M"}, QUOTA: {"*": "1G"}}


def health(env: Env) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", env.gateway.port, timeout=DEADLINE)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_limits_key_of_the_wrong_redis_type_stops_nothing_else(
        start: Callable[..., Env], tmp_path: Path) -> None:
    """Issue "Real links and real storage", 7: each Limits key replaced by a string, a list,
    a set, a sorted set, a stream. New ACL users, new destinations still apply at once;
    /health stays ok; the last good limits stay; one warning per key and change."""
    # Only the reads the test asks for: a periodic one begun before a new user is written
    # and applied after its publish would be taken for the read of that user.
    env = start(concurrency=GOOD_LIMITS[CONCURRENCY], bwlimit=GOOD_LIMITS[BWLIMIT],
                quota=GOOD_LIMITS[QUOTA], extra_args=("--resync-interval", "3600"))
    redis_client = env.cluster.r
    applied: dict[str, float] = {}

    def read_after(published_at: float) -> float:
        """Seconds until the gateway applied a full read of Redis made after
        `published_at` (wall clock): /health's last_sync, no credentials tried."""
        def synced() -> bool:
            doc = health(env)[1]
            return (doc["redis"]["last_sync"] or 0) >= published_at and doc["redis"]["connected"]
        wait_for(synced, lambda: f"a read of Redis after the publish: {health(env)[1]['redis']}",
                 interval=0.01)
        return time.time() - published_at

    def warnings_about(key: str) -> list[str]:
        return [line for line in env.gateway.log_text().splitlines()
                if "WARNING" in line and key in line]

    for round_, (kind, write) in enumerate(WRONG_TYPES.items(), start=1):
        pipe = redis_client.pipeline(transaction=True)
        pipe.delete(*GOOD_LIMITS)
        for key in GOOD_LIMITS:
            write(pipe, key)
        pipe.execute()
        published = time.time()
        env.publish()
        # that read applied: none begun before the new user is written can end after it
        read_after(published)

        # a new user: logs in as soon as its acl-changed is read, never counted as failing
        user = (f"node/{20 + round_}", f"secret-{round_}")
        env.cluster.add_user(*user)
        published = time.time()
        env.cluster.publish("acl-changed")
        applied[kind] = read_after(published)
        assert env.get_config(user)[0] == 200, f"{kind}: the new user is refused"

        # a new destination: served here once its event is read
        dest = f"13d0{round_:04d}-8f8b-4c43-a1d3-7f3f5f7c1a0f"
        directory = tmp_path / f"storage-{round_}"
        directory.mkdir()
        env.cluster.add_destination(dest, provider="rclone", url="rclone:local", name=kind,
                                    basepath=str(directory),
                                    rclone_conf=f"[{dest}]\ntype = local\n")
        env.cluster.publish("backup-destination-changed")
        wait_for(lambda dest=dest: env.request("GET", f"/{dest}/_probe_rest_404")[0] == 404,
                 lambda dest=dest, kind=kind: f"{kind}: destination {dest} served: "
                 f"{env.request('GET', f'/{dest}/_probe_rest_404')[:1]}")
        status, doc = health(env)
        assert (status, doc["status"], doc["redis"]["connected"]) == (200, "ok", True), doc

        # the last good limits stay in force
        limits = env.limits()
        assert limits["concurrency"]["node_cap"] == 5, limits
        assert limits["bandwidth"]["upload"]["schedule"] == "32M", limits
        assert [q["quota_bytes"] for q in limits["quotas"] if q["module"] == MODULE_ID] == [
            1 << 30], limits

        # re-read while unchanged: no more warnings
        for _ in range(3):
            published = time.time()
            env.publish()
            read_after(published)
        for key in GOOD_LIMITS:
            lines = warnings_about(key)
            assert len(lines) == round_, (kind, key, lines)
            assert kind in lines[-1], (kind, lines[-1])

        # good again, for the next round
        pipe = redis_client.pipeline(transaction=True)
        pipe.delete(*GOOD_LIMITS)
        for key, mapping in GOOD_LIMITS.items():
            pipe.hset(key, mapping=mapping)
        pipe.execute()
        published = time.time()
        env.publish()
        read_after(published)

    log = env.gateway.log_text()
    assert "Traceback" not in log and "unavailable" not in log, log[-4000:]
    print("a new ACL user applied after its acl-changed publish: " + ", ".join(
        f"{kind} {seconds * 1000:.0f} ms" for kind, seconds in applied.items()))
    assert max(applied.values()) < 1.0, applied
