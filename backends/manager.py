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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from backends.process import RcloneChild, wait_connections_closed
from backends.rclone_conf import RenderedConfig
from gateway.policy import Backend
from gateway.tasks import cancel_and_wait
from gateway.upstream import UpstreamPool

log = logging.getLogger("rclone_gateway.backends")

CONNECT_TIMEOUT = 5.0
# Bytes of a response body read ahead from a backend, as for request bodies in the server.
READ_BUFSIZE = 512 * 1024


def rclone_argv(rclone: str, backend: Backend, conf: Path, socket: Path, root: str) -> list[str]:
    common = [
        "--config", str(conf),
        "--addr", f"unix://{socket}",
        "--log-level", "NOTICE",
        "--cache-dir", str(conf.parent / "cache"),
        "--ask-password=false",
    ]
    if backend is Backend.WEBDAV:
        # Without this a repository created through REST stays invisible over WebDAV for minutes.
        return [rclone, "serve", "webdav", root, *common, "--dir-cache-time", "0s"]
    extra = ["--append-only"] if backend is Backend.RESTIC_APPEND_ONLY else []
    return [rclone, "serve", "restic", root, *common, "--cache-objects=false", *extra]


@dataclass
class Generation:
    number: int
    directory: Path
    config: RenderedConfig
    children: dict[Backend, RcloneChild]
    sessions: dict[Backend, aiohttp.ClientSession] = field(default_factory=dict)
    pools: dict[Backend, UpstreamPool] = field(default_factory=dict)
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

    def pool(self, backend: Backend) -> UpstreamPool:
        """The connections proxied requests take (the session is for the gateway's own)."""
        pool = self.pools.get(backend)
        if pool is None:
            pool = UpstreamPool.unix(str(self.children[backend].socket_path),
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
    def __init__(self, runtime_dir: Path, rclone: str, *, drain_grace: float = 600.0) -> None:
        self.runtime_dir = runtime_dir
        self.rclone = rclone
        self.drain_grace = drain_grace
        self.current: Generation | None = None
        self.retiring: list[Generation] = []
        self._counter = 0
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.reloads = 0
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
            backend: RcloneChild(
                f"{backend.value}@gen{self._counter}",
                rclone_argv(self.rclone, backend, conf, directory / f"{backend.value}.sock",
                            config.tree_root),
                directory / f"{backend.value}.sock",
                self.child_env(),
            )
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
        await asyncio.gather(*(g.stop() for g in generations), return_exceptions=True)
