"""Bytes each module repository holds, kept current, and the quota decision.

The storage scan (`gateway.insight.scan`) lists a repository and gives its stored
bytes; from then on the uploads and deletes this gateway passes are added and taken
away, until the next listing. What passes while a listing runs may or may not be in
it: an upload is then counted on top of the listing, a delete is not taken away again.
The count errs over, never under (a quota refuses a little early rather than let a
repository grow past it), and the repository is listed again once it is quiet.
Uploads admitted and not yet answered are reserved, so parallel uploads cannot pass
the same check together.

Pure bookkeeping, no I/O; the request path and the scanner feed it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.access.refusals import Refusal, Refused
from gateway.access.repository import RepositoryKey
from gateway.limits.values import format_size

log = logging.getLogger("rclone_gateway.limits")

LEVELS = (80, 100)  # percent of a quota whose crossing is told (log, metrics, status page)
MAX_LOCKS = 256  # lock sizes kept per repository, the oldest dropped: restic holds one or two


@dataclass
class RepositoryUsage:
    listed: int | None = None  # stored bytes from the last listing of the storage
    since_listing: int = 0  # bytes added (removed: negative) through the gateway since it began
    at_listing_start: int | None = None  # since_listing when the listing in progress began
    removed_while_listing: int = 0  # bytes deleted since then: the listing may miss them
    reserved: int = 0  # bytes of uploads let in and not answered yet
    level: int = 0  # the highest of LEVELS crossed (0: none)
    crossings: int = 0
    # sizes of the locks uploaded through the gateway and not removed yet: a lock's DELETE
    # is counted without asking the storage (restic takes and drops one per command)
    lock_sizes: dict[str, int] = field(default_factory=dict)
    # the repository was removed or replaced whole while a listing ran: what it finds is
    # the old content, not to be taken
    replaced_while_listing: bool = False


Segments = tuple[str, ...]  # a canonical path's segments: `(destination, app, uuid, ...)`


def segments_of(key: RepositoryKey) -> Segments:
    return key.destination, key.app, key.uuid


def at_or_below(keys: Iterable[RepositoryKey], directory: Segments) -> list[RepositoryKey]:
    """The repositories in `keys` that a removal of `directory` takes with it: itself when it
    is a repository, those under it when it is a destination or an app directory."""
    if not 1 <= len(directory) <= 3:
        return []
    return sorted(key for key in keys if segments_of(key)[: len(directory)] == directory)


class UsageBook:
    def __init__(self) -> None:
        self.repositories: dict[RepositoryKey, RepositoryUsage] = {}
        # destinations a full scan listed: a repository it did not find there was empty
        self.listed_destinations: set[str] = set()
        self.crossings = {level: 0 for level in LEVELS}

    def _entry(self, key: RepositoryKey) -> RepositoryUsage:
        entry = self.repositories.get(key)
        if entry is None:
            entry = self.repositories[key] = RepositoryUsage()
        return entry

    # --- the scanner ----------------------------------------------------------------------

    def listing_started(self, key: RepositoryKey) -> None:
        entry = self._entry(key)
        entry.at_listing_start = entry.since_listing
        entry.removed_while_listing = 0

    def listed(self, key: RepositoryKey, stored_bytes: int) -> bool:
        """A listing ended; True when the gateway passed writes into the repository while
        it ran (it is worth listing again once things are quiet)."""
        entry = self._entry(key)
        if entry.replaced_while_listing:
            entry.replaced_while_listing = False
            entry.at_listing_start, entry.removed_while_listing = None, 0
            return True
        entry.listed = stored_bytes
        started = entry.at_listing_start
        passed = entry.since_listing - (started if started is not None else 0)
        busy = started is not None and (passed != 0 or entry.removed_while_listing != 0)
        # uploads meanwhile stay counted on top; deletes meanwhile are not taken away twice
        entry.since_listing = passed + entry.removed_while_listing
        entry.at_listing_start, entry.removed_while_listing = None, 0
        return busy

    def full_scan_ended(self, found: set[RepositoryKey], listed: set[str]) -> None:
        """A full scan ended: the repositories it did not find in the destinations it
        listed hold nothing yet (or no more). A destination whose listing failed says
        nothing of its repositories."""
        for key, entry in self.repositories.items():
            if (key.destination in listed and key not in found
                    and entry.at_listing_start is None):
                entry.listed, entry.since_listing = 0, max(entry.since_listing, 0)
        self.listed_destinations |= listed

    # --- whole repositories ---------------------------------------------------------------

    def gone(self, directory: Segments) -> list[RepositoryKey]:
        """A node removed `directory` (a WebDAV DELETE, or the source of a MOVE): the
        repositories at or below it hold nothing now. Returns them."""
        keys = at_or_below(self.repositories, directory)
        for key in keys:
            self._emptied(key)
        return keys

    def copied(self, source: Segments, target: Segments) -> list[RepositoryKey]:
        """A node copied (or moved) `source` to `target`, which it replaced: each repository
        at or below `source` is counted again where it landed, what `target` held before is
        gone. Returns the repositories written to (their storage says the rest)."""
        carried = {key: self.used(key) for key in at_or_below(self.repositories, source)}
        written = self.gone(target)
        for key, used in carried.items():
            landed = target + segments_of(key)[len(source):]
            if len(landed) < 3:  # a repository that became an app directory: none to count
                continue
            into = RepositoryKey(*landed[:3])
            if len(landed) == 3:  # a repository of its own now, holding what it carried
                self._emptied(into)
            written.append(into)
            if used is not None:  # unknown: its listing says it
                self.added(into, used)
        return sorted(set(written))

    def _emptied(self, key: RepositoryKey) -> None:
        entry = self._entry(key)
        entry.listed, entry.since_listing, entry.lock_sizes = 0, 0, {}
        entry.replaced_while_listing = entry.at_listing_start is not None

    # --- the request path -----------------------------------------------------------------

    def used(self, key: RepositoryKey) -> int | None:
        """Bytes the repository holds; None while the storage was not listed yet."""
        entry = self.repositories.get(key)
        listed = entry.listed if entry is not None else None
        if listed is None:
            if key.destination not in self.listed_destinations:
                return None
            listed = 0
        return max(listed + (entry.since_listing if entry is not None else 0), 0)

    def check(self, key: RepositoryKey, size: int, quota: int | None) -> Refused | None:
        """Whether an upload of `size` bytes fits; when it does, the bytes are reserved."""
        if quota is None:
            return None
        used = self.used(key)
        entry = self._entry(key)
        if used is not None and used + entry.reserved + size > quota:
            return Refusal.OVER_QUOTA.given(format_size(used), format_size(quota))
        entry.reserved += size
        return None

    def release(self, key: RepositoryKey, size: int) -> None:
        entry = self._entry(key)
        entry.reserved = max(entry.reserved - size, 0)

    def added(self, key: RepositoryKey, size: int) -> None:
        self._entry(key).since_listing += size

    def lock_added(self, key: RepositoryKey, lock_id: str, size: int) -> None:
        locks = self._entry(key).lock_sizes
        if len(locks) >= MAX_LOCKS:  # locks deleted elsewhere are never asked for
            del locks[next(iter(locks))]
        locks[lock_id] = size

    def lock_size(self, key: RepositoryKey, lock_id: str) -> int | None:
        """The size of a lock uploaded through the gateway, forgotten as it is asked."""
        entry = self.repositories.get(key)
        return None if entry is None else entry.lock_sizes.pop(lock_id, None)

    def removed(self, key: RepositoryKey, size: int) -> None:
        entry = self._entry(key)
        entry.since_listing -= size
        if entry.at_listing_start is not None:
            entry.removed_while_listing += size

    def note_level(self, key: RepositoryKey, quota: int | None, module: str) -> None:
        """Logs a crossing of 80 % or 100 % of the quota, up or down; counts those up."""
        entry = self.repositories.get(key)
        used = self.used(key)
        if entry is None or used is None:
            return
        level = 0
        if quota is not None:
            level = max((lv for lv in LEVELS if used * 100 >= lv * quota), default=0)
        if level == entry.level:
            return
        if level > entry.level:
            for passed in (lv for lv in LEVELS if entry.level < lv <= level):
                entry.crossings += 1
                self.crossings[passed] += 1
            log.warning("quota: module %s holds %s in %s: %d %% of its quota of %s",
                        module, format_size(used), key.path, used * 100 // max(quota or 1, 1),
                        format_size(quota))
        else:
            log.info("quota: module %s is back under %d %% of its quota in %s", module,
                     entry.level, key.path)
        entry.level = level
