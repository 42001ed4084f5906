"""The data path's HTTP/1.1 client against a scripted backend on a unix socket.

The backend here is a few lines of asyncio that answer with exact bytes, so that
every framing the client must handle (and every way a backend can misbehave) is
sent for real. The client against real rclone children is covered by the
end-to-end tests (tests/test_gateway.py and others).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import uvloop
from multidict import CIMultiDict

from backends.client import BROKEN_CHUNK, BodyFailed, ConnectionPool, HopFailure, NextHopError
from gateway.forwarding.proxy import NEXT_HOP_REFUSALS, refusal_response

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Backend"], Awaitable[None]]


class Backend:
    """Runs `script` for every connection; records what it received."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []

    async def head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        return head

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer, self)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def run(script: Script, client: Callable[[ConnectionPool, Backend], Awaitable[None]],
        tmp_path: Path) -> Backend:
    backend = Backend(script)
    path = str(tmp_path / "backend.sock")

    async def main() -> None:
        server = await asyncio.start_unix_server(backend.serve, path)
        pool = ConnectionPool.unix(path, connect_timeout=2.0)
        try:
            await asyncio.wait_for(client(pool, backend), 10)
        finally:
            await pool.close()
            server.close()

    uvloop.run(main())
    return backend


@contextlib.contextmanager
def fails(kind: HopFailure) -> Iterator[None]:
    """The block raises NextHopError of this kind."""
    with pytest.raises(NextHopError) as caught:
        yield
    assert caught.value.kind is kind, caught.value


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


async def answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      backend: Backend, response: bytes) -> None:
    while True:
        head = await backend.head(reader)
        if head.startswith(b"HEAD "):
            end = response.rindex(b"\r\n\r\n") + 4  # the final answer's head, no body
            writer.write(response[:end])
        else:
            writer.write(response)
        await writer.drain()


async def body_of(pool: ConnectionPool, method: str = "GET", target: str = "/x",
                  timeout: float = 5.0) -> tuple[int, bytes]:
    async with await pool.request(method, target, CIMultiDict(), timeout=timeout) as response:
        parts = [chunk async for chunk in response.iter_body(7)]
        return response.status, b"".join(parts)


async def read_to_the_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          backend: Backend) -> None:
    """A backend that reads one request's head, then all the connection brings."""
    await backend.head(reader)
    received = b""
    while chunk := await reader.read(1 << 16):
        received += chunk
    backend.bodies.append(received)


async def chunks(*parts: bytes, fail: bool = False) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)
        yield part
    if fail:
        raise ConnectionResetError("client went away")


def test_content_length_answers_reuse_one_connection(tmp_path: Path) -> None:
    async def script(reader, writer, backend):  # type: ignore[no-untyped-def]
        await answer_each(reader, writer, backend, ok(b"0123456789abcdef", b"X-A: 1\r\n"))

    async def client(pool: ConnectionPool, backend: Backend) -> None:
        for _ in range(3):
            assert await body_of(pool) == (200, b"0123456789abcdef")
        async with await pool.request("GET", "/y", CIMultiDict()) as response:
            assert response.headers["x-a"] == "1"

    backend = run(script, client, tmp_path)
    assert backend.connections == 1
    assert backend.heads[0].startswith(b"GET /x HTTP/1.1\r\nHost: backend\r\n")


def test_chunked_answer_is_decoded_and_the_connection_kept(tmp_path: Path) -> None:
    answer = (b"HTTP/1.1 207 Multi-Status\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5;ext=1\r\nhello\r\n1A\r\n" + b"z" * 26 + b"\r\n0\r\nX-Trailer: t\r\n\r\n")

    async def script(reader, writer, backend):  # type: ignore[no-untyped-def]
        await answer_each(reader, writer, backend, answer)

    async def client(pool: ConnectionPool, backend: Backend) -> None:
        assert await body_of(pool, "PROPFIND") == (207, b"hello" + b"z" * 26)
        assert await body_of(pool, "PROPFIND") == (207, b"hello" + b"z" * 26)

    assert run(script, client, tmp_path).connections == 1


