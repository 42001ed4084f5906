"""Bandwidth limits end to end (the `rclone-gateway/bwlimit` hash): an upload never goes
faster than its module's limit and streams in flat memory, modules under a shared limit
get even shares, a schedule's switch and a change in Redis apply to an upload already
running, and downloads are held too. Real redis-server and rclone children.

Progress is measured on the storage side: `rclone serve restic` writes an object under
its final name while it arrives, so the size of that file is what has passed the
gateway (less what is still in the socket between them, which only makes it smaller).
"""

from __future__ import annotations

import hashlib
import http.client
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from harness import (
    REST_ACCEPT,
    Blob,
    BlobUpload,
    GatewayProcess,
    ModuleRepositories,
    RedisServer,
    basic,
    send_request,
)
from identities import MODULE_PASSWORD as PASSWORD
from identities import NODE

DEST = "b0a1d000-8f8b-4c43-a1d3-7f3f5f7c1a01"
MODULES = {  # module id -> (app, uuid); one per test, none shared
    "traefik1": ("traefik", "b0a11111-2f87-4e7b-9a34-0a1d9f9e4b01"),
    "dokuwiki1": ("dokuwiki", "b0a12222-2f87-4e7b-9a34-0a1d9f9e4b02"),
    "mail1": ("mail", "b0a13333-2f87-4e7b-9a34-0a1d9f9e4b03"),
    "ldap1": ("ldap", "b0a14444-2f87-4e7b-9a34-0a1d9f9e4b04"),
    "nextcloud1": ("nextcloud", "b0a15555-2f87-4e7b-9a34-0a1d9f9e4b05"),
    "samba1": ("samba", "b0a16666-2f87-4e7b-9a34-0a1d9f9e4b06"),
}
MiB = 1024 * 1024
SAMPLE_EVERY = 0.1  # seconds between two looks at the stored file's size
TIMEOUT = 120.0  # a client's socket timeout: far beyond any transfer here
RATE_SLACK = 1.15  # measured rate over the limit this much at most
BYTES_SLACK = 1 * MiB  # plus a burst and the pieces in flight
SLOW_ENOUGH = 0.85  # a transfer takes at least this share of the time its limit needs


# --------------------------------------------------------------------------- fixture


class Env(ModuleRepositories):
    DEST, NODE, PASSWORD, MODULES = DEST, NODE, PASSWORD, MODULES


