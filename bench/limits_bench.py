"""The limits' measures of `make bench` (issue 13): shaped rates, how fast a lifted limit
takes effect, and what the limit checks cost with no limit set.

Uploads are a module's POSTs of restic data objects through the gateway (the body
checked against its SHA-256 name on the way), sent from a generator of one random MiB
repeated, never held whole. Progress is read on the storage side: `rclone serve
restic` writes an object under its final name as it arrives, so the size of that
file is what has passed the gateway.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from harness import REST_ACCEPT, Blob, BlobUpload, Cluster, GatewayProcess, basic, free_port

from gateway.cluster.keys import BWLIMIT_KEY
from gateway.limits.values import parse_rate

MiB = 1024 * 1024
TIMEOUT = 300.0
SAMPLE_EVERY = 0.002  # seconds between two looks at the stored file's size
WINDOW = 0.05  # progress is judged over this much time
LIFTED = 4.0  # a window moving this many times the old limit: the limit is gone
UPLOAD_BEFORE = 3.0  # seconds before a schedule's boundary the upload begins


@dataclass(frozen=True)
class Repo:
    """The module's own repository, as the bench's module reaches it."""

    destination: str
    app: str
    uuid: str
    user: tuple[str, str]
    storage: Path  # the gateway's local repository directory

    @property
    def module_id(self) -> str:
        return self.user[0].removeprefix("module/")

    @property
    def base(self) -> str:
        return f"/{self.destination}/{self.app}/{self.uuid}"

    @property
    def directory(self) -> Path:
        return self.storage / self.app / self.uuid

    def stored(self, object_id: str) -> Path:
        return self.directory / "data" / object_id[:2] / object_id


_blobs: dict[int, Blob] = {}


def blob(mib: int) -> Blob:
    if mib not in _blobs:
        _blobs[mib] = Blob(mib)
    return _blobs[mib]


def _request(gateway: GatewayProcess, method: str, path: str, who: tuple[str, str],
             accept: str = REST_ACCEPT) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, headers={"Authorization": basic(*who), "Accept": accept})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def new_repository(gateway: GatewayProcess, repo: Repo) -> None:
    shutil.rmtree(repo.directory, ignore_errors=True)
    status, body = _request(gateway, "POST", f"{repo.base}/?create=true", repo.user)
    if status != 200:
        raise RuntimeError(f"creating the repository answered {status}: {body[:200]!r}")


def bandwidth_in_force(gateway: GatewayProcess, node: tuple[str, str]) -> dict[str, dict]:
    status, body = _request(gateway, "GET", "/status", node, accept="application/json")
    if status != 200:
        raise RuntimeError(f"/status answered {status}")
    return json.loads(body).get("limits", {}).get("bandwidth", {})


def set_bwlimit(cluster: Cluster, gateway: GatewayProcess, node: tuple[str, str],
                fields: dict[str, str]) -> None:
    """The bwlimit hash set to `fields` exactly, announced, and in force (per /status)."""
    pipe = cluster.r.pipeline(transaction=True)
    pipe.delete(BWLIMIT_KEY)
    if fields:
        pipe.hset(BWLIMIT_KEY, mapping=fields)
    pipe.execute()
    cluster.publish("backup-limits-changed")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reported = bandwidth_in_force(gateway, node)
        if {name: entry["schedule"] for name, entry in reported.items()} == fields:
            return
        time.sleep(0.02)
    raise RuntimeError(f"the gateway did not report the bandwidth limits {fields} in 30 s")


def upload_of(gateway: GatewayProcess, repo: Repo, data: Blob) -> BlobUpload:
    """The module's POST of a data object, to start in the background."""
    return BlobUpload(gateway, f"{repo.base}/data/{data.digest}", repo.user, data,
                      repo.stored(data.digest), timeout=TIMEOUT)


def _sample(upload: BlobUpload) -> list[tuple[float, float, int]]:
    """(monotonic, time.time(), stored bytes) every SAMPLE_EVERY s until the upload ends."""
    samples = []
    while True:
        samples.append((time.monotonic(), time.time(), upload.stored_bytes()))
        if not upload.is_alive():
            return samples
        time.sleep(SAMPLE_EVERY)