def test_answer_without_length_runs_to_the_close(tmp_path: Path) -> None:
    async def script(reader, writer, backend):  # type: ignore[no-untyped-def]
        await backend.head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        await writer.drain()

    async def client(pool: ConnectionPool, backend: Backend) -> None:
        assert await body_of(pool) == (200, b"until the end")
        assert await body_of(pool) == (200, b"until the end")

    assert run(script, client, tmp_path).connections == 2


def test_head_and_interim_answers_carry_no_body(tmp_path: Path) -> None:
    async def script(reader, writer, backend):  # type: ignore[no-untyped-def]
        await answer_each(reader, writer, backend,
                          b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"body"))

    async def client(pool: ConnectionPool, backend: Backend) -> None:
        async with await pool.request("HEAD", "/x", CIMultiDict()) as response:
            assert (response.status, response.headers["Content-Length"]) == (200, "4")
            assert [c async for c in response.iter_body(1024)] == []
        # The HEAD answer's Content-Length did not make the next answer lose 4 bytes.
        assert await body_of(pool) == (200, b"body")

    assert run(script, client, tmp_path).connections == 1


def test_a_kept_connection_the_backend_closed_is_replaced(tmp_path: Path) -> None:
    async def script(reader, writer, backend):  # type: ignore[no-untyped-def]
        await backend.head(reader)
        if backend.connections == 1:
            writer.write(ok(b"once"))
            await writer.drain()
            # The connection looks reusable to the client, which sends its next request on
            # it; the backend reads that request and closes without an answer, as a server
            # closing an idle keep-alive connection at that very moment does.
            await backend.head(reader)
            return
        writer.write(ok(b"again"))
        await writer.drain()

    async def client(pool: ConnectionPool, backend: Backend) -> None:
        assert await body_of(pool) == (200, b"once")
        assert await body_of(pool) == (200, b"again")  # sent again, on a fresh connection

    backend = run(script, client, tmp_path)
    assert backend.connections == 2
    assert len(backend.heads) == 3  # the second request reached the closed connection first


def test_a_request_with_a_body_is_not_sent_again(tmp_path: Path) -> None:
    async def script(reader, writer, backend):  # type: ignore[no-untyped-def]
        await backend.head(reader)
        if backend.connections == 1:
            writer.write(ok(b"once"))
            await writer.drain()
            await backend.head(reader)
            return

    async def client(pool: ConnectionPool, backend: Backend) -> None:
        assert await body_of(pool) == (200, b"once")
        with fails(HopFailure.BROKEN):
            await pool.request("PUT", "/f", CIMultiDict(), chunks(b"data"), content_length=4)

    backend = run(script, client, tmp_path)
    assert backend.connections == 1


