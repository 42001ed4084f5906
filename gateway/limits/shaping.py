"""Bandwidth: token buckets on the streaming path, their rates following the schedules.

A bucket hands out bytes in order of asking (a ticket per piece of at most `SLICE`
bytes), so the streams that share it take turns and each gets an even share. A stream
waits for its ticket before it reads or writes more: the rest stays in the socket
buffers, and memory stays flat (backpressure, not buffering). A piece goes through
the gateway's bucket of its direction and then its module's.

A bucket's rate changes at a slot boundary of its schedule (the timer wakes on the
minute) or when Redis changes; a stream that waits is woken at once and its wait
computed again at the new rate (none when it is `off`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime

from backends.splice import Pace
from backends.tasks import cancel_and_wait
from gateway.limits.values import Schedule

SLICE = 64 * 1024
BURST_SECONDS = 0.1  # credit an idle bucket gathers, in seconds of its rate
MIN_BURST = SLICE
BodyFilter = Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]


class TokenBucket:
    def __init__(self, rate: int | None = None) -> None:
        self.rate = rate  # bytes per second; None: no limit
        self._allowed = 0.0  # bytes that may have passed by `_stamp`
        self._reserved = 0  # bytes handed out tickets for
        self._stamp = time.monotonic()
        self._changed = asyncio.Event()
        self._waiting = 0  # streams waiting for their ticket
        self.waited = 0.0  # seconds streams spent waiting here, summed

    def _advance(self, now: float) -> None:
        if self.rate is None:
            self._allowed = float(self._reserved)
        else:
            burst = max(self.rate * BURST_SECONDS, MIN_BURST)
            self._allowed = min(self._allowed + (now - self._stamp) * self.rate,
                                self._reserved + burst)
        self._stamp = now

    def set_rate(self, rate: int | None) -> None:
        if rate == self.rate:
            return
        self._advance(time.monotonic())
        if self.rate is None:
            self._allowed = float(self._reserved)  # no debt carried into a limit
        self.rate = rate
        self._changed.set()  # waiting streams compute their wait again
        self._changed = asyncio.Event()

    async def take(self, size: int) -> None:
        if self.rate is None:
            self._reserved += size
            self._allowed = float(self._reserved)
            return
        now = time.monotonic()
        self._advance(now)  # idle credit is capped before this piece is counted in
        self._reserved += size
        ticket = self._reserved
        if self._allowed >= ticket:
            # Passes at once: still let the streams whose earlier tickets passed meanwhile
            # run first, or a stream whose reads never suspend takes every turn.
            if self._waiting:
                await asyncio.sleep(0)
            return
        self._waiting += 1
        try:
            while True:
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout((ticket - self._allowed) / self.rate):
                        await changed.wait()
                self._advance(time.monotonic())
                if self.rate is None or self._allowed >= ticket:
                    break
        except asyncio.CancelledError:
            # The stream is gone (its client left): its piece never passes, and the
            # streams behind it need not wait for it.
            self._allowed += size
            raise
        finally:
            self._waiting -= 1
        self.waited += time.monotonic() - now


class Shaper:
    """The buckets of the gateway and of each module, by direction, kept at their
    schedules' rates."""

    def __init__(self, clock: Callable[[], datetime] = datetime.now) -> None:
        self.clock = clock
        self.schedules: Mapping[str, Schedule] = {}
        self.buckets: dict[str, TokenBucket] = {}  # bwlimit field name -> its bucket
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow_schedules(), name="bandwidth-schedule")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def configure(self, schedules: Mapping[str, Schedule]) -> None:
        """The schedules in force now (from Redis): applied at once."""
        self.schedules = schedules
        self._apply()
        self._wake.set()

    def _apply(self) -> None:
        now = self.clock()
        for name, schedule in self.schedules.items():
            bucket = self.buckets.get(name)
            if bucket is None:
                bucket = self.buckets[name] = TokenBucket()
            bucket.set_rate(schedule.rate_at(now))
        for name, bucket in self.buckets.items():
            if name not in self.schedules:
                bucket.set_rate(None)  # kept: a stream may still hold it

    async def _follow_schedules(self) -> None:
        while True:
            self._wake.clear()
            now = self.clock()
            minutes = min((s.minutes_to_next_change(now) for s in self.schedules.values()
                           if not s.constant), default=None)
            timeout = 3600.0 if minutes is None else max(minutes * 60, 0.0) + 0.001
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._apply()

    def rate(self, name: str) -> int | None:
        bucket = self.buckets.get(name)
        return bucket.rate if bucket is not None else None

    def buckets_for(self, direction: str, module: str | None) -> list[TokenBucket]:
        """The buckets a transfer in `direction` by `module` (None: a node) goes through."""
        found = []
        for name in (direction, f"module/{module}/{direction}" if module else None):
            if name is not None and name in self.schedules:
                found.append(self.buckets[name])
        return found

    def holds(self, direction: str, module: str | None) -> bool:
        """Whether a limit holds a transfer in `direction` by `module` back now."""
        return any(bucket.rate is not None for bucket in self.buckets_for(direction, module))

    def transform(self, direction: str, module: str | None) -> BodyFilter:
        """A body transform holding a stream to the limits in force as each piece passes:
        a limit set, changed or lifted mid-transfer applies to the rest of it."""
        return lambda chunks: self._shaped(chunks, direction, module)

    def pace(self, direction: str, module: str | None) -> Pace:
        """The same limits for a body spliced past the process (`backends.splice`): asked
        before each piece, grants it at once when no limit holds, else one slice of it
        once every bucket of the transfer let it pass."""

        async def granted(want: int) -> int:
            buckets = self.buckets_for(direction, module) if self.schedules else ()
            if not buckets:
                return want
            piece = min(want, SLICE)
            for bucket in buckets:
                await bucket.take(piece)
            return piece

        return granted

    async def _shaped(self, chunks: AsyncIterator[bytes], direction: str,
                      module: str | None) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            buckets = self.buckets_for(direction, module) if self.schedules else ()
            if not buckets:
                yield chunk
                continue
            for start in range(0, len(chunk), SLICE):
                piece = chunk if len(chunk) <= SLICE else chunk[start:start + SLICE]
                for bucket in buckets:
                    await bucket.take(len(piece))
                yield piece