def _lifted_at(samples: list[tuple[float, int]], since: float, old_rate: int) -> float | None:
    """The first time after `since` at which the last WINDOW s stored LIFTED times what the
    old limit lets through in that time."""
    threshold = LIFTED * old_rate * WINDOW
    start = 0
    for at, size in samples:
        while start + 1 < len(samples) and samples[start + 1][0] <= at - WINDOW:
            start += 1
        if at >= since and at - samples[start][0] >= WINDOW * 0.9 and (
                size - samples[start][1] >= threshold):
            return at
    return None


def _rate_between(samples: list[tuple[float, int]], begin: float, end: float) -> float:
    inside = [(at, size) for at, size in samples if begin <= at <= end]
    if len(inside) < 2:
        return 0.0
    (a, x), (b, y) = inside[0], inside[-1]
    return (y - x) / (b - a) if b > a else 0.0


# --------------------------------------------------------------------------- measures


def shaped_upload_ratio(cluster: Cluster, gateway: GatewayProcess, node: tuple[str, str],
                        repo: Repo, mib: int, limit: str) -> float:
    """Rate of a module's upload under its own `module/<id>/upload` limit, over the limit."""
    new_repository(gateway, repo)
    set_bwlimit(cluster, gateway, node, {f"module/{repo.module_id}/upload": limit})
    upload = upload_of(gateway, repo, blob(mib))
    try:
        upload.start()
        seconds = upload.finish()
    finally:
        set_bwlimit(cluster, gateway, node, {})
    return upload.blob.size / seconds / rate_of(limit)


def shaped_download_ratio(cluster: Cluster, gateway: GatewayProcess, node: tuple[str, str],
                          repo: Repo, mib: int, limit: str) -> float:
    """Rate of a GET of the module's object under the gateway-wide `download` limit, over
    the limit. Uses the object the upload left (uploads it again if it is not there)."""
    data = blob(mib)
    if not repo.stored(data.digest).exists() or (
            repo.stored(data.digest).stat().st_size != data.size):
        new_repository(gateway, repo)
        upload_of(gateway, repo, data).run()
    set_bwlimit(cluster, gateway, node, {"download": limit})
    conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=TIMEOUT)
    try:
        started = time.monotonic()
        conn.request("GET", f"{repo.base}/data/{data.digest}",
                     headers={"Authorization": basic(*repo.user), "Accept": REST_ACCEPT})
        response = conn.getresponse()
        size = 0
        while chunk := response.read(MiB):
            size += len(chunk)
        seconds = time.monotonic() - started
    finally:
        conn.close()
        set_bwlimit(cluster, gateway, node, {})
        repo.stored(data.digest).unlink(missing_ok=True)
    if response.status != 200 or size != data.size:
        raise RuntimeError(f"GET answered {response.status} with {size} of {data.size} bytes")
    return size / seconds / rate_of(limit)


def _lifted_after(samples: list[tuple[float, int]], upload: BlobUpload, since: float,
                  limit: str, what: str) -> tuple[float, float]:
    """The seconds from `since` until the upload moved at LIFTED times `limit`, and its rate
    under the limit before `since` (bytes/s)."""
    under = _rate_between(samples, upload.started + 0.5, since)
    lifted = _lifted_at(samples, since, rate_of(limit))
    if lifted is None:
        raise RuntimeError(f"the upload never went past {LIFTED:g}x the limit after {what} "
                           f"(under the limit: {under / MiB:.1f} MiB/s)")
    return lifted - since, under


def switch_off_seconds(cluster: Cluster, gateway: GatewayProcess, node: tuple[str, str],
                       repo: Repo, mib: int, limit: str, limited_for: float = 1.5
                       ) -> tuple[float, float]:
    """An upload runs under the module's `limit`; the field is removed (HDEL) and the change
    published. Returns the seconds from the publish until the stored file grows at LIFTED
    times the old limit over WINDOW, and the rate seen under the limit (bytes/s)."""
    field_name = f"module/{repo.module_id}/upload"
    new_repository(gateway, repo)
    set_bwlimit(cluster, gateway, node, {field_name: limit})
    upload = upload_of(gateway, repo, blob(mib))
    samples: list[tuple[float, int]] = []
    published = 0.0
    try:
        upload.start()
        while upload.is_alive() and time.monotonic() - upload.started < limited_for:
            samples.append((time.monotonic(), upload.stored_bytes()))
            time.sleep(SAMPLE_EVERY)
        cluster.r.hdel(BWLIMIT_KEY, field_name)
        published = time.monotonic()
        cluster.publish("backup-limits-changed")
        samples += [(at, size) for at, _, size in _sample(upload)]
        upload.finish()
    finally:
        set_bwlimit(cluster, gateway, node, {})
        repo.stored(upload.blob.digest).unlink(missing_ok=True)
    return _lifted_after(samples, upload, published, limit, "the limit was removed")


