"""What the storage says: stored bytes, objects, snapshots and locks of each repository,
and the free space of each destination. No repository password is needed: restic's
layout and the objects' sizes and times say enough.

A background task, never on the request path: one `rclone lsjson` at a time (under
`nice`), a pause between two listings, against the configuration the backends serve.
It runs on an interval (hourly), for one repository after a backup into it ended
(debounced), and on demand (SIGUSR1). After a restart the figures come back from
the storage itself: nothing is kept on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from backends.manager import BackendManager
from backends.process import die_with_parent
from backends.tasks import cancel_and_wait
from gateway.access.repository import CONFIG, OBJECT_TYPES, RepositoryKey

log = logging.getLogger("rclone_gateway.insight")

PAUSE = 0.2  # seconds between two listings: a bounded rate
DEBOUNCE = 5.0  # seconds after a snapshot upload before its repository is listed
RCLONE_TIMEOUT = 600.0
RCLONE_DIRECTORY_NOT_FOUND = 3  # rclone's exit status for a directory that is not there


@dataclass(frozen=True, slots=True)
class StoredFigures:
    stored_bytes: int
    objects: dict[str, int]  # per restic object type
    snapshots: int
    newest_snapshot_at: float | None
    locks: dict[str, float]  # lock id -> modification time (when it was written)
    scanned_at: float


@dataclass(frozen=True, slots=True)
class Space:
    total: int | None
    free: int | None


@dataclass(frozen=True, slots=True)
class Layout:
    """What the backends serve now: the configuration file and each destination's upstream."""

    conf: Path
    tree_root: str  # e.g. "gateway-tree:"
    upstreams: dict[str, str]  # destination uuid -> rclone upstream ("uuid:base", "/srv/repo")


def served_layout(backends: BackendManager) -> Layout | None:
    """What the backends serve now; None while they serve nothing yet."""
    generation = backends.current
    if generation is None:
        return None
    return Layout(generation.directory / "rclone.conf", generation.config.tree_root,
                  dict(generation.config.placement.local))


def _mtime(value: str) -> float:
    # rclone prints RFC 3339 with nanoseconds; Python takes at most microseconds
    head, dot, rest = value.partition(".")
    if dot:
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits):]
        value = f"{head}.{digits[:6]}{zone}"
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def figures(entries: Iterable[dict[str, object]], now: float) -> StoredFigures:
    """The figures of one repository from `rclone lsjson -R --files-only` of its root."""
    total = 0
    objects = dict.fromkeys(sorted(OBJECT_TYPES), 0)
    newest: float | None = None
    locks: dict[str, float] = {}
    for entry in entries:
        path = str(entry.get("Path", ""))
        size = int(entry.get("Size", 0) or 0)  # type: ignore[call-overload]
        total += max(size, 0)
        kind, _, rest = path.partition("/")
        if kind not in objects or not rest:
            continue
        objects[kind] += 1
        name = rest.rpartition("/")[2]
        if kind in ("snapshots", "locks"):
            at = _mtime(str(entry.get("ModTime", "")))
            if kind == "snapshots":
                newest = at if newest is None else max(newest, at)
            else:
                locks[name] = at
    return StoredFigures(total, objects, objects["snapshots"], newest, locks, now)


def repositories(entries: Iterable[dict[str, object]], destination: str) -> list[RepositoryKey]:
    """Repositories in a destination from `rclone lsjson -R --max-depth 3` of its root:
    `<app>/<uuid>` directories holding a `config`."""
    found = []
    for entry in entries:
        parts = str(entry.get("Path", "")).split("/")
        if len(parts) == 3 and parts[2] == CONFIG and not entry.get("IsDir"):
            found.append(RepositoryKey(destination, parts[0], parts[1]))
    return sorted(found)


def space(about: dict[str, object]) -> Space:
    def number(key: str) -> int | None:
        value = about.get(key)
        return int(value) if isinstance(value, int | float) else None

    return Space(number("total"), number("free"))


def _low_priority() -> None:
    die_with_parent()
    with contextlib.suppress(OSError):
        os.nice(19)