@pytest.fixture(scope="module")
def env(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("bandwidth")
    with Env.serving(redis_server, workdir) as shared:
        yield shared


# --------------------------------------------------------------------------- helpers


def who(module: str) -> tuple[str, str]:
    return f"module/{module}", PASSWORD


def request(gateway: GatewayProcess, method: str, path: str,
            module: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=TIMEOUT)
    try:
        status, _, body = send_request(conn, method, path, who(module), rest=True)
        return status, body
    finally:
        conn.close()


def module_upload(env: Env, module: str, blob: Blob) -> BlobUpload:
    """A module's POST of a restic data object, to start in the background."""
    return BlobUpload(env.gateway, f"{env.base(module)}/data/{blob.digest}", who(module), blob,
                      env.stored(module, blob.digest), timeout=TIMEOUT)


@dataclass
class Sample:
    at: float  # monotonic
    wall: float  # time.time()
    sizes: tuple[int, ...]


def sample_while(uploads: list[BlobUpload], until: Callable[[], bool] | None = None
                 ) -> list[Sample]:
    """The stored sizes of `uploads` every SAMPLE_EVERY s, until all have ended (or
    `until` says so)."""
    samples = []
    deadline = time.monotonic() + TIMEOUT * 2
    while time.monotonic() < deadline:
        ended = not any(u.is_alive() for u in uploads)  # the last sample comes after
        samples.append(Sample(time.monotonic(), time.time(),
                              tuple(u.stored_bytes() for u in uploads)))
        if ended or (until is not None and until()):
            break
        time.sleep(SAMPLE_EVERY)
    return samples


def _vm_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def mib(value: float) -> str:
    return f"{value / MiB:.1f} MiB"


# --------------------------------------------------------------------------- tests

# A body buffered whole would add its 256 MiB to the gateway's peak; streaming adds a few
# chunks (measured: a few MiB over the RSS before the upload, which is about 55 MiB).
PEAK_GROWTH_BOUND_MIB = 40


@pytest.mark.serial  # the gateway's peak RSS during the upload
def test_an_upload_never_goes_faster_than_its_module_limit_and_streams(
        limits: Env) -> None:
    env, module = limits, "traefik1"
    env.create_repository(module)
    reported = env.set_limits({f"module/{module}/upload": "32M"})
    blob = Blob(256)
    pid = env.gateway.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM back to the RSS now (proc(5))
    rss_before = _vm_kib(pid, "VmRSS") / 1024
    upload = module_upload(env, module, blob)
    upload.start()
    took = upload.finish()
    peak = _vm_kib(pid, "VmHWM") / 1024
    needed = blob.size / (32 * MiB)
    print(f"256 MiB under 32M: {took:.2f} s ({blob.size / took / MiB:.1f} MiB/s; the limit "
          f"needs {needed:.1f} s); gateway RSS {rss_before:.1f} MiB before, peak "
          f"{peak:.1f} MiB")
    assert took >= SLOW_ENOUGH * needed, (
        f"256 MiB went up in {took:.2f} s at {blob.size / took / MiB:.1f} MiB/s, faster "
        f"than its 32 MiB/s limit allows ({needed:.0f} s); limit reported: {reported}")
    assert peak - rss_before < PEAK_GROWTH_BOUND_MIB, (
        f"gateway peak RSS {peak:.0f} MiB during the upload, {rss_before:.0f} MiB before")


@pytest.mark.serial  # the shares of two uploads, which load beside them skews
def test_modules_under_a_shared_gateway_limit_get_even_shares(limits: Env) -> None:
    env, modules = limits, ("dokuwiki1", "mail1")
    for module in modules:
        env.create_repository(module)
    reported = env.set_limits({"upload": "16M"})
    rate = 16 * MiB
    uploads = [module_upload(env, module, Blob(96)) for module in modules]
    for upload in uploads:
        upload.start()
    samples = sample_while(uploads)
    took = [upload.finish() for upload in uploads]
    t0 = min(u.started for u in uploads)

    # together, never faster than the gateway's limit
    first_full = next(s for s in samples if any(
        size == u.blob.size for size, u in zip(s.sizes, uploads, strict=True)))
    elapsed = first_full.at - t0
    moved = sum(first_full.sizes)
    print(f"two modules under 16M: {mib(moved)} stored after {elapsed:.2f} s "
          f"({moved / elapsed / MiB:.1f} MiB/s together); uploads took "
          f"{', '.join(f'{t:.2f} s' for t in took)}")
    assert moved <= rate * elapsed * RATE_SLACK + BYTES_SLACK, (
        f"{mib(moved)} stored {elapsed:.2f} s after the start: "
        f"{moved / elapsed / MiB:.1f} MiB/s together, over the 16 MiB/s limit; "
        f"limit reported: {reported}")

    # in a window where both move, each gets an even share
    began = max(next(s.at for s in samples if s.sizes[i] > 0) for i in range(2))
    start, end = began + 2.0, first_full.at - 2.0
    assert end - start >= 1.0, (
        f"no common window: both moving from {began - t0:.2f} s, the first done at "
        f"{elapsed:.2f} s")
    first = next(s for s in samples if s.at >= start)
    last = [s for s in samples if s.at <= end][-1]
    moved_each = [b - a for a, b in zip(first.sizes, last.sizes, strict=True)]
    shares = [m / sum(moved_each) for m in moved_each]
    window = last.at - first.at
    print(f"window {first.at - t0:.2f} .. {last.at - t0:.2f} s: "
          + ", ".join(f"{module} {mib(m)} ({share:.1%})"
                      for module, m, share in zip(modules, moved_each, shares, strict=True))
          + f"; {sum(moved_each) / window / MiB:.1f} MiB/s together")
    assert all(0.4 <= share <= 0.6 for share in shares), (
        f"shares {shares} of {[mib(m) for m in moved_each]} in {window:.1f} s")


@pytest.mark.long(45)
def test_a_schedule_switching_the_limit_off_lifts_it_mid_upload(limits: Env) -> None:
    env, module = limits, "ldap1"
    env.create_repository(module)
    field_name = f"module/{module}/upload"
    rate = 4 * MiB
    blob = Blob(96)  # 24 s at 4M
    at_limit = blob.size / rate
    # a minute boundary at least 12 s away (the schedule's granularity is the minute),
    # not at midnight
    while True:
        now = datetime.now()
        boundary = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        if (boundary - now).total_seconds() < 12:
            boundary += timedelta(minutes=1)
        if boundary.date() == now.date():
            break
        time.sleep((boundary - now).total_seconds() + 0.5)
    schedule = f"{now:%H:%M},4M {boundary:%H:%M},off"
    reported = env.set_limits({field_name: schedule})
    # start the upload 9 s before the boundary: 36 MiB at the limit, the rest after it
    time.sleep(max(0.0, boundary.timestamp() - 9 - time.time()))
    upload = module_upload(env, module, blob)
    upload.start()
    samples = sample_while([upload])
    took = upload.finish()

    limited = boundary.timestamp() - upload.started_wall
    assert limited >= 2.0, (
        f"the upload began {limited:.1f} s before the boundary (setting the schedule "
        f"took too long)")
    before = [s for s in samples if s.wall < boundary.timestamp()][-1]
    elapsed = before.at - upload.started
    print(f"schedule {schedule!r}: {mib(before.sizes[0])} stored in the {elapsed:.2f} s "
          f"before the boundary ({before.sizes[0] / elapsed / MiB:.2f} MiB/s), whole "
          f"96 MiB in {took:.2f} s ({at_limit:.0f} s at 4M)")
    assert before.sizes[0] <= rate * elapsed * RATE_SLACK + BYTES_SLACK, (
        f"{mib(before.sizes[0])} stored in the {elapsed:.2f} s before the boundary: "
        f"{before.sizes[0] / elapsed / MiB:.1f} MiB/s, over the 4 MiB/s of the schedule; "
        f"limit reported: {reported}")
    assert took < at_limit * 2 / 3, (
        f"96 MiB took {took:.1f} s: the limit was not lifted at {boundary:%H:%M} "
        f"({at_limit:.0f} s at 4M)")


def test_a_download_never_goes_faster_than_the_gateway_limit(limits: Env) -> None:
    env, module = limits, "nextcloud1"
    env.create_repository(module)
    blob = Blob(64)
    module_upload(env, module, blob).send()  # no limit yet
    reported = env.set_limits({"download": "16M"})
    needed = blob.size / (16 * MiB)
    conn = http.client.HTTPConnection(env.gateway.host, env.gateway.port, timeout=TIMEOUT)
    try:
        began = time.monotonic()
        conn.request("GET", f"{env.base(module)}/data/{blob.digest}",
                     headers={"Authorization": basic(*who(module)), "Accept": REST_ACCEPT})
        response = conn.getresponse()
        hasher, size = hashlib.sha256(), 0
        while chunk := response.read(MiB):
            hasher.update(chunk)
            size += len(chunk)
        took = time.monotonic() - began
    finally:
        conn.close()
    print(f"64 MiB download under 16M: {took:.2f} s ({size / took / MiB:.1f} MiB/s; the "
          f"limit needs {needed:.1f} s)")
    assert response.status == 200 and size == blob.size, (response.status, size)
    assert hasher.hexdigest() == blob.digest
    assert took >= SLOW_ENOUGH * needed, (
        f"64 MiB came down in {took:.2f} s at {size / took / MiB:.1f} MiB/s, faster than "
        f"the 16 MiB/s limit allows ({needed:.0f} s); limit reported: {reported}")


@pytest.mark.serial  # the rest of the upload timed against the new rate, 2x margin
def test_a_limit_changed_in_redis_applies_to_the_upload_running(limits: Env) -> None:
    env, module = limits, "samba1"
    env.create_repository(module)
    field_name = f"module/{module}/upload"
    reported = env.set_limits({field_name: "4M"})
    blob = Blob(96)  # 24 s at 4M, 6 s at 16M
    upload = module_upload(env, module, blob)
    upload.start()
    # about 3 s at 4M, then the limit goes to 16M
    samples = sample_while([upload], until=lambda: time.monotonic() - upload.started >= 3)
    at_change = samples[-1]
    elapsed = at_change.at - upload.started
    print(f"4M: {mib(at_change.sizes[0])} stored in {elapsed:.2f} s "
          f"({at_change.sizes[0] / elapsed / MiB:.2f} MiB/s)")
    assert at_change.sizes[0] <= 4 * MiB * elapsed * RATE_SLACK + BYTES_SLACK, (
        f"{mib(at_change.sizes[0])} stored in {elapsed:.2f} s: over the 4 MiB/s limit; "
        f"limit reported: {reported}")
    changed_at = time.monotonic()
    env.set_limits({field_name: "16M"})
    upload.finish()
    rest = blob.size - at_change.sizes[0]
    after = upload.ended - changed_at
    print(f"16M: the remaining {mib(rest)} in {after:.2f} s ({rest / after / MiB:.1f} MiB/s"
          f"; {rest / (4 * MiB):.1f} s at 4M, {rest / (16 * MiB):.1f} s at 16M)")
    assert after < 0.5 * rest / (4 * MiB), (
        f"the remaining {mib(rest)} took {after:.1f} s: the new limit did not apply to "
        f"the upload running")
    # raised, not lifted: the rest is held to the new limit (what sat in the sockets
    # at the change may pass early)
    assert after >= SLOW_ENOUGH * (rest - 4 * MiB) / (16 * MiB), (
        f"the remaining {mib(rest)} took {after:.2f} s, faster than 16 MiB/s allows")
