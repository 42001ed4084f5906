"""Turns each new cluster state into served backends, one reload at a time.

Redis listeners only hand the latest state over and return, so ACL and module
changes (read straight from the state by the request path) are never held up
by a reload. The worker here then checks remote destinations that are new,
changed or due for a retry, renders the tree without the failing ones, and
lets the backend manager start a new generation when the rendered
configuration changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backends.manager import BackendManager
from backends.rclone_conf import RenderedConfig, place, render, section_body
from backends.remote_check import RemoteHealth, check_remote, fingerprint
from backends.tasks import cancel_and_wait
from gateway.cluster.state import ClusterState

log = logging.getLogger("rclone_gateway.reload")

CHECK_CONCURRENCY = 4
GENERATION_RETRY_MIN = 2.0
GENERATION_RETRY_MAX = 60.0


@dataclass(frozen=True)
class RemoteSpec:
    section_lines: list[str]
    basepath: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.section_lines, self.basepath)


def remote_specs(
    state: ClusterState, node_id: str, local_repo: str
) -> dict[str, RemoteSpec]:
    """The destinations this node serves through an rclone remote of their own."""
    placement = place(state.destinations, state.node_vpn.get(node_id), local_repo)
    remotes = {}
    for uuid, upstream in placement.local.items():
        if upstream == local_repo:
            continue
        dest = state.destinations[uuid]
        remotes[uuid] = RemoteSpec(section_body(dest.rclone_section or ""), dest.basepath)
    return remotes


class Reloader:
    def __init__(
        self,
        backends: BackendManager,
        *,
        node_id: str,
        local_repo: Path,
        check_timeout: float,
        on_serving: Callable[[RenderedConfig], None],
    ) -> None:
        self.backends = backends
        self.node_id = node_id
        self.local_repo = local_repo
        self.check_timeout = check_timeout
        self.on_serving = on_serving
        self.remotes = RemoteHealth()
        self.failed_generations = 0
        self._retry_generation_at: float | None = None
        self._state: ClusterState | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._checks = asyncio.Semaphore(CHECK_CONCURRENCY)

    async def on_state(self, state: ClusterState) -> None:
        self._state = state
        self._wake.set()

    def retry_now(self) -> None:
        """Failed remotes are checked again and the configuration reloaded (SIGHUP)."""
        self.remotes.retry_now()
        self._retry_generation_at = None
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reloader")

    async def close(self) -> None:
        await cancel_and_wait(self._task)

    def destination_problem(self, uuid: str) -> dict[str, object] | None:
        """What /health says about a remote destination left out of the tree."""
        verdict = self.remotes.verdicts.get(uuid)
        if verdict is None or verdict.error is None:
            return None
        retry_in = max(0.0, (verdict.retry_at or 0.0) - time.monotonic())
        return {"error": verdict.error, "attempts": verdict.attempts,
                "retry_in": round(retry_in, 1)}

    def _next_wake(self) -> float | None:
        times = [t for t in (self.remotes.next_retry(), self._retry_generation_at) if t]
        return max(0.0, min(times) - time.monotonic()) if times else None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._next_wake())
            self._wake.clear()
            if self._state is None:
                continue
            try:
                await self.reload(self._state)
            except Exception:
                log.exception("reload failed")

    async def _check(self, uuid: str, spec: RemoteSpec) -> str | None:
        async with self._checks:
            return await check_remote(
                self.backends.rclone, uuid, spec.section_lines, spec.basepath,
                workdir=self.backends.runtime_dir / "checks", env=self.backends.child_env(),
                timeout=self.check_timeout,
            )

    async def _check_remotes(self, state: ClusterState) -> None:
        remotes = remote_specs(state, self.node_id, str(self.local_repo))
        self.remotes.keep_only(set(remotes))
        prints = {uuid: spec.fingerprint for uuid, spec in remotes.items()}
        due = self.remotes.to_check(prints, time.monotonic())
        if not due:
            return
        errors = await asyncio.gather(*(self._check(uuid, remotes[uuid]) for uuid in due))
        now = time.monotonic()
        for uuid, error in zip(due, errors, strict=True):
            was_failing = uuid in self.remotes.failing()
            self.remotes.record(uuid, prints[uuid], error, now)
            if error is not None:
                log.warning("destination %s left out: its remote does not start: %s", uuid, error)
            elif was_failing:
                log.info("destination %s: its remote starts now", uuid)

    async def reload(self, state: ClusterState) -> bool:
        """Serve `state`'s destinations; True when a new generation of backends took over."""
        await self._check_remotes(state)
        rendered = render(
            state.destinations, state.node_vpn.get(self.node_id), str(self.local_repo),
            self.backends.empty_root, skip=self.remotes.failing(),
        )
        if str(self.local_repo) in rendered.placement.local.values():
            self.local_repo.mkdir(parents=True, exist_ok=True)
        try:
            changed = await self.backends.apply(rendered)
        except RuntimeError:
            # Each remote passed alone, yet the tree did not start (a remote may have gone
            # away since its check): check them all again before the next attempt.
            self.failed_generations += 1
            delay = min(GENERATION_RETRY_MIN * 2 ** (self.failed_generations - 1),
                        GENERATION_RETRY_MAX)
            self._retry_generation_at = time.monotonic() + delay
            self.remotes.forget_passed()
            log.warning("backends for the new configuration did not start; retrying in %.0f s",
                        delay)
            return False
        self.failed_generations = 0
        self._retry_generation_at = None
        self.on_serving(rendered)
        return changed