@dataclass
class Scanner:
    rclone: str
    layout: Callable[[], Layout | None]
    env: dict[str, str]
    interval: float  # seconds between two full scans
    pause: float = PAUSE
    debounce: float = DEBOUNCE
    stored: dict[RepositoryKey, StoredFigures] = field(default_factory=dict)
    spaces: dict[str, Space] = field(default_factory=dict)
    last_full_scan: float | None = None
    on_scanned: Callable[[RepositoryKey, StoredFigures], None] | None = None
    on_listing: Callable[[RepositoryKey], None] | None = None  # a listing of it begins
    # after a full scan: the repositories found, in the destinations listed
    on_full_scan: Callable[[set[RepositoryKey], set[str]], None] | None = None
    _task: asyncio.Task[None] | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _full_requested: bool = True  # a first full scan at start
    _due: dict[RepositoryKey, float] = field(default_factory=dict)  # key -> monotonic due time

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="insight-scan")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def scan_all_soon(self) -> None:
        self._full_requested = True
        self._wake.set()

    def scan_soon(self, key: RepositoryKey) -> None:
        """After a backup into `key` ended: list it once things are quiet (debounced)."""
        self._due[key] = time.monotonic() + self.debounce
        self._wake.set()

    def forget(self, keys: Iterable[RepositoryKey]) -> None:
        """The repositories were removed whole: their figures are gone with them (a listing
        of a repository that is no longer there finds nothing to say)."""
        for key in keys:
            self.stored.pop(key, None)

    async def _loop(self) -> None:
        next_full = time.monotonic()
        while True:
            # cleared before the work, not after: a request made during a scan wakes the
            # next turn instead of waiting out the interval
            self._wake.clear()
            now = time.monotonic()
            if self._full_requested or now >= next_full:
                self._full_requested = False
                try:
                    done = await self.scan_all()
                except Exception:
                    log.exception("storage scan failed")
                    done = True
                # nothing served yet (the backends are starting): again in a moment
                next_full = time.monotonic() + (self.interval if done else 1.0)
            for key in [k for k, due in self._due.items() if due <= time.monotonic()]:
                del self._due[key]
                try:
                    await self.scan_repository(key)
                except Exception:
                    log.exception("storage scan of %s failed", key.path)
            wait = next_full - time.monotonic()
            if self._due:
                wait = min(wait, min(self._due.values()) - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.05))

    async def scan_all(self) -> bool:
        """Lists every destination served here; False when nothing is served yet.

        A destination whose listing fails (its remote does not answer, or a reload took
        away the configuration the listing ran with) keeps what was known of it: what
        was not found there is gone only where the listing succeeded.
        """
        layout = self.layout()
        if layout is None:
            return False
        started = time.time()
        seen: set[RepositoryKey] = set()
        listed: set[str] = set()
        for destination in sorted(layout.upstreams):
            layout = self.layout() or layout  # the newest: a reload removes the old one
            if destination not in layout.upstreams:
                continue
            about = await self._rclone_json("about", "--json", layout.upstreams[destination],
                                            layout=layout)
            if isinstance(about, dict):
                self.spaces[destination] = space(about)
            # A base directory no backup created yet (SFTP, SMB, a local disk) holds nothing.
            listing = await self._rclone_json(
                "lsjson", "-R", "--max-depth", "3", f"{layout.tree_root}{destination}",
                layout=layout, missing=[])
            if not isinstance(listing, list):
                log.warning("storage scan: listing destination %s failed; keeping what was "
                            "known of it", destination)
                continue
            listed.add(destination)
            for key in repositories(listing, destination):
                seen.add(key)
                await self.scan_repository(key)
        served = self.layout() or layout
        for key in [k for k in self.stored
                    if k.destination not in served.upstreams  # no longer served here
                    or (k.destination in listed and k not in seen)]:  # gone from the storage
            del self.stored[key]
        for destination in [d for d in self.spaces if d not in served.upstreams]:
            del self.spaces[destination]
        self.last_full_scan = started  # what it found is the storage as of then
        if self.on_full_scan is not None:
            self.on_full_scan(seen, listed)
        log.info("storage scan: %d repositories in %d of %d destinations", len(seen),
                 len(listed), len(served.upstreams))
        return True

    async def scan_repository(self, key: RepositoryKey) -> None:
        layout = self.layout()
        if layout is None or key.destination not in layout.upstreams:
            return
        if self.on_listing is not None:
            self.on_listing(key)
        listing = await self._rclone_json(
            "lsjson", "-R", "--files-only", f"{layout.tree_root}{key.path.lstrip('/')}",
            layout=layout)
        if not isinstance(listing, list):
            return
        result = figures(listing, time.time())
        self.stored[key] = result
        if self.on_scanned is not None:
            self.on_scanned(key, result)

    async def _rclone_json(self, *args: str, layout: Layout, missing: object = None) -> object:
        """What rclone printed, parsed; `missing` when it found no such directory."""
        await asyncio.sleep(self.pause)
        argv = [self.rclone, *args, "--config", str(layout.conf), "--ask-password=false",
                "--log-level", "ERROR"]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=self.env, preexec_fn=_low_priority)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), RCLONE_TIMEOUT)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode == RCLONE_DIRECTORY_NOT_FOUND:
            return missing
        if proc.returncode != 0:
            return None  # unsupported (`about` on many remotes) or unreachable: unknown
        try:
            return json.loads(out)
        except ValueError:
            return None