def schedule_switch_seconds(cluster: Cluster, gateway: GatewayProcess, node: tuple[str, str],
                            repo: Repo, mib: int, limit: str,
                            before: float = UPLOAD_BEFORE) -> tuple[float, float, float]:
    """A schedule `"<this minute>,<limit> <next minute>,off"` on the module's upload field;
    an upload starts `before` s ahead of the minute boundary. Returns the seconds from the
    boundary until the stored file grows at LIFTED times the limit over WINDOW, the rate
    under the limit (bytes/s), and the seconds waited for a boundary."""
    field_name = f"module/{repo.module_id}/upload"
    new_repository(gateway, repo)
    waited_from = time.monotonic()
    boundary = next_boundary(before)
    first = boundary - timedelta(minutes=1)
    set_bwlimit(cluster, gateway, node,
                {field_name: f"{first:%H:%M},{limit} {boundary:%H:%M},off"})
    if datetime.now() < first:  # set before `first` began: the last slot of the day, off
        time.sleep((first - datetime.now()).total_seconds() + 0.05)
    rate_now = bandwidth_in_force(gateway, node)[field_name]["rate_now"]
    if rate_now != rate_of(limit):
        raise RuntimeError(f"the schedule is at {rate_now} before {boundary:%H:%M}, not "
                           f"{limit}")
    time.sleep(max(0.0, boundary.timestamp() - before - time.time()))
    waited = time.monotonic() - waited_from
    upload = upload_of(gateway, repo, blob(mib))
    try:
        upload.start()
        samples = _sample(upload)
        upload.finish()
    finally:
        set_bwlimit(cluster, gateway, node, {})
        repo.stored(upload.blob.digest).unlink(missing_ok=True)
    # the boundary on the monotonic clock, from the wall clock of the samples
    offsets = sorted(at - wall for at, wall, _ in samples)
    at_boundary = boundary.timestamp() + offsets[len(offsets) // 2]
    series = [(at, size) for at, _, size in samples]
    lifted, under = _lifted_after(series, upload, at_boundary, limit, f"{boundary:%H:%M}")
    return lifted, under, waited


def next_boundary(before: float = UPLOAD_BEFORE) -> datetime:
    """The next minute boundary far enough ahead to set a schedule and begin an upload
    `before` s ahead of it."""
    now = datetime.now()
    boundary = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    if (boundary - now).total_seconds() < before + 1.5:
        boundary += timedelta(minutes=1)
    return boundary


def seconds_to_upload(before: float = UPLOAD_BEFORE) -> float:
    """How long schedule_switch_seconds() would wait now before its upload."""
    return next_boundary(before).timestamp() - before - time.time()


def rate_of(limit: str) -> int:
    """A limit's rate in bytes per second."""
    rate = parse_rate(limit)
    if rate is None:
        raise ValueError(f"not a limit: {limit}")
    return rate


# --------------------------------------------------------------------------- the other gateway


def start_twin(redis_url: str, node_id: str, workdir: Path, local_repo: Path, *,
               with_limits: bool) -> GatewayProcess:
    """A gateway started by `bench/gateway_without_limits.py` on the same storage: without
    the limit stages, or (`with_limits`) as it is."""
    port = free_port()
    argv = [sys.executable, str(Path(__file__).with_name("gateway_without_limits.py")),
            *(["--with-limits"] if with_limits else []),
            "serve", "--listen", f"127.0.0.1:{port}", "--redis-url", redis_url,
            "--node-id", node_id, "--local-repo", str(local_repo),
            "--runtime-dir", str(workdir / "run")]
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    gateway = GatewayProcess(argv, env, workdir, "127.0.0.1", port)
    gateway.local_repo = local_repo
    gateway._launch()  # the harness's own start and wait, with this argv
    return gateway
