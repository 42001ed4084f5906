"""A fault-injecting TCP proxy of the suite's own, between the gateway's rclone children and
the remote storage they reach (an `rclone serve s3` or `sftp` of a local directory).

It runs an asyncio loop in a thread of the test process and can be switched at run time:

- `latency`: seconds each piece of data from the client reaches the server late (a
  delay, not a rate: an upload streams at full speed, each request waits once);
- `bandwidth`: bytes per second in each direction, all connections together;
- `reset()`: closes the connections open now with a TCP reset; `refuse = True` resets
  every new one as soon as it is accepted;
- `blackhole = True`: forwards nothing in either direction on the open connections and
  stops accepting new ones, so a connect times out once the listen backlog is full (a
  lost route, not a refusal).

It counts connections and, for plain-HTTP targets, requests (request heads parsed as
they pass client to server, bodies skipped by their framing): `requests` lists
(time.monotonic(), method, target) of each.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from netns import inside

CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class SeenRequest:
    at: float  # time.monotonic()
    method: str
    target: str


class HttpRequestCounter:
    """Finds the request heads in a client's byte stream: one HTTP/1.1 request after
    another, each body skipped by its Content-Length or chunked framing."""

    def __init__(self, on_request: Callable[[str, str], None]) -> None:
        self.on_request = on_request
        self.buffer = b""
        self.body_left = 0  # bytes of a Content-Length body still to skip
        self.chunked = False
        self.chunk_left = 0  # bytes of the current chunk (and its CRLF) still to skip
        self.trailers = False
        self.broken = False  # not HTTP after all: stop looking

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        self.buffer += data
        while self._step():
            pass

    def _step(self) -> bool:
        if self.body_left:
            taken = min(self.body_left, len(self.buffer))
            self.buffer = self.buffer[taken:]
            self.body_left -= taken
            return bool(self.buffer) and not self.body_left
        if self.chunked:
            return self._chunk_step()
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            self.broken = len(self.buffer) > 1 << 20
            return False
        head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self.broken = True
            return False
        self.on_request(parts[0], parts[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.chunked, self.trailers = True, False
        else:
            self.body_left = int(headers.get("content-length", "0") or 0)
        return bool(self.buffer)

    def _chunk_step(self) -> bool:
        if self.chunk_left:
            taken = min(self.chunk_left, len(self.buffer))
            self.buffer = self.buffer[taken:]
            self.chunk_left -= taken
            return bool(self.buffer) and not self.chunk_left
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return False
        line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
        if self.trailers:
            if not line:  # the empty line after the last chunk's trailers
                self.chunked = False
            return True
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            self.trailers = True
        else:
            self.chunk_left = size + 2
        return True


class TokenBucket:
    """A rate shared by every connection in one direction; None: no limit."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self._next_free = 0.0

    async def take(self, size: int) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        start = max(now, self._next_free)
        self._next_free = start + size / self.rate
        if self._next_free > now:
            await asyncio.sleep(self._next_free - now)


