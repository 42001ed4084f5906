from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest
import uvloop
from aiohttp import web
from harness import wait_until

from gateway.edge.admission import GuardedProtocolFactory, guarded_protocol_factory

DOWNLOAD_CHUNK = 64 * 1024
DOWNLOAD_CHUNKS = 10
DOWNLOAD_PAUSE = 0.15
FINISH_LATE = 0.5
SOON = 3.0  # seconds: a connection the gateway holds or ends, counted


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    if request.path == "/upload":
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        return web.Response(text=f"{total}\n")
    if request.path == "/finish-late":
        # The answer is complete on the wire while the handler still runs: the client's
        # next request head arrives before aiohttp waits for one again.
        response = web.StreamResponse(headers={"Content-Length": "3"})
        await response.prepare(request)
        await response.write(b"ok\n")
        await asyncio.sleep(FINISH_LATE)
        return response
    if request.path == "/download":
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(DOWNLOAD_CHUNKS):
            await response.write(b"x" * DOWNLOAD_CHUNK)
            await asyncio.sleep(DOWNLOAD_PAUSE)
        await response.write_eof()
        return response
    return web.Response(text="ok\n")


class CountingServer(web.Server):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.handlers_created = 0

    def __call__(self) -> web.RequestHandler:
        self.handlers_created += 1
        return super().__call__()


class Gateway:
    """A low-level aiohttp server behind the guard, on its own loop in a thread."""

    def __init__(self, loop_kind: str, *, max_connections: int, header_timeout: float) -> None:
        self.loop_kind = loop_kind
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.port = 0
        self.server: CountingServer | None = None
        self.factory: GuardedProtocolFactory | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: asyncio.Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Gateway:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def count(self) -> int:
        assert self.factory is not None
        return self.factory.count

    def _run(self) -> None:
        loop = uvloop.new_event_loop() if self.loop_kind == "uvloop" else asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown())
            loop.close()

    async def _start(self) -> None:
        self.server = CountingServer(handle, access_log=None)
        self.factory = guarded_protocol_factory(
            self.server, max_connections=self.max_connections, header_timeout=self.header_timeout
        )
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(self.factory, "127.0.0.1", 0)
        self.port = self._listener.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        assert self._listener is not None and self.server is not None
        self._listener.close()
        await self.server.shutdown(1.0)


StartGateway = Callable[..., Gateway]


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def start_gateway(loop_kind: str) -> Iterator[StartGateway]:
    started: list[Gateway] = []

    def start(*, max_connections: int = 2048, header_timeout: float = 5.0) -> Gateway:
        gateway = Gateway(loop_kind, max_connections=max_connections,
                          header_timeout=header_timeout).start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


uvloop_only = pytest.mark.parametrize("loop_kind", ["uvloop"])

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(gateway: Gateway) -> Connection:
    return await asyncio.open_connection("127.0.0.1", gateway.port)


def request_bytes(path: str = "/", *, body_length: int | None = None) -> bytes:
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\n"
    if body_length is not None:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {body_length}\r\n"
    return (head + "\r\n").encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head[:-4].split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        body = b"".join(parts)
    else:
        body = await reader.read()
    return int(status_line.split()[1]), headers, body


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b"<reset>"


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def run(scenario: Awaitable[None]) -> None:
    asyncio.run(scenario)  # type: ignore[arg-type]


def test_connection_cap_answers_503_without_a_request_handler(start_gateway: StartGateway) -> None:
    gateway = start_gateway(max_connections=3)

    async def scenario() -> None:
        admitted = [await connect(gateway) for _ in range(3)]
        await wait_until(lambda: gateway.count == 3, "3 connections open", SOON)

        reader, writer = await connect(gateway)
        writer.write(request_bytes())
        status, headers, body = await read_response(reader)
        assert status == 503
        assert headers["retry-after"] == "1"
        assert headers["connection"] == "close"
        assert headers["content-type"] == "text/plain"
        assert body == b"too many connections\n"
        assert await read_until_closed(reader, 3.0) == b""
        await close(writer)

        assert gateway.server is not None and gateway.factory is not None
        assert gateway.server.handlers_created == 3
        assert gateway.factory.rejected == 1
        assert gateway.count == 3

        # the admitted connections are fully functional
        for reader, writer in admitted:
            writer.write(request_bytes())
            assert (await read_response(reader))[0] == 200
        for _, writer in admitted:
            await close(writer)
        await wait_until(lambda: gateway.count == 0, "no connection open", SOON)

        # room again once they are gone
        reader, writer = await connect(gateway)
        writer.write(request_bytes())
        assert (await read_response(reader))[0] == 200
        await close(writer)
        await wait_until(lambda: gateway.count == 0, "no connection open", SOON)
        assert gateway.server.handlers_created == 4

    run(scenario())


@pytest.mark.serial  # the cut comes between 0.4 and 3 s after a 0.5 s timeout
def test_incomplete_headers_are_cut_after_header_timeout(start_gateway: StartGateway) -> None:
    gateway = start_gateway(header_timeout=0.5)

    async def partial_headers() -> tuple[float, bytes]:
        started = time.monotonic()
        reader, writer = await connect(gateway)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        received = await read_until_closed(reader, 3.0)
        await close(writer)
        return time.monotonic() - started, received

    async def silent() -> tuple[float, bytes]:
        started = time.monotonic()
        reader, writer = await connect(gateway)
        received = await read_until_closed(reader, 3.0)
        await close(writer)
        return time.monotonic() - started, received

    async def scenario() -> None:
        (partial_elapsed, partial_received), (silent_elapsed, silent_received) = (
            await asyncio.gather(partial_headers(), silent())
        )
        assert 0.4 < partial_elapsed < 3.0
        assert partial_received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert b"\r\nConnection: close\r\n" in partial_received
        assert 0.4 < silent_elapsed < 3.0
        assert silent_received == b""
        await wait_until(lambda: gateway.count == 0, "no connection open", SOON)
        assert gateway.factory is not None and gateway.factory.timed_out == 2

    run(scenario())


