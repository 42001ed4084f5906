"""Liveness of the rclone children: a child that runs but no longer answers is replaced.

A busy loop, a deadlock or a handler stuck on storage I/O leaves the process alive, so
the supervisor that waits for it to exit never notices. Every `interval` seconds the
watchdog sends a request of its own on each child's socket of the serving generation,
with a deadline (`backends.process.http_ready`); a child that misses `misses` checks in
a row is replaced the way a reload replaces a generation: new requests go to the new
child at once, the old one keeps its requests until they finish or time out.

With the defaults a child that stops answering is replaced within about
misses * (interval + timeout) = 21 seconds.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from backends.kinds import Backend
from backends.manager import BackendManager, Generation
from backends.process import RcloneChild, http_ready
from backends.tasks import cancel_and_wait

log = logging.getLogger("rclone_gateway.backends")


@dataclass(frozen=True, slots=True)
class LivenessSettings:
    interval: float  # seconds between two checks of a child
    timeout: float  # seconds a child has to answer one
    misses: int  # checks missed in a row before the child is replaced


def replacement_reason(missed: int, timeout: float) -> str:
    return f"did not answer {missed} liveness checks in a row ({timeout:g} s each)"


class Watchdog:
    def __init__(self, backends: BackendManager, settings: LivenessSettings) -> None:
        self.backends = backends
        self.settings = settings
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="liveness")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:
                log.exception("liveness check failed")
            await asyncio.sleep(self.settings.interval)

    async def check_once(self) -> None:
        generation = self.backends.current
        if generation is None or generation.stopping:
            return
        running = [(backend, child) for backend, child in generation.children.items()
                   if child.ready]
        answers = await asyncio.gather(
            *(http_ready(child.socket_path, self.settings.timeout) for _, child in running))
        for (backend, child), answered in zip(running, answers, strict=True):
            await self._record(generation, backend, child, answered)

    async def _record(self, generation: Generation, backend: Backend, child: RcloneChild,
                      answered: bool) -> None:
        if not child.ready or generation.children.get(backend) is not child:
            return  # it exited or was replaced while we waited: not this check's business
        if answered:
            if child.missed_checks:
                log.info("backend %s answers again", child.name)
            child.missed_checks = 0
            return
        child.missed_checks += 1
        log.warning("backend %s (pid %s) did not answer a liveness check within %g s (%d/%d)",
                    child.name, child.pid, self.settings.timeout, child.missed_checks,
                    self.settings.misses)
        if child.missed_checks >= self.settings.misses:
            reason = replacement_reason(child.missed_checks, self.settings.timeout)
            await self.backends.replace_child(generation, backend, reason)