class FaultProxy:
    """Listens on `listen_host` (a free port unless `port`), forwards to `target`."""

    def __init__(self, target: tuple[str, int], *, listen_host: str = "127.0.0.1",
                 port: int = 0, netns: str | None = None, count_http: bool = True) -> None:
        self.target = target
        self.netns = netns  # where it listens and connects from (None: the test's own)
        self.count_http = count_http
        self.latency = 0.0
        self.refuse = False
        self.connections = 0  # accepted, since start
        self.requests: list[SeenRequest] = []
        self._blackhole = False
        self._up, self._down = TokenBucket(), TokenBucket()
        self._open: dict[asyncio.Task[None], tuple[socket.socket, ...]] = {}
        self._unfrozen: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        with inside(netns):
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((listen_host, port))
        self._listener.listen(1)  # small: a blackhole fills it at once
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"faultproxy-{self.port}")
        self._thread.start()
        self._accepting = asyncio.run_coroutine_threadsafe(self._accept_loop(), self._loop)

    # --- switches (from the test's thread) ----------------------------------------------

    @property
    def bandwidth(self) -> float | None:
        return self._up.rate

    @bandwidth.setter
    def bandwidth(self, rate: float | None) -> None:
        self._up.rate = self._down.rate = rate

    @property
    def blackhole(self) -> bool:
        return self._blackhole

    @blackhole.setter
    def blackhole(self, on: bool) -> None:
        self._call(self._set_blackhole, on)

    def reset(self) -> int:
        """Resets every open connection; returns how many."""
        return self._call(self._reset_open)

    def request_count(self, since: float = 0.0) -> int:
        return sum(1 for r in list(self.requests) if r.at >= since)

    @contextlib.contextmanager
    def blackholed(self) -> Iterator[None]:
        self.blackhole = True
        try:
            yield
        finally:
            self.blackhole = False

    def close(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _call(self, function: Callable[..., object], *args: object) -> Any:
        async def run() -> object:
            return function(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    # --- inside the loop -----------------------------------------------------------------

    def _set_blackhole(self, on: bool) -> None:
        if self._unfrozen is None:
            self._unfrozen = asyncio.Event()
            self._unfrozen.set()
        self._blackhole = on
        if on:
            self._unfrozen.clear()
        else:
            self._unfrozen.set()

    def _reset_open(self) -> int:
        count = len(self._open)
        for task, sockets in list(self._open.items()):
            for sock in sockets:
                _arm_reset(sock)  # the task's clean-up closes them: with RST
            task.cancel()
        return count

    async def _shutdown(self) -> None:
        self._reset_open()
        others = [t for t in asyncio.all_tasks(self._loop) if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        self._listener.close()

    async def _accept_loop(self) -> None:
        if self._unfrozen is None:
            self._unfrozen = asyncio.Event()
            self._unfrozen.set()
        while True:
            await self._unfrozen.wait()
            client, _ = await self._loop.sock_accept(self._listener)
            self.connections += 1
            if self.refuse:
                _reset(client)
                continue
            client.setblocking(False)
            with inside(self.netns):
                server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            server.setblocking(False)
            task = asyncio.ensure_future(self._serve(client, server), loop=self._loop)
            self._open[task] = (client, server)
            task.add_done_callback(lambda done: self._open.pop(done, None))

    async def _serve(self, client: socket.socket, server: socket.socket) -> None:
        try:
            try:
                await asyncio.wait_for(self._loop.sock_connect(server, self.target), 10)
            except (OSError, TimeoutError):
                _reset(client)
                return
            counter = (HttpRequestCounter(self._saw_request) if self.count_http else None)
            await asyncio.gather(
                self._pump(client, server, self._up, counter, delayed=True),
                self._pump(server, client, self._down, None, delayed=False),
                return_exceptions=True)
        finally:
            client.close()
            server.close()

    def _saw_request(self, method: str, target: str) -> None:
        self.requests.append(SeenRequest(time.monotonic(), method, target))

    async def _pump(self, source: socket.socket, sink: socket.socket, bucket: TokenBucket,
                    counter: HttpRequestCounter | None, *, delayed: bool) -> None:
        # Pieces are read at once and written each at its due time: a delay, not a rate.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def write() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                assert self._unfrozen is not None
                await self._unfrozen.wait()
                await bucket.take(len(data))
                await self._loop.sock_sendall(sink, data)

        writer = asyncio.ensure_future(write(), loop=self._loop)
        try:
            while True:
                data = await self._loop.sock_recv(source, CHUNK)
                assert self._unfrozen is not None
                await self._unfrozen.wait()
                if counter is not None and data:
                    counter.feed(data)
                queue.put_nowait((time.monotonic() + (self.latency if delayed else 0.0), data))
                if not data:
                    break
            await writer
        except OSError:
            _arm_reset(sink)
            raise
        finally:
            writer.cancel()


def _arm_reset(sock: socket.socket) -> None:
    """Its close will send RST, not FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _reset(sock: socket.socket) -> None:
    _arm_reset(sock)
    sock.close()
