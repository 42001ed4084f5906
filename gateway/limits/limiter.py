"""The limits of this node, in one place: what the request path and the operator ask.

`Limiter` holds the parsed limits in force (`config`), the bytes each repository holds
(`quota`), the bandwidth buckets (`shaping`) and the requests in flight
(`concurrency`). The pipeline's stages decide with it; `/status`, `/metrics` and
`rclone-gateway limits show` read `document()`.
"""

from __future__ import annotations

from collections.abc import Callable

from backends.splice import Pace
from gateway.access.policy import app_type
from gateway.access.refusals import Refused
from gateway.access.repository import RepositoryKey, address_of
from gateway.cluster.state import ClusterState
from gateway.limits.concurrency import InFlight
from gateway.limits.config import Limits, LimitsKeeper
from gateway.limits.quota import Segments, UsageBook
from gateway.limits.shaping import BodyFilter, Shaper
from gateway.limits.views import QuotaView


class Limiter:
    def __init__(self, state: Callable[[], ClusterState | None]) -> None:
        self._state = state
        self.keeper = LimitsKeeper()
        self.book = UsageBook()
        self.shaper = Shaper()
        self.inflight = InFlight()
        self._paces: dict[tuple[str, str | None], Pace] = {}

    @property
    def current(self) -> Limits:
        return self.keeper.current

    def start(self) -> None:
        self.shaper.start()

    async def close(self) -> None:
        await self.shaper.close()

    async def on_state(self, state: ClusterState) -> None:
        """A new read of Redis: the limits in its Limits keys apply from now on."""
        limits = self.keeper.update(state.limits)
        self.shaper.configure(limits.bandwidth)

    def module_of(self, key: RepositoryKey) -> str | None:
        """The module id whose own repository `key` is."""
        state = self._state() or ClusterState()
        for module, uuid in state.module_uuids.items():
            if uuid == key.uuid:
                return module
        return None

    def quota_of(self, key: RepositoryKey, module: str | None = None) -> int | None:
        module = module or self.module_of(key)
        return None if module is None else self.current.quota(key.destination, module)

    # --- the storage scan ------------------------------------------------------------------

    def listing_started(self, key: RepositoryKey) -> None:
        self.book.listing_started(key)

    def listed(self, key: RepositoryKey, stored_bytes: int) -> bool:
        """True when the repository should be listed again once quiet (it was written to
        while the listing ran)."""
        busy = self.book.listed(key, stored_bytes)
        self._note_level(key)
        return busy

    def full_scan_ended(self, found: set[RepositoryKey], listed: set[str]) -> None:
        self.book.full_scan_ended(found, listed)
        for key in list(self.book.repositories):
            self._note_level(key)

    def _note_level(self, key: RepositoryKey, module: str | None = None) -> None:
        module = module or self.module_of(key)
        if module is not None:
            self.book.note_level(key, self.current.quota(key.destination, module), module)

    # --- the request path ------------------------------------------------------------------

    def enter(self, user: str, is_node: bool, group: str) -> bool:
        """Counts a request of `user` in flight, unless it has its cap in flight already."""
        return self.inflight.enter(user, self.current.cap(is_node), group)

    def leave(self, user: str) -> None:
        self.inflight.leave(user)

    def check_upload(self, key: RepositoryKey, size: int,
                     quota: int | None) -> Refused | None:
        """Whether an upload of `size` bytes into `key` fits `quota`; when it does, the
        bytes are reserved until `upload_ended`."""
        return self.book.check(key, size, quota)

    def lock_size(self, key: RepositoryKey, lock_id: str) -> int | None:
        """The size of a lock uploaded through the gateway, forgotten as it is asked."""
        return self.book.lock_size(key, lock_id)

    def has_quotas(self, destination: str) -> bool:
        """Whether a quota applies to a repository in `destination`."""
        return bool(self.current.quotas.get(destination))

    def shaping(self, direction: str, module: str | None) -> BodyFilter:
        """A body transform holding a transfer in `direction` by `module` (None: a node) to
        the bandwidth limits in force."""
        return self.shaper.transform(direction, module)

    def pace(self, direction: str, module: str | None) -> Pace:
        """`shaping` for a body spliced past the process: grants bytes before they pass.
        One per direction and module (it looks the limits up at each grant)."""
        key = (direction, module)
        if (pace := self._paces.get(key)) is None:
            pace = self._paces[key] = self.shaper.pace(direction, module)
        return pace

    def holds(self, direction: str, module: str | None) -> bool:
        """Whether a bandwidth limit holds a transfer in `direction` by `module` back now."""
        return self.shaper.holds(direction, module)

    def upload_ended(self, key: RepositoryKey, module: str | None, reserved: int,
                     stored: int | None, lock_id: str | None = None) -> None:
        """An upload into `key` was answered: `stored` bytes kept (None: nothing)."""
        if reserved:
            self.book.release(key, reserved)
        if stored is not None:
            self.book.added(key, stored)
            if lock_id is not None:
                self.book.lock_added(key, lock_id, stored)
            self._note_level(key, module)

    def deleted(self, key: RepositoryKey, size: int) -> None:
        self.book.removed(key, size)
        self._note_level(key)

    def webdav_written(self, method: str, target: Segments,
                       destination: Segments | None) -> tuple[list[RepositoryKey],
                                                              list[RepositoryKey]]:
        """A node's WebDAV write was answered 2xx: a DELETE, or a MOVE of its source, took
        the repositories at or below the target with it; a COPY or MOVE counted them again
        where they landed. Returns (the repositories gone, those to list again)."""
        written: set[RepositoryKey] = set()
        if method in ("COPY", "MOVE") and destination is not None:
            written.update(self.book.copied(target, destination))
        gone = self.book.gone(target) if method in ("DELETE", "MOVE") else []
        written.update(gone)
        for segments in (target, destination or ()):
            address = address_of(segments, trailing_slash=False)
            if address is not None and not address.metadata:  # into or inside a repository
                written.add(address.key)
        for key in written:
            self._note_level(key)
        return gone, sorted(written)

    # --- what the operator sees ------------------------------------------------------------

    def quota_views(self) -> list[QuotaView]:
        """Each repository with a quota or a known use, in order."""
        limits = self.current
        state = self._state() or ClusterState()
        modules = {uuid: module for module, uuid in state.module_uuids.items()}
        views = []
        for key in sorted(set(self.book.repositories) | self._quota_keys(state)):
            module = modules.get(key.uuid)
            entry = self.book.repositories.get(key)
            views.append(QuotaView(
                key, module, None if module is None else limits.quota(key.destination, module),
                self.book.used(key), entry.reserved if entry else 0, entry.level if entry else 0))
        return views

    def document(self) -> dict[str, object]:
        limits = self.current
        return {
            "quotas": [view.document() for view in self.quota_views()],
            "bandwidth": {
                name: {"schedule": schedule.text, "rate_now": self.shaper.rate(name)}
                for name, schedule in sorted(limits.bandwidth.items())
            },
            "concurrency": {
                "module_cap": limits.module_cap,
                "node_cap": limits.node_cap,
                "in_flight": dict(sorted(self.inflight.counts.items())),
                "refused": dict(sorted(self.inflight.refused.items())),
            },
        }

    def _quota_keys(self, state: ClusterState) -> set[RepositoryKey]:
        """Repositories a quota names that the book does not know yet."""
        keys = set()
        for destination, hashed in self.current.quotas.items():
            for module in hashed:
                uuid = state.module_uuids.get(module)
                if uuid is not None:
                    keys.add(RepositoryKey(destination, app_type(module), uuid))
        return keys