def test_uploads_are_framed_by_length_or_chunked(tmp_path: Path) -> None:
    async def script(reader, writer, backend):  # type: ignore[no-untyped-def]
        while True:
            head = await backend.head(reader)
            if b"Content-Length: 11" in head:
                backend.bodies.append(await reader.readexactly(11))
            else:
                assert b"Transfer-Encoding: chunked" in head
                backend.bodies.append(await reader.readuntil(b"0\r\n\r\n"))
            writer.write(ok(b""))
            await writer.drain()

    async def client(pool: ConnectionPool, backend: Backend) -> None:
        for length in (11, None):
            response = await pool.request("PUT", "/f", CIMultiDict(), chunks(b"hello", b" world"),
                                          content_length=length)
            assert response.status == 200
            await response.release()

    backend = run(script, client, tmp_path)
    assert backend.bodies == [b"hello world", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"]
    assert backend.connections == 1


def test_a_failing_body_aborts_the_upload_short(tmp_path: Path) -> None:
    async def script(reader, writer, backend):  # type: ignore[no-untyped-def]
        await backend.head(reader)
        backend.bodies.append(await reader.read(1 << 20))
        backend.bodies.append(await reader.read(1 << 20))  # b"": the connection is gone

    async def client(pool: ConnectionPool, backend: Backend) -> None:
        with pytest.raises(BodyFailed) as caught:
            await pool.request("PUT", "/f", CIMultiDict(), chunks(b"part", fail=True),
                               content_length=100)
        assert isinstance(caught.value.cause, ConnectionResetError)
        await asyncio.sleep(0.1)

    backend = run(script, client, tmp_path)
    assert b"".join(backend.bodies) == b"part"


@pytest.mark.parametrize("how", ["body fails", "request cancelled", "pool closed"])
def test_a_chunked_body_cut_short_ends_in_a_chunk_no_backend_takes_for_its_end(
        tmp_path: Path, how: str) -> None:
    """rclone takes a connection that ends between chunks for the end of the body, and
    stores an upload under 100 KiB as far as it came (even empty). However the body is cut,
    what was sent of it is followed by a line no chunk size starts with, then the end."""
    async def body() -> AsyncIterator[bytes]:
        yield b"part"
        if how == "body fails":
            raise ConnectionResetError("client went away")
        await asyncio.sleep(30)  # the client goes silent
        yield b"never"

    async def client(pool: ConnectionPool, backend: Backend) -> None:
        upload = asyncio.create_task(pool.request("POST", "/r/config", CIMultiDict(), body()))
        if how == "body fails":
            with pytest.raises(BodyFailed):
                await upload
        else:
            await asyncio.sleep(0.3)
            if how == "pool closed":
                await pool.close()
            else:
                upload.cancel()
            with pytest.raises((asyncio.CancelledError, NextHopError, BodyFailed)):
                await upload
        for _ in range(100):
            if backend.bodies:
                break
            await asyncio.sleep(0.05)

    backend = run(read_to_the_end, client, tmp_path)
    assert backend.bodies == [b"4\r\npart\r\n" + BROKEN_CHUNK]


def test_an_early_answer_is_passed_on(tmp_path: Path) -> None:
    async def script(reader, writer, backend):  # type: ignore[no-untyped-def]
        await backend.head(reader)
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n"
                     b"Connection: close\r\n\r\nno\n")
        await writer.drain()

    async def endless() -> AsyncIterator[bytes]:
        while True:
            await asyncio.sleep(0.001)
            yield b"x" * 65536

    async def client(pool: ConnectionPool, backend: Backend) -> None:
        async with await pool.request("PUT", "/f", CIMultiDict(), endless(),
                                      content_length=1 << 40) as response:
            assert response.status == 413
            assert b"".join([c async for c in response.iter_body(1024)]) == b"no\n"

    run(script, client, tmp_path)


def test_silence_and_nonsense_are_errors(tmp_path: Path) -> None:
    async def script(reader, writer, backend):  # type: ignore[no-untyped-def]
        head = await backend.head(reader)
        if b"/silent" in head:
            await asyncio.sleep(5)
        elif b"/garbage" in head:
            writer.write(b"SPDY/9 200 OK\r\n\r\n")
        elif b"/bare-lf" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nX-A: 1\nSet-Cookie: injected\r\n\r\n")
        elif b"/hex-prefix" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"0x2\r\nab\r\n0\r\n\r\n")
        elif b"/cut" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        await writer.drain()

    async def client(pool: ConnectionPool, backend: Backend) -> None:
        with fails(HopFailure.TIMED_OUT):
            await body_of(pool, target="/silent", timeout=0.2)
        with fails(HopFailure.BROKEN):
            await body_of(pool, target="/garbage")
        with fails(HopFailure.BROKEN):
            await body_of(pool, target="/bare-lf")
        with fails(HopFailure.BROKEN):
            await body_of(pool, target="/hex-prefix")
        with fails(HopFailure.BROKEN):
            await body_of(pool, target="/cut")

    run(script, client, tmp_path)


def test_no_backend_is_a_connect_failure(tmp_path: Path) -> None:
    async def main() -> None:
        pool = ConnectionPool.unix(str(tmp_path / "missing.sock"))
        with fails(HopFailure.UNREACHABLE):
            await pool.request("GET", "/", CIMultiDict())

    uvloop.run(main())


