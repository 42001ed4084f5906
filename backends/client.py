"""The data path's HTTP/1.1 client: keep-alive connections to a backend, bodies streamed.

Every proxied request and its answer go through here; aiohttp's client stays for the
gateway's own small requests (existence checks, probes). aiohttp's general client took
about a third of the gateway's CPU per proxied request: this one does only what a proxy
to a known backend needs. One request at a time per connection, idle connections reused
last-in first-out, the request body sent while the answer is awaited (a backend may
answer before reading it all), backpressure both ways, and a timeout on every wait for
the backend's next move: to take more of the body, or, once the whole request is sent,
to answer (spec section 7: while the body still flows, the backend is not idle).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from enum import Enum
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from backends import splice

MAX_HEAD = 64 * 1024
# Read from the backend ahead of the client: enough to keep a transfer flowing.
READ_HIGH_WATER = 1024 * 1024
NO_BODY_STATUSES = frozenset({204, 304})
RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PROPFIND", "DELETE"})
# A first body chunk up to this size goes out in one write with the request head.
COALESCE = 64 * 1024
HEAD_ALONE_AFTER = 1.0  # seconds a request head waits for the body's first piece
# What ends a chunked body that failed: no chunk size starts with it. rclone takes a
# connection that ends between chunks for the end of the body, and stores an upload under
# its streaming cutoff (100 KiB) as far as it came, even empty; a line it cannot parse
# fails the upload instead.
BROKEN_CHUNK = b"x\r\n"
BROKEN_CHUNK_GRACE = 5.0  # seconds for it to leave before the connection is cut anyway
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r\n\Z")

Connector = Callable[[Callable[[], asyncio.Protocol]], Awaitable[tuple[Any, Any]]]


class HopFailure(Enum):
    """How the next hop (a backend child, or a peer gateway) failed an exchange."""

    UNREACHABLE = "unreachable"  # no connection: refused, missing socket, connect timeout
    TIMED_OUT = "timed out"  # silent (or took no data) for the idle timeout
    BROKEN = "broken"  # closed the connection, or answered malformed
    # answered a status its caller asked not to pass on (the gateway's proxy asks it of a
    # peer gateway, to try the next); nothing was sent to the client
    DECLINED = "declined"


class NextHopError(Exception):
    """The next hop failed the exchange: `kind` says how. What the client is answered
    then is the gateway's matter (`gateway.forwarding.proxy.NEXT_HOP_REFUSALS`)."""

    def __init__(self, kind: HopFailure, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status  # DECLINED: the status it answered


def _unreachable(message: str) -> NextHopError:
    return NextHopError(HopFailure.UNREACHABLE, message)


def _timed_out(message: str) -> NextHopError:
    return NextHopError(HopFailure.TIMED_OUT, message)


def _broken(message: str) -> NextHopError:
    return NextHopError(HopFailure.BROKEN, message)


class BodyFailed(Exception):
    """Reading the request body failed (the client went away, or a body filter refused it);
    the backend's connection was aborted so that it keeps nothing of the upload."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.cause = cause


class SocketBody(abc.ABC):
    """A request body that moves from its socket into the backend's by itself
    (`backends.splice`), once its part read already went out with the head."""

    @abc.abstractmethod
    async def begin(self) -> bytes:
        """Takes the body over, once a connection is there to send it on: the part that
        was read already."""

    @abc.abstractmethod
    def finish(self) -> None:
        """The sending ended, whichever way and wherever it was: the body's socket goes
        back to its reader."""

    @abc.abstractmethod
    async def move_to(self, fd: int, idle: float, stalled: splice.Stalled) -> None:
        """Moves the rest into the socket `fd`, which may take no data for `idle` seconds
        before `stalled()` is raised."""


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.closed = False
        self.eof = False
        self.idle_since = 0.0
        # The request body is still being sent: the backend owes no answer yet, so reads
        # wait without a timer (the sender's own waits for the backend to take data have
        # one).
        self.sending = False
        # A chunked request body has begun and not ended: cutting the connection now must
        # leave it broken (`BROKEN_CHUNK`), not merely short.
        self.chunked_body_open = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused = False

    # --- protocol callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > READ_HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.eof = True
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(_broken("backend closed the connection"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- waiting ---------------------------------------------------------------------

    async def _wait(self, future: asyncio.Future[None], timeout: float | None) -> None:
        if timeout is None:
            await future
            return
        loop = asyncio.get_running_loop()
        handle = loop.call_later(timeout, _expire, future)
        try:
            await future
        finally:
            handle.cancel()

    async def _more(self, timeout: float) -> None:
        if self.eof:
            raise _broken("backend closed the connection")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._wait(self._waiter, None if self.sending else timeout)
        finally:
            self._waiter = None

    def body_sent(self) -> None:
        """The request is out (or its sending ended): from now on the backend owes the
        answer, and a read waiting for it gets its timer."""
        self.sending = False
        self._wake()

    async def write(self, data: bytes, timeout: float) -> None:
        if self.closed or self.transport is None:
            raise _broken("backend closed the connection")
        self.transport.write(data)
        if self._writing_paused:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._wait(self._drain, timeout)
            finally:
                self._drain = None

    # --- reading ---------------------------------------------------------------------

    def _take(self, limit: int) -> bytes:
        chunk = self.chunks.popleft()
        if len(chunk) > limit:
            self.chunks.appendleft(chunk[limit:])
            chunk = chunk[:limit]
        self.buffered -= len(chunk)
        if self._reading_paused and self.buffered <= READ_HIGH_WATER // 4 and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        return chunk

    def take_buffered(self, limit: int) -> bytes:
        """What is buffered already, `limit` bytes at most, without waiting."""
        taken = []
        while self.chunks and limit:
            chunk = self._take(limit)
            limit -= len(chunk)
            taken.append(chunk)
        return b"".join(taken)

    async def flushed(self, timeout: float) -> int:
        """The socket, once the transport wrote all it buffered: to be written to directly."""
        transport = self.transport
        fd = splice.socket_fd(transport)
        if self.closed or transport is None or fd is None:
            raise _broken("backend closed the connection")
        try:
            await splice.flushed(transport, timeout,
                                 lambda: _timed_out("backend took no data in time"))
        except splice.DestinationGone:
            raise _broken("backend closed the connection") from None
        return fd

    async def read_until(self, marker: bytes, limit: int, timeout: float) -> bytes:
        """Bytes up to and including `marker`, which must come within `limit` bytes."""
        while True:
            if self.chunks:
                if len(self.chunks) > 1:
                    joined = b"".join(self.chunks)
                    self.chunks.clear()
                    self.chunks.append(joined)
                data = self.chunks[0]
                end = data.find(marker)
                if end >= 0:
                    return self._take(end + len(marker))
                if len(data) > limit:
                    raise _broken("backend answer head too large")
            await self._more(timeout)

    async def read_some(self, limit: int, timeout: float) -> bytes:
        """Up to `limit` bytes as they come; b"" at the end of the connection."""
        while not self.chunks:
            if self.eof:
                return b""
            await self._more(timeout)
        return self._take(limit)

    async def read_sized(self, size: int, limit: int, timeout: float) -> AsyncIterator[bytes]:
        """Exactly `size` bytes, in pieces of up to `limit` as they come."""
        while size:
            chunk = await self.read_some(min(size, limit), timeout)
            if not chunk:
                raise _broken("backend closed the connection mid-answer")
            size -= len(chunk)
            yield chunk

    def abort(self) -> None:
        """Cuts the connection: the backend drops the request it was receiving. A chunked
        body under way is first ended as broken (`BROKEN_CHUNK`), after what was written."""
        self.closed = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self.chunked_body_open:
            transport.abort()
            return
        self.chunked_body_open = False
        transport.write(BROKEN_CHUNK)
        transport.close()  # once what is buffered is out
        asyncio.get_running_loop().call_later(BROKEN_CHUNK_GRACE, transport.abort)


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(_timed_out("backend did not answer in time"))


class Response:
    """A backend's answer: status and headers read, the body still on the connection."""

    def __init__(self, pool: ConnectionPool, connection: _Connection, status: int, reason: str,
                 headers: CIMultiDict[str], framing: str, length: int, keep_alive: bool,
                 timeout: float, sender: asyncio.Task[None] | None) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self.status = status
        self.reason = reason
        self.headers = CIMultiDictProxy(headers)
        self._framing = framing  # "none", "length", "chunked" or "close"
        self._length = length
        self._keep_alive = keep_alive
        self._timeout = timeout
        self._sender = sender

    async def iter_body(self, chunk_size: int) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            return
        timeout = self._timeout
        if self._framing == "length":
            async for chunk in connection.read_sized(self._length, chunk_size, timeout):
                yield chunk
        elif self._framing == "chunked":
            async for chunk in self._chunked(connection, chunk_size):
                yield chunk
        elif self._framing == "close":
            while chunk := await connection.read_some(chunk_size, timeout):
                yield chunk
        self._framing = "done"

    @property
    def body_left(self) -> int | None:
        """Bytes of a body of known length still to come; None for any other."""
        return self._length if self._framing == "length" and self._connection else None

    def begin_splice(self) -> bytes:
        """Stops reading a body of known length into the process, for `splice_body` to
        move the rest: returns the part that came already (with the head)."""
        connection, transport = self._spliceable()
        first = connection.take_buffered(self._length)
        self._length -= len(first)
        transport.pause_reading()  # the pump reads the socket from now on
        return first

    def _spliceable(self) -> tuple[_Connection, asyncio.Transport]:
        connection = self._connection
        if self._framing != "length" or connection is None or connection.transport is None:
            raise RuntimeError("no body of known length to splice")
        return connection, connection.transport

    async def splice_body(self, fd: int, *, pace: splice.Pace | None = None,
                          moved: Callable[[int], None] | None = None) -> None:
        """Moves the rest of a body of known length into the socket `fd`, in the kernel
        (`backends.splice`), after `begin_splice`; `moved(n)`: n more bytes are in it. A
        socket `fd` that goes away raises splice.DestinationGone; its reader's pace is its
        own (no timeout)."""
        connection, transport = self._spliceable()
        if not self._length:  # all of it came with the head
            transport.resume_reading()
            self._framing = "done"
            return
        source = splice.socket_fd(transport)
        if source is None or connection.chunks:
            raise _broken("backend closed the connection")

        def left(n: int) -> None:
            self._length -= n

        try:
            await splice.pump(
                source, fd, self._length,
                source_idle=self._timeout,
                source_stalled=lambda: _timed_out("backend did not answer in time"),
                destination_idle=None,
                pace=pace, taken=left, moved=moved,
            )
        except splice.SourceEnded:
            raise _broken("backend closed the connection mid-answer") from None
        if not connection.closed:
            transport.resume_reading()
        self._framing = "done"

    async def _chunked(self, connection: _Connection, chunk_size: int) -> AsyncIterator[bytes]:
        timeout = self._timeout
        while True:
            line = await connection.read_until(b"\r\n", 1024, timeout)
            match = _CHUNK_SIZE.match(line)
            if match is None:  # int(x, 16) alone would take "0x1a", "+1a" or "1_a"
                raise _broken("malformed chunk in backend answer")
            size = int(match.group(1), 16)
            if size == 0:
                while await connection.read_until(b"\r\n", MAX_HEAD, timeout) != b"\r\n":
                    pass  # trailer fields: not passed on
                return
            async for chunk in connection.read_sized(size, chunk_size, timeout):
                yield chunk
            crlf = b"".join([c async for c in connection.read_sized(2, 2, timeout)])
            if crlf != b"\r\n":
                raise _broken("malformed chunk in backend answer")

    async def release(self) -> None:
        """Done with the answer: the connection goes back to the pool if it is reusable."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        sender = self._sender
        reusable = self._keep_alive and self._framing in ("none", "done")
        if sender is not None:
            if not sender.done():
                reusable = False
                sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            reusable = reusable and not sender.cancelled() and sender.exception() is None
        self._pool.release(connection, reusable)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class ConnectionPool:
    """Keep-alive connections to one backend address."""

    def __init__(self, connector: Connector, *, host: str = "backend",
                 connect_timeout: float = 5.0, keepalive: float = 30.0) -> None:
        self._connector = connector
        self._host = host
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self.closed = False

    @property
    def host(self) -> str:
        """The `Host` sent with every request: the authority the backend sees itself under."""
        return self._host

    @classmethod
    def unix(cls, path: str, **kwargs: Any) -> ConnectionPool:
        async def connect(factory: Callable[[], asyncio.Protocol]) -> tuple[Any, Any]:
            return await asyncio.get_running_loop().create_unix_connection(factory, path)

        return cls(connect, **kwargs)

    @classmethod
    def tcp(cls, host: str, port: int, local_address: str | None = None,
            **kwargs: Any) -> ConnectionPool:
        local = (local_address, 0) if local_address else None

        async def connect(factory: Callable[[], asyncio.Protocol]) -> tuple[Any, Any]:
            return await asyncio.get_running_loop().create_connection(
                factory, host, port, local_addr=local)

        name = f"[{host}]" if ":" in host else host
        return cls(connect, host=f"{name}:{port}", **kwargs)

    async def _acquire(self) -> tuple[_Connection, bool]:
        """A connection, and whether it was used before (it may have been closed since)."""
        if self.closed:
            raise _unreachable("backend pool closed")
        now = asyncio.get_running_loop().time()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and not connection.eof and not connection.chunks and (
                now - connection.idle_since < self._keepalive
            ):
                return connection, True
            self._discard(connection)
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await self._connector(_Connection)
        except TimeoutError:
            raise _unreachable("backend did not accept the connection in time") from None
        except OSError as exc:
            raise _unreachable(f"backend unreachable ({type(exc).__name__})") from None
        if self.closed:
            connection.abort()
            raise _unreachable("backend pool closed")
        self._all.add(connection)
        return connection, False

    @property
    def busy(self) -> int:
        """Connections carrying a request now."""
        return len(self._all) - len(self._idle)

    def release(self, connection: _Connection, reusable: bool) -> None:
        if reusable and not self.closed and not connection.closed and not connection.eof:
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.append(connection)
        else:
            self._discard(connection)

    def _discard(self, connection: _Connection) -> None:
        # Aborted, not closed: a backend drops an upload whose connection breaks short.
        self._all.discard(connection)
        connection.abort()

    async def close(self) -> None:
        """Closes every connection, in use or idle: a backend drops what it was receiving."""
        self.closed = True
        self._idle.clear()
        for connection in list(self._all):
            connection.abort()
        self._all.clear()

    async def request(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterator[bytes] | SocketBody | None = None,
        *,
        content_length: int | None = None,
        timeout: float = 300.0,
    ) -> Response:
        """Sends the request (its body from `body`) and reads the answer's head.

        `headers` must hold no framing fields: `content_length` (or chunked coding when
        it is None and there is a body) is added here. `timeout`: seconds the backend may
        take for its next move: to take more of the body while it is sent, to begin its
        answer once the whole request is out, to go on with its answer.
        """
        head = _request_head(method, target, self._host, headers, body, content_length)
        for attempt in (1, 2):
            connection, reused = await self._acquire()
            sender: asyncio.Task[None] | None = None
            try:
                if body is None:
                    await connection.write(head, timeout)
                else:
                    connection.sending = True
                    sender = asyncio.create_task(
                        _send_spliced(connection, head, body, timeout)
                        if isinstance(body, SocketBody)
                        else _send_body(connection, head, body, content_length, timeout))
                return await self._read_head(connection, method, timeout, sender)
            except NextHopError as exc:
                self._discard(connection)
                if sender is not None:
                    sender.cancel()
                    with contextlib.suppress(BaseException):
                        await sender
                    # The body's failure is what broke the exchange (the client's, or a
                    # backend that took none of it in time): say that, not the broken
                    # connection.
                    if not sender.cancelled() and isinstance(
                            sender.exception(), (BodyFailed, NextHopError)):
                        raise sender.exception() from None  # type: ignore[misc]
                # A kept-alive connection the backend closed meanwhile: an idempotent
                # request without a body goes once more, on a fresh connection.
                if (attempt == 1 and reused and body is None and exc.kind is HopFailure.BROKEN
                        and not connection.chunks and method in RETRYABLE_METHODS):
                    continue
                raise
            except BaseException:
                self._discard(connection)
                if sender is not None:
                    sender.cancel()
                raise
        raise AssertionError("unreachable")

    async def _read_head(self, connection: _Connection, method: str, timeout: float,
                         sender: asyncio.Task[None] | None) -> Response:
        while True:
            raw = await connection.read_until(b"\r\n\r\n", MAX_HEAD, timeout)
            status, reason, headers, version = _parse_head(raw)
            if status >= 200:
                break
            if status == 101:
                raise _broken("backend switched protocols")
        keep_alive = version == "HTTP/1.1"
        for token in header_tokens(headers.getall("Connection", [])):
            if token == "close":
                keep_alive = False
            elif token == "keep-alive" and version == "HTTP/1.0":
                keep_alive = True
        length = -1
        if method == "HEAD" or status in NO_BODY_STATUSES:
            framing = "none"
        elif "Transfer-Encoding" in headers:
            codings = header_tokens(headers.getall("Transfer-Encoding"))
            if codings[-1:] != ["chunked"]:
                framing, keep_alive = "close", False
            else:
                framing = "chunked"
        elif "Content-Length" in headers:
            values = {v.strip() for v in headers.getall("Content-Length")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise _broken("malformed Content-Length in backend answer")
            length = int(values.pop())
            framing = "length" if length else "none"
        else:
            framing, keep_alive = "close", False
        return Response(self, connection, status, reason, headers, framing, length,
                        keep_alive, timeout, sender)


async def _send_spliced(connection: _Connection, head: bytes, body: SocketBody,
                        timeout: float) -> None:
    """The head and the part read already, then the rest of the body moved in the kernel."""
    try:
        with _aborted_on_failure(connection):
            await connection.write(head + await body.begin(), timeout)
            fd = await connection.flushed(timeout)
            try:
                await body.move_to(fd, timeout,
                                   lambda: _timed_out("backend took no data in time"))
            except splice.DestinationGone:
                raise _broken("backend closed the connection") from None
    finally:
        body.finish()
        connection.body_sent()


@contextlib.contextmanager
def _aborted_on_failure(connection: _Connection) -> Iterator[None]:
    """A request body that fails on its way aborts the backend's connection, so that the
    backend keeps nothing of it; a failure that is not the next hop's nor a cancellation
    is the body's own (BodyFailed)."""
    try:
        yield
    except (NextHopError, asyncio.CancelledError):
        connection.abort()
        raise
    except Exception as exc:
        connection.abort()
        raise BodyFailed(exc) from exc


async def _send_body(connection: _Connection, head: bytes, body: AsyncIterator[bytes],
                     content_length: int | None, timeout: float) -> None:
    try:
        await _send_request(connection, head, body, content_length, timeout)
    finally:
        connection.body_sent()  # in this task, before any other request may use it


async def _send_request(connection: _Connection, head: bytes, body: AsyncIterator[bytes],
                        content_length: int | None, timeout: float) -> None:
    chunked = content_length is None
    sent = 0
    head_sent = False

    async def send(chunk: bytes) -> None:
        nonlocal sent, head_sent
        sent += len(chunk)
        if chunked:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        if not head_sent:
            head_sent = True
            connection.chunked_body_open = chunked
            if len(chunk) <= COALESCE:
                chunk = head + chunk  # one segment for a small upload
            else:
                await connection.write(head, timeout)
        await connection.write(chunk, timeout)

    chunks = aiter(body)
    first: asyncio.Future[bytes] | None = asyncio.ensure_future(anext(chunks, b""))
    try:
        with _aborted_on_failure(connection):
            # The head waits for the body's first piece, to go out with it in one segment; not
            # for long: rclone drops a connection that sends no head within 10 s, and a slow
            # client, a body transform holding a piece back or a bandwidth limit may take that.
            if not (await asyncio.wait({first}, timeout=HEAD_ALONE_AFTER))[0]:
                head_sent = True
                connection.chunked_body_open = chunked
                await connection.write(head, timeout)
            chunk = await first
            first = None  # the task keeps its result: not for the whole body
            if chunk:
                await send(chunk)
            async for chunk in chunks:
                if chunk:
                    await send(chunk)
                del chunk  # sent: not kept while the next piece is awaited (a held one, slowly)
    finally:
        if first is not None:  # cancelled while waiting for the first piece
            first.cancel()
    if content_length is not None and sent != content_length:
        connection.abort()
        raise BodyFailed(ValueError("request body shorter or longer than its Content-Length"))
    tail = b"0\r\n\r\n" if chunked else b""
    if not head_sent:
        tail = head + tail
    connection.chunked_body_open = False  # once the end is buffered, it goes out whole
    if tail:
        await connection.write(tail, timeout)


def header_tokens(values: list[str]) -> list[str]:
    """The comma-separated tokens of a header's values, lower-cased."""
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


def _request_head(method: str, target: str, host: str, headers: CIMultiDict[str],
                  body: AsyncIterator[bytes] | SocketBody | None,
                  content_length: int | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}\r\n")
    elif body is not None:
        lines.append("Transfer-Encoding: chunked\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def _parse_head(raw: bytes) -> tuple[int, str, CIMultiDict[str], str]:
    text = raw[:-4].decode("latin-1")
    line_ends = text.count("\r\n")
    if text.count("\r") != line_ends or text.count("\n") != line_ends:
        raise _broken("bare CR or LF in the backend's answer head")
    lines = text.split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise _broken("malformed status line from backend")
    fields = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _broken("malformed header field from backend")
        fields.append((name, value.strip()))
    return int(code), reason, CIMultiDict(fields), version
