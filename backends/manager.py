"""Generations of backends: the three `rclone serve` children for one rendered configuration.

A new configuration starts a new generation beside the old one; new requests go
to the new generation as soon as it answers, and the old one is stopped once
its in-flight requests have finished (bounded by a grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from backends.client import ConnectionPool
from backends.kinds import Backend
from backends.process import RcloneChild, wait_connections_closed
from backends.rclone_conf import RenderedConfig
from backends.remote_check import CHILD_CONNECT_TIMEOUT
from backends.tasks import cancel_and_wait

log = logging.getLogger("rclone_gateway.backends")

CONNECT_TIMEOUT = 5.0
# How long a replaced child keeps serving the requests it had, at most: 30 s (or the
# `--backend-timeout` when shorter; after it they are answered 504) and a margin. It was
# replaced because it stopped answering: what is still on it then is cut.
CHILD_DRAIN_MARGIN = 5.0
CHILD_DRAIN_GRACE = 30.0 + CHILD_DRAIN_MARGIN
# Bytes of a response body read ahead from a backend, as for request bodies in the server.
READ_BUFSIZE = 512 * 1024


def rclone_argv(rclone: str, backend: Backend, conf: Path, socket: Path, root: str) -> list[str]:
    common = [
        "--config", str(conf),
        "--addr", f"unix://{socket}",
        "--log-level", "NOTICE",
        "--cache-dir", str(conf.parent / "cache"),
        "--ask-password=false",
        # Fail fast against storage that does not answer, as the old gateway's children
        # do (rclone's defaults: a minute to connect, ten tries): restic retries itself,
        # and the request can go to a peer meanwhile.
        "--contimeout", f"{CHILD_CONNECT_TIMEOUT}s", "--low-level-retries", "1",
    ]
    if backend is Backend.WEBDAV:
        # The default (5 minutes) keeps a repository created through REST invisible over
        # WebDAV for minutes. Not 0s: with 0 the child falls into a busy loop after an
        # ordinary mix of node WebDAV operations; 1ms is as fresh without the loop.
        return [rclone, "serve", "webdav", root, *common, "--dir-cache-time", "1ms"]
    extra = ["--append-only"] if backend is Backend.RESTIC_APPEND_ONLY else []
    return [rclone, "serve", "restic", root, *common, "--cache-objects=false", *extra]


@dataclass(frozen=True, slots=True)
class Replacement:
    """Why and when a child that still ran was replaced."""

    reason: str
    at: float  # wall clock
    old_pid: int | None
    new_pid: int | None


@dataclass
class Generation:
    number: int
    directory: Path
    config: RenderedConfig
    children: dict[Backend, RcloneChild]
    sessions: dict[Backend, aiohttp.ClientSession] = field(default_factory=dict)
    pools: dict[Backend, ConnectionPool] = field(default_factory=dict)
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False

    @property
    def healthy(self) -> bool:
        return all(child.ready for child in self.children.values())

    def session(self, backend: Backend) -> aiohttp.ClientSession:
        session = self.sessions.get(backend)
        if session is None:
            connector = aiohttp.UnixConnector(
                path=str(self.children[backend].socket_path), limit=0, keepalive_timeout=30
            )
            session = aiohttp.ClientSession(
                connector=connector,
                read_bufsize=READ_BUFSIZE,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
            self.sessions[backend] = session
        return session

    def pool(self, backend: Backend) -> ConnectionPool:
        """The connections proxied requests take (the session is for the gateway's own)."""
        pool = self.pools.get(backend)
        if pool is None:
            pool = ConnectionPool.unix(str(self.children[backend].socket_path),
                                     connect_timeout=CONNECT_TIMEOUT)
            self.pools[backend] = pool
        return pool

    @contextlib.contextmanager
    def use(self) -> Iterator[Generation]:
        self.inflight += 1
        self.idle.clear()
        try:
            yield self
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()

    async def stop(self) -> None:
        # Connections first: closing our end of every backend connection makes rclone discard
        # uploads it is receiving, before it is told to stop.
        self.stopping = True
        for pool in self.pools.values():
            await pool.close()
        for session in self.sessions.values():
            await session.close()
        await wait_connections_closed([child.socket_path for child in self.children.values()])
        await asyncio.gather(*(child.stop() for child in self.children.values()))
        shutil.rmtree(self.directory, ignore_errors=True)


class BackendManager:
    def __init__(self, runtime_dir: Path, rclone: str, *, drain_grace: float = 600.0,
                 child_drain_grace: float = CHILD_DRAIN_GRACE) -> None:
        self.runtime_dir = runtime_dir
        self.rclone = rclone
        self.drain_grace = drain_grace
        self.child_drain_grace = child_drain_grace
        self.current: Generation | None = None
        self.retiring: list[Generation] = []
        self.retiring_children: list[RcloneChild] = []
        self._counter = 0
        self._child_counter = 0
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.reloads = 0
        # Children replaced while they still ran, per backend, since start.
        self.replacements: dict[Backend, int] = dict.fromkeys(Backend, 0)
        self.last_replacement: dict[Backend, Replacement] = {}
        self.empty_root = str(runtime_dir / "empty")
        os.makedirs(self.empty_root, mode=0o700, exist_ok=True)

    def child_env(self) -> dict[str, str]:
        keep = ("PATH", "HOME", "TZ", "LANG", "SSL_CERT_FILE", "SSL_CERT_DIR", "TMPDIR")
        env = {k: v for k, v in os.environ.items() if k in keep}
        env.setdefault("HOME", str(self.runtime_dir))
        return env

    async def apply(self, config: RenderedConfig) -> bool:
        """Serve `config`; True when a new generation took over."""
        async with self._lock:
            if self.current is not None and self.current.config.digest == config.digest:
                self.current.config = config  # same text, possibly other peer placements
                return False
            generation = await self._start_generation(config)
            old, self.current = self.current, generation
            self.reloads += 1
            log.info("backend generation %d serving", generation.number)
        if old is not None:
            self.retiring.append(old)
            self._tasks.add(asyncio.create_task(self._retire(old), name=f"retire-{old.number}"))
        return True

    async def _start_generation(self, config: RenderedConfig) -> Generation:
        self._counter += 1
        directory = self.runtime_dir / f"gen-{self._counter}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(mode=0o700)
        conf = directory / "rclone.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(config.text)
        children = {
            backend: self._child(backend, directory, config, f"gen{self._counter}")
            for backend in Backend
        }
        try:
            await asyncio.gather(*(child.start() for child in children.values()))
        except BaseException:
            await asyncio.gather(*(c.stop() for c in children.values()), return_exceptions=True)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        generation = Generation(self._counter, directory, config, children)
        generation.idle.set()
        return generation

    def _child(self, backend: Backend, directory: Path, config: RenderedConfig,
               label: str) -> RcloneChild:
        suffix = label.partition(".")[2]
        socket = directory / (f"{backend.value}-{suffix}.sock" if suffix else
                              f"{backend.value}.sock")
        argv = rclone_argv(self.rclone, backend, directory / "rclone.conf", socket,
                           config.tree_root)
        return RcloneChild(f"{backend.value}@{label}", argv, socket, self.child_env())

    async def replace_child(self, generation: Generation, backend: Backend, reason: str) -> bool:
        """Starts a new child for `backend` of `generation` and moves new requests to it.

        The old one keeps the requests it has until they finish or time out, then it is
        stopped, SIGKILL after a short grace: a child that does not answer may not
        answer SIGTERM either. False when the new child did not start (the old one stays).
        """
        async with self._lock:
            if generation.stopping or generation is not self.current:
                return False
            old = generation.children[backend]
            self._child_counter += 1
            new = self._child(backend, generation.directory, generation.config,
                              f"gen{generation.number}.r{self._child_counter}")
            try:
                await new.start()
            except (RuntimeError, OSError):
                log.error("backend %s could not be replaced: its replacement did not start",
                          old.name)
                return False
            new.restarts = old.restarts
            generation.children[backend] = new
            pool = generation.pools.pop(backend, None)
            session = generation.sessions.pop(backend, None)
            self.replacements[backend] += 1
            self.last_replacement[backend] = Replacement(reason, time.time(), old.pid, new.pid)
            log.warning("backend %s (pid %s) replaced by %s (pid %s): %s",
                        old.name, old.pid, new.name, new.pid, reason)
            self.retiring_children.append(old)
        task = asyncio.create_task(self._retire_child(old, pool, session),
                                   name=f"retire-{old.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _retire_child(self, child: RcloneChild, pool: ConnectionPool | None,
                            session: aiohttp.ClientSession | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.child_drain_grace
        try:
            while pool is not None and pool.busy and loop.time() < deadline:
                await asyncio.sleep(0.1)
        finally:
            if pool is not None:
                await pool.close()
            if session is not None:
                await session.close()
            await child.stop(grace=2.0)
            with contextlib.suppress(ValueError):
                self.retiring_children.remove(child)
            log.info("replaced backend %s stopped", child.name)

    async def _retire(self, generation: Generation) -> None:
        try:
            await asyncio.wait_for(generation.idle.wait(), self.drain_grace)
        except TimeoutError:
            log.warning(
                "generation %d still had %d requests after %.0f s; stopping it",
                generation.number, generation.inflight, self.drain_grace,
            )
        await generation.stop()
        self.retiring.remove(generation)
        self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
        log.info("backend generation %d stopped", generation.number)

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        generations = [*self.retiring, *([self.current] if self.current else [])]
        self.current = None
        await asyncio.gather(*(g.stop() for g in generations),
                             *(c.stop(grace=2.0) for c in self.retiring_children),
                             return_exceptions=True)
        self.retiring_children.clear()
