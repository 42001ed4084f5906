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

from backends.tasks import cancel_and_wait

log = logging.getLogger("rclone_gateway.backends")

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


# The process that starts the children: the gateway. In a container it is pid 1 itself.
_gateway_pid = os.getpid()


def _parent_gone() -> bool:
    """In a child between fork and exec: True when the gateway died before the death signal
    was set (the child now belongs to an init or a subreaper). Not `getppid() == 1`: under
    `podman run` the gateway is pid 1, and every child would take itself for an orphan."""
    return os.getppid() != _gateway_pid


def die_with_parent() -> None:
    """Runs in a child between fork and exec: the kernel kills it when the gateway dies."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if _parent_gone():
        os._exit(1)


def stop_with_parent() -> None:
    """Like die_with_parent, for `rclone serve`: SIGTERM, not SIGKILL.

    When the gateway dies, even by SIGKILL, the kernel closes its end of every
    backend connection and sends the child SIGTERM. rclone then finishes its
    handlers, and a handler whose upload was cut removes the partial object,
    before it exits. Killed outright, it would leave that object half written
    under its final name.
    """
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if _parent_gone():
        os._exit(1)


async def http_ready(socket_path: Path, timeout: float = 2.0) -> bool:
    """True when an HTTP server answers on the unix socket within `timeout` seconds.

    `OPTIONS /` costs rclone no storage access, so a miss says the process itself does
    not answer (gone, stopped, busy looping, deadlocked), not that its storage is slow.
    """
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
            writer.write(b"OPTIONS / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
            line = await reader.readline()
            return line.startswith(b"HTTP/1.")
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()


_SO_ACCEPTCON = 0x10000  # /proc/net/unix flag of a listening socket
CLOSE_WAIT = 5.0


def open_connections(proc_net_unix: str, socket_path: str) -> int:
    """Connections accepted on the unix socket `socket_path` that the server still holds."""
    count = 0
    for line in proc_net_unix.splitlines()[1:]:
        fields = line.split(None, 7)
        if (len(fields) == 8 and fields[7] == socket_path
                and not int(fields[3], 16) & _SO_ACCEPTCON):
            count += 1
    return count


async def wait_connections_closed(socket_paths: list[Path], timeout: float = CLOSE_WAIT) -> bool:
    """Waits until the servers on `socket_paths` closed every connection; False on timeout.

    Once the gateway closed its end, a server holds a connection only while its
    handler runs, for rclone: while it removes the upload that was cut. Telling
    it to stop before that would race its exit against the clean-up.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    paths = [str(p) for p in socket_paths]
    while True:
        try:
            with open("/proc/net/unix") as f:
                table = f.read()
        except OSError:
            return False
        if not any(open_connections(table, p) for p in paths):
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)


class LogFollower:
    """Relays the lines a child writes to its log file into the gateway's log.

    The child's stderr is a file, not a pipe: with the gateway gone, a Go program
    writing to a broken stderr pipe dies at once by SIGPIPE (ignoring the signal
    does not help), before it has removed an upload that was cut.
    """

    poll_interval = 0.5
    max_size = 1 << 20  # emptied once read past this; the child appends (O_APPEND)

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self._offset = 0
        self._partial = b""

    def relay(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            if line.strip():
                log.info("%s: %s", self.name, line.decode(errors="replace").rstrip())
        if self._offset > self.max_size:
            os.truncate(self.path, 0)
            self._offset = 0

    async def follow(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.poll_interval)
                self.relay()
        finally:
            self.relay()


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
        # Liveness checks in a row this child did not answer (see backends.liveness).
        self.missed_checks = 0
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self.log_path = socket_path.with_suffix(".log")
        self._log = LogFollower(name, self.log_path)
        self._log_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    @property
    def ready(self) -> bool:
        return self.state == "running"

    async def start(self) -> None:
        """Start the child and wait until it answers; raises RuntimeError if it cannot."""
        self._log_task = asyncio.create_task(self._log.follow(), name=f"log-{self.name}")
        try:
            await self._spawn()
        except BaseException:
            await self._stop_log()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")

    async def _spawn(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self.state = "starting"
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=fd,
                env=self.env,
                preexec_fn=stop_with_parent,
            )
        finally:
            os.close(fd)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                break
            if self.socket_path.exists() and await http_ready(self.socket_path):
                self.state = "running"
                self.missed_checks = 0
                log.info("backend %s started (pid %d)", self.name, self.proc.pid)
                return
            await asyncio.sleep(0.05)
        self.state = "failed"
        await self._kill()
        raise RuntimeError(f"backend {self.name} did not start")

    async def _stop_log(self) -> None:
        await cancel_and_wait(self._log_task)

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
        await cancel_and_wait(self._supervisor)
        await self._kill(grace)
        await self._stop_log()
        self.state = "stopped"
