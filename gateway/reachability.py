"""Whether this node reaches the remote storage of the destinations it serves.

A remote can be out of reach from one node only (a firewall, a broken route)
while its backend here runs fine: requests for it would hang in rclone until
they time out. Each remote destination served here is probed through the local
WebDAV backend with a listing of its root (`PROPFIND /<uuid>/`, Depth 1; a
Depth 0 answer can come from what rclone already knows of the tree, without
reaching the remote). A failure seen on a real request (a 5xx answer, a
timeout) marks nothing by itself: rclone answers 500 to some requests that have
nothing to do with the storage (a REST `HEAD` of a directory), so it only brings
the next probe forward, and the probe decides. While a destination is
unreachable, requests for it go to a peer (gateway.peers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

import aiohttp

from gateway.tasks import cancel_and_wait

log = logging.getLogger("rclone_gateway.reachability")

MIN_PROBE_SPACING = 1.0  # seconds
NO_VERDICT = -1  # the local backend itself did not answer: says nothing of the remote


@dataclass(frozen=True, slots=True)
class Unreachable:
    reason: str
    since: float  # wall clock


def probe_outcome(status: int | None) -> str | None:
    """None when a probe answer shows the remote answering; otherwise why not."""
    if status is None:
        return "remote did not answer in time"
    if status >= 500:
        return f"remote access failed ({status})"
    return None


class Reachability:
    def __init__(self, *, probe_interval: float = 2.0, probe_timeout: float = 4.0) -> None:
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.unreachable: dict[str, Unreachable] = {}
        self._task: asyncio.Task[None] | None = None
        self._probe_soon = asyncio.Event()
        self._backend_answers: Callable[[aiohttp.ClientSession], Awaitable[bool]] | None = None

    def reachable(self, uuid: str) -> bool:
        return uuid not in self.unreachable

    def reason(self, uuid: str) -> str | None:
        entry = self.unreachable.get(uuid)
        return entry.reason if entry else None

    def mark(self, uuid: str, failure: str | None) -> None:
        if failure is None:
            if self.unreachable.pop(uuid, None) is not None:
                log.info("destination %s is reachable again", uuid)
        elif uuid not in self.unreachable:
            log.warning("destination %s unreachable from this node: %s", uuid, failure)
            self.unreachable[uuid] = Unreachable(failure, time.time())

    def observe(self, uuid: str, status: int) -> None:
        """A real request's answer: a failure brings the next probe forward."""
        if status >= 500 and uuid not in self.unreachable:
            self._probe_soon.set()

    def start(
        self,
        remotes: Callable[[], Collection[str]],
        session: Callable[[], aiohttp.ClientSession | None],
        backend_answers: Callable[[aiohttp.ClientSession], Awaitable[bool]] | None = None,
    ) -> None:
        """Probe `remotes()` through the WebDAV backend that `session()` talks to.

        `backend_answers(session)` tells whether the backend behind that session still
        answers: a probe that timed out while it did not says nothing of the remotes (the
        child is stuck, or was replaced meanwhile, by the liveness checks).
        """
        self._backend_answers = backend_answers
        if self._task is None:
            self._task = asyncio.create_task(self._loop(remotes, session), name="reachability")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _loop(
        self,
        remotes: Callable[[], Collection[str]],
        session: Callable[[], aiohttp.ClientSession | None],
    ) -> None:
        while True:
            self._probe_soon.clear()
            try:
                await self.probe_all(remotes(), session())
            except Exception:
                log.exception("probing remote destinations failed")
            # Failing requests bring a probe forward, never more often than this.
            spacing = min(MIN_PROBE_SPACING, self.probe_interval)
            await asyncio.sleep(spacing)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._probe_soon.wait(), self.probe_interval - spacing)

    async def probe_all(
        self, uuids: Collection[str], session: aiohttp.ClientSession | None
    ) -> None:
        for uuid in list(self.unreachable):
            if uuid not in uuids:
                del self.unreachable[uuid]
        if session is None or not uuids:
            return
        ordered = sorted(uuids)
        statuses = await asyncio.gather(*(self._probe(session, uuid) for uuid in ordered))
        if None in statuses and self._backend_answers is not None and not (
                await self._backend_answers(session)):
            statuses = [NO_VERDICT if status is None else status for status in statuses]
        for uuid, status in zip(ordered, statuses, strict=True):
            if status != NO_VERDICT:
                self.mark(uuid, probe_outcome(status))

    async def _probe(self, session: aiohttp.ClientSession, uuid: str) -> int | None:
        timeout = aiohttp.ClientTimeout(total=self.probe_timeout)
        try:
            async with session.request("PROPFIND", f"http://backend/{uuid}/",
                                       headers={"Depth": "1"}, timeout=timeout) as response:
                await response.read()
                return response.status
        except TimeoutError:
            return None
        except aiohttp.ClientError:
            return NO_VERDICT