@uvloop_only
def test_slow_upload_after_timely_headers_is_not_cut(start_gateway: StartGateway) -> None:
    gateway = start_gateway(header_timeout=0.5)
    pieces, piece = 20, b"u" * 1000

    async def scenario() -> None:
        reader, writer = await connect(gateway)
        writer.write(request_bytes("/upload", body_length=pieces * len(piece)))
        started = time.monotonic()
        for _ in range(pieces):
            await asyncio.sleep(0.1)
            writer.write(piece)
            await writer.drain()
        assert time.monotonic() - started > 1.9
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"%d\n" % (pieces * len(piece)))
        # and a large, fast upload streams through the wrapper as well
        size = 32 * 1024 * 1024
        writer.write(request_bytes("/upload", body_length=size))
        block = b"b" * (1024 * 1024)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"%d\n" % size)
        await close(writer)

    run(scenario())


@uvloop_only
def test_slow_download_is_not_cut(start_gateway: StartGateway) -> None:
    gateway = start_gateway(header_timeout=0.5)

    async def scenario() -> None:
        reader, writer = await connect(gateway)
        started = time.monotonic()
        writer.write(request_bytes("/download"))
        status, _, body = await read_response(reader)
        assert status == 200
        assert len(body) == DOWNLOAD_CHUNK * DOWNLOAD_CHUNKS
        assert time.monotonic() - started > 1.0
        await close(writer)

    run(scenario())


def test_keep_alive_serves_requests_then_closes_when_idle(start_gateway: StartGateway) -> None:
    # The client runs in this process beside the server's thread: margins are wide so that
    # a loaded machine's scheduling cannot turn them into a failure.
    timeout = 1.0
    gateway = start_gateway(header_timeout=timeout)

    async def scenario() -> None:
        reader, writer = await connect(gateway)
        # several requests on one connection, together longer than the timeout
        for _ in range(4):
            writer.write(request_bytes())
            assert (await read_response(reader))[0] == 200
            await asyncio.sleep(timeout * 0.3)
        writer.write(request_bytes())
        assert (await read_response(reader))[0] == 200
        idle_since = time.monotonic()
        assert await read_until_closed(reader, 10.0) == b""
        assert 0.8 * timeout < time.monotonic() - idle_since < 10.0
        await close(writer)

        # a keep-alive connection whose next request head stalls gets the 408, also when
        # the stalled head arrives before aiohttp waits for it (a handler still finishing)
        for first in ("/", "/finish-late"):
            reader, writer = await connect(gateway)
            writer.write(request_bytes(first))
            assert (await read_response(reader))[0] == 200
            stalled_since = time.monotonic()
            writer.write(b"GET /second HTTP/1.1\r\nHo")
            received = await read_until_closed(reader, 10.0)
            assert received.startswith(b"HTTP/1.1 408 "), (first, received)
            assert 0.8 * timeout < time.monotonic() - stalled_since < 10.0
            await close(writer)

        # pipelined requests pass through the wrapper untouched
        reader, writer = await connect(gateway)
        writer.write(request_bytes() + request_bytes("/upload", body_length=3) + b"abc")
        for expected in (b"ok\n", b"3\n"):
            status, _, body = await read_response(reader)
            assert (status, body) == (200, expected)
        await close(writer)
        await wait_until(lambda: gateway.count == 0, "no connection open", SOON)

    run(scenario())


@pytest.mark.serial  # latencies under 3 s while dribblers are held
@uvloop_only
def test_header_dribblers_do_not_delay_legitimate_requests(start_gateway: StartGateway) -> None:
    # The dribblers and the measured client share this process with the server's thread:
    # the bound on a legitimate request's latency is far below the header timeout (what a
    # request stuck behind the dribblers would wait), not a measure of speed.
    gateway = start_gateway(header_timeout=10.0)
    dribblers = 200

    async def dribble(stop: asyncio.Event) -> None:
        _, writer = await connect(gateway)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        try:
            while not stop.is_set():
                writer.write(b"a")
                await asyncio.sleep(0.1)
        finally:
            writer.close()

    async def legitimate() -> float:
        started = time.monotonic()
        reader, writer = await connect(gateway)
        writer.write(request_bytes())
        status, _, body = await read_response(reader)
        elapsed = time.monotonic() - started
        assert (status, body) == (200, b"ok\n")
        await close(writer)
        return elapsed

    async def scenario() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(dribble(stop)) for _ in range(dribblers)]
        await wait_until(lambda: gateway.count >= dribblers, "the dribblers connected", 5.0)
        latencies = []
        for _ in range(8):
            latencies.append(await legitimate())
            await asyncio.sleep(0.1)
        assert gateway.count >= dribblers  # all of them still there, none timed out
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert max(latencies) < 3.0, latencies
        await wait_until(lambda: gateway.count == 0, "no connection open", SOON)
        assert gateway.factory is not None and gateway.factory.timed_out == 0

    run(scenario())


def test_factory_validates_arguments() -> None:
    async def scenario() -> None:
        server = web.Server(handle)
        with pytest.raises(ValueError):
            guarded_protocol_factory(server, max_connections=0)
        with pytest.raises(ValueError):
            guarded_protocol_factory(server, header_timeout=0)
        factory = guarded_protocol_factory(server)
        assert (factory.max_connections, factory.header_timeout, factory.count) == (2048, 5.0, 0)

    run(scenario())