def test_closing_the_pool_cuts_an_upload_in_flight(tmp_path: Path) -> None:
    async def slow() -> AsyncIterator[bytes]:
        for _ in range(100):
            await asyncio.sleep(0.01)
            yield b"y" * 10

    async def client(pool: ConnectionPool, backend: Backend) -> None:
        upload = asyncio.create_task(
            pool.request("PUT", "/f", CIMultiDict(), slow(), content_length=1000))
        await asyncio.sleep(0.2)
        await pool.close()
        with pytest.raises((NextHopError, BodyFailed)) as caught:
            await upload
        assert (isinstance(caught.value, BodyFailed)
                or caught.value.kind is HopFailure.BROKEN), caught.value
        await asyncio.sleep(0.05)

    backend = run(read_to_the_end, client, tmp_path)
    assert 0 < len(backend.bodies[0]) < 1000


async def slowly(pieces: int, every: float) -> AsyncIterator[bytes]:
    for _ in range(pieces):
        await asyncio.sleep(every)
        yield b"x" * 1000


def test_the_answer_wait_starts_once_the_body_is_sent(tmp_path: Path) -> None:
    """Spec section 7: while the body still flows, the backend owes no answer; once the
    whole request is sent, it has `timeout` seconds to answer; a backend that stops
    taking the body has as long to take more."""
    async def script(reader, writer, backend):  # type: ignore[no-untyped-def]
        head = await backend.head(reader)
        if b"/stalls" in head:
            await asyncio.sleep(5)  # reads nothing: the client's writes wait to drain
            return
        backend.bodies.append(await reader.readexactly(10_000))
        if b"/answers" in head:
            await asyncio.sleep(0.1)
            writer.write(ok(b"stored"))
            await writer.drain()
        await asyncio.sleep(5)

    async def endless() -> AsyncIterator[bytes]:
        while True:
            await asyncio.sleep(0)
            yield b"x" * 65536

    async def client(pool: ConnectionPool, backend: Backend) -> None:
        loop = asyncio.get_running_loop()
        # the body takes 1 s, five times the timeout: not a timeout, the answer comes
        async with await pool.request("PUT", "/answers", CIMultiDict(), slowly(10, 0.1),
                                      content_length=10_000, timeout=0.2) as response:
            assert response.status == 200
        # the whole body sent, then silence: a timeout, counted from the body's end
        began = loop.time()
        with fails(HopFailure.TIMED_OUT):
            await pool.request("PUT", "/silent", CIMultiDict(), slowly(10, 0.1),
                               content_length=10_000, timeout=0.2)
        assert 1.15 <= loop.time() - began < 3, loop.time() - began
        # a backend that takes none of the body: a timeout too
        began = loop.time()
        with fails(HopFailure.TIMED_OUT):
            await pool.request("PUT", "/stalls", CIMultiDict(), endless(),
                               content_length=1 << 40, timeout=0.2)
        assert loop.time() - began < 3, loop.time() - began

    backend = run(script, client, tmp_path)
    assert backend.bodies[0] == b"x" * 10_000


def test_each_failure_of_the_next_hop_gets_its_answer(tmp_path: Path) -> None:
    """What the client is answered when the backend fails the exchange each way: a
    missing socket 502, silence 504, nonsense 502 (`proxy.NEXT_HOP_REFUSALS`)."""
    async def script(reader, writer, backend):  # type: ignore[no-untyped-def]
        head = await backend.head(reader)
        if b"/silent" in head:
            await asyncio.sleep(5)
        else:
            writer.write(b"SPDY/9 200 OK\r\n\r\n")
        await writer.drain()

    failures: list[HopFailure] = []

    async def failure(request: Awaitable[object]) -> None:
        with pytest.raises(NextHopError) as caught:
            await request
        failures.append(caught.value.kind)

    async def client(pool: ConnectionPool, backend: Backend) -> None:
        missing = ConnectionPool.unix(str(tmp_path / "missing.sock"))
        await failure(missing.request("GET", "/", CIMultiDict()))
        await failure(body_of(pool, target="/silent", timeout=0.2))
        await failure(body_of(pool, target="/garbage"))

    run(script, client, tmp_path)
    answers = [refusal_response(NEXT_HOP_REFUSALS[kind].given()) for kind in failures]
    assert [(a.status, a.text, a.headers["Retry-After"]) for a in answers] == [
        (502, "backend unavailable\n", "2"),
        (504, "backend did not answer in time\n", "2"),
        (502, "backend error\n", "2"),
    ]
