"""One supervised `rclone serve` child on a unix socket: start, readiness, restart with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger("rclone_gateway.backends")

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the kernel kills it when the
    # gateway dies, even by SIGKILL, so no rclone outlives the gateway.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)


async def http_ready(socket_path: Path, timeout: float = 2.0) -> bool:
    """True when an HTTP server answers on the unix socket."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(socket_path)), timeout
        )
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"OPTIONS / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), timeout)
        return line.startswith(b"HTTP/1.")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


class RcloneChild:
    """Runs one `rclone serve ...` and keeps it running until `stop()`."""

    min_backoff = 0.5
    max_backoff = 30.0
    start_timeout = 30.0

    def __init__(self, name: str, argv: list[str], socket_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.socket_path = socket_path
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.state = "stopped"
        self.restarts = 0
        self.last_exit: int | None = None
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._log_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    @property
    def ready(self) -> bool:
        return self.state == "running"

    async def start(self) -> None:
        """Start the child and wait until it answers; raises RuntimeError if it cannot."""
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")

    async def _spawn(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self.state = "starting"
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            preexec_fn=_die_with_parent,
        )
        self._log_task = asyncio.create_task(self._relay_log(self.proc), name=f"log-{self.name}")
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                break
            if self.socket_path.exists() and await http_ready(self.socket_path):
                self.state = "running"
                log.info("backend %s started (pid %d)", self.name, self.proc.pid)
                return
            await asyncio.sleep(0.05)
        self.state = "failed"
        await self._kill()
        raise RuntimeError(f"backend {self.name} did not start")

    async def _relay_log(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            log.info("%s[%d]: %s", self.name, proc.pid, line.decode(errors="replace").rstrip())

    async def _supervise(self) -> None:
        backoff = self.min_backoff
        while not self._stopping:
            assert self.proc is not None
            started = time.monotonic()
            self.last_exit = await self.proc.wait()
            if self._stopping:
                return
            self.state = "restarting"
            self.restarts += 1
            log.warning("backend %s exited with %s; restarting", self.name, self.last_exit)
            if time.monotonic() - started > 60:
                backoff = self.min_backoff
            while not self._stopping:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                try:
                    await self._spawn()
                    break
                except (RuntimeError, OSError):
                    log.warning("backend %s failed to restart", self.name)

    async def _kill(self, grace: float = 5.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def stop(self, grace: float = 5.0) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._kill(grace)
        self.state = "stopped"
