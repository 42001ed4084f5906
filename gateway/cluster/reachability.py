"""Whether this node reaches the remote storage of the destinations it serves.

A remote can be out of reach from one node only (a firewall, a broken route)
while its backend here runs fine: requests for it would hang in rclone until
they time out. Each remote destination served here is probed with one listing
of its root by a short `rclone lsjson --max-depth 1` of that destination alone
(`backends.remote_check`, the start check: one LIST on S3). Not through the
WebDAV child: its listings of every destination wait behind one stuck on a dark
remote (measured with rclone 1.75: a PROPFIND of a healthy destination's root
timed out while another's hung), so one lost remote would make all look lost.

Remote storage is often billed per request, so the cadence is the old gateway's
(spec section 7): while a destination is healthy, one probe every `interval`
(60 s); while it fails, one every `fast_interval` (3 s), so that its return is
found within seconds. A failure seen on a real request (a 5xx answer, a
timeout, or a request without a body still unanswered after a few seconds)
marks nothing by itself: rclone answers 500 to some requests that have nothing
to do with the storage (a REST `HEAD` of a directory). It brings that destination's next probe
forward, at most one a second, and the probe decides. While a destination is
unreachable, requests for it go to a peer (gateway.forwarding.peers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from backends.tasks import cancel_and_wait

log = logging.getLogger("rclone_gateway.reachability")

MIN_PROBE_SPACING = 1.0  # seconds between two probes of one destination, at least
SCHEDULE_TICK = 1.0  # seconds between two looks at the schedule, at most

# One probe of a destination: None when its storage answered, else why not.
Check = Callable[[str], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class Unreachable:
    reason: str
    since: float  # wall clock


class Reachability:
    def __init__(self, *, interval: float = 60.0, fast_interval: float = 3.0,
                 probe_timeout: float = 4.0) -> None:
        self.interval = interval
        self.fast_interval = fast_interval
        self.probe_timeout = probe_timeout
        self.unreachable: dict[str, Unreachable] = {}
        self.probes = 0  # probes sent, since start
        self._due: dict[str, float] = {}  # uuid -> monotonic time of its next probe
        self._last_start: dict[str, float] = {}  # uuid -> when its last probe started
        self._down: dict[str, asyncio.Event] = {}  # set while the destination is unreachable
        self._waiters: dict[str, list[tuple[float, asyncio.Future[None]]]] = {}
        # Each destination's probe runs on its own, at most one at a time: one dark
        # destination, each probe of it taking its whole timeout, holds up no other's.
        self._probing: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def reachable(self, uuid: str) -> bool:
        return uuid not in self.unreachable

    def reason(self, uuid: str) -> str | None:
        entry = self.unreachable.get(uuid)
        return entry.reason if entry else None

    def mark(self, uuid: str, failure: str | None) -> None:
        down = self._down.setdefault(uuid, asyncio.Event())
        if failure is None:
            if self.unreachable.pop(uuid, None) is not None:
                log.info("destination %s is reachable again", uuid)
            down.clear()
        else:
            if uuid not in self.unreachable:
                log.warning("destination %s unreachable from this node: %s", uuid, failure)
                self.unreachable[uuid] = Unreachable(failure, time.time())
            down.set()

    def observe(self, uuid: str, status: int) -> None:
        """A real request's answer: a failure brings the next probe forward."""
        if status >= 500 and uuid not in self.unreachable:
            self.probe_soon(uuid)

    def probe_soon(self, uuid: str) -> None:
        """Brings the next probe of `uuid` forward: now, or a second after the last one."""
        now = time.monotonic()
        soonest = max(now, self._last_start.get(uuid, 0.0) + MIN_PROBE_SPACING)
        if soonest < self._due.get(uuid, float("inf")):
            self._due[uuid] = soonest
            self._wake.set()

    async def went_down(self, uuid: str) -> None:
        """Returns once a probe has found `uuid` unreachable."""
        down = self._down.setdefault(uuid, asyncio.Event())
        while uuid not in self.unreachable:
            await down.wait()
            if uuid not in self.unreachable:
                down.clear()  # set by a verdict since forgotten

    def confirm_timeout(self) -> float:
        """Seconds a confirmation may take at most: a probe of the destination under way
        (it may have just started), then the one brought forward, and a margin."""
        return 2 * self.probe_timeout + MIN_PROBE_SPACING

    async def confirm(self, uuid: str, timeout: float) -> bool:
        """Whether `uuid` is reachable, by a probe started from now on (brought forward);
        what is known already if no such probe ends within `timeout`. A probe under way
        that finds it unreachable answers too: the storage was lost before the call."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(uuid, []).append((time.monotonic(), waiter))
        self.probe_soon(uuid)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            pass
        finally:
            waiter.cancel()
        return self.reachable(uuid)

    def start(self, remotes: Callable[[], Collection[str]], check: Check) -> None:
        """Probes `remotes()`, each with `check(uuid)`, on the cadence above."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(remotes, check), name="reachability")

    async def close(self) -> None:
        await cancel_and_wait(self._task, *self._probing.values())
        self._task = None
        self._probing.clear()

    def schedule(self, uuids: Collection[str], now: float) -> list[str]:
        """Keeps the schedule to `uuids`; returns those due now. A destination new here
        was just listed by its start check (`backends.remote_check`): probed an interval
        later. One no longer served is forgotten, its probe under way cancelled."""
        for gone in set(self._due) - set(uuids):
            del self._due[gone]
            self._last_start.pop(gone, None)
            self.unreachable.pop(gone, None)
            if (down := self._down.get(gone)) is not None:
                down.clear()
            if (probing := self._probing.pop(gone, None)) is not None:
                probing.cancel()
        for uuid in uuids:
            self._due.setdefault(uuid, now + self.interval)
        return sorted(uuid for uuid in uuids if self._due[uuid] <= now)

    def next_due(self) -> float | None:
        return min(self._due.values(), default=None)

    async def _loop(self, remotes: Callable[[], Collection[str]], check: Check) -> None:
        while True:
            self._wake.clear()
            try:
                for uuid in self.schedule(remotes(), time.monotonic()):
                    if uuid not in self._probing:
                        self._probing[uuid] = asyncio.create_task(
                            self._probe_one(uuid, check), name=f"probe {uuid}")
            except Exception:
                log.exception("probing remote destinations failed")
            # Woken early by a failure, and once a second anyway: destinations come and go.
            wake_at = min((due for uuid, due in self._due.items()
                           if uuid not in self._probing), default=None)
            wait = SCHEDULE_TICK if wake_at is None else min(
                SCHEDULE_TICK, max(0.0, wake_at - time.monotonic()))
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)

    async def probe_all(self, uuids: Collection[str], check: Check) -> None:
        """Probes `uuids` at once and marks each by its answer; the next probe of each is
        set by the verdict."""
        await asyncio.gather(*(self._probe_one(uuid, check) for uuid in sorted(uuids)))

    async def _probe_one(self, uuid: str, check: Check) -> None:
        started = time.monotonic()
        self._last_start[uuid] = started
        self._due[uuid] = started + self.interval  # for now; set again by the verdict
        self.probes += 1
        try:
            failure = await self._probe(check, uuid)
        finally:
            if self._probing.get(uuid) is asyncio.current_task():
                del self._probing[uuid]
                self._wake.set()  # its next probe may be due already
        if uuid not in self._due:
            return  # forgotten meanwhile
        self.mark(uuid, failure)
        later = self._due[uuid]  # a failure meanwhile may have brought it forward
        self._due[uuid] = min(later, started + (
            self.interval if failure is None else self.fast_interval))
        self._answer_waiters(uuid, started, found_down=failure is not None)

    def _answer_waiters(self, uuid: str, probe_started: float, *, found_down: bool) -> None:
        waiting = self._waiters.get(uuid, [])
        keep = []
        for since, waiter in waiting:
            if since <= probe_started or found_down:
                if not waiter.done():
                    waiter.set_result(None)
            elif not waiter.done():
                keep.append((since, waiter))
        if keep:
            self._waiters[uuid] = keep
        else:
            self._waiters.pop(uuid, None)

    async def _probe(self, check: Check, uuid: str) -> str | None:
        try:
            return await check(uuid)
        except OSError as exc:  # rclone could not even be started: says nothing of the remote
            log.warning("probe of %s could not run: %s", uuid, exc)
            return None
