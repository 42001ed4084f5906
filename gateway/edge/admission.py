from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import cast

from aiohttp import StreamReader, web
from aiohttp.http import HttpRequestParser
from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE, RequestHandler, RequestPayloadError

from gateway.access.refusals import Refusal
from gateway.edge.logs import log_reject

# Read-only peeks into aiohttp's RequestHandler, checked when a factory is built:
#   _request_count: bumped by the parser once per complete request head (line + headers);
#   _waiter: a pending future exactly while start() waits for the next request head
#            (the state aiohttp's own keep-alive timer treats as "idle");
#   _messages: (message, payload) pairs parsed and not yet handled; data_received appends
#              the request whose head it completed.
# And written: _parser, replaced (built as RequestHandler builds it, from _loop,
# _read_bufsize and the limits) once a request body was moved elsewhere whole.
_HANDLER_INTERNALS = ("_request_count", "_waiter", "_messages", "_parser", "_loop",
                      "_read_bufsize")

# Rejected connections keep reading (and discarding) for this long after the 503
# and a FIN, so that an unread request in the socket buffer does not turn our close
# into an RST that could destroy the 503 before the client reads it.
REJECT_LINGER = 1.0


def _canned_response(refusal: Refusal) -> bytes:
    """A refusal's answer as bytes, for a connection that has no aiohttp request."""
    given = refusal.given()
    payload = f"{given.text}\n".encode()
    head = [
        f"HTTP/1.1 {given.status} {HTTPStatus(given.status).phrase}",
        *(f"{name}: {value}" for name, value in (given.headers or {}).items()),
        "Connection: close",
        "Content-Type: text/plain",
        f"Content-Length: {len(payload)}",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


TOO_MANY_CONNECTIONS_RESPONSE = _canned_response(Refusal.TOO_MANY_CONNECTIONS)
REQUEST_TIMEOUT_RESPONSE = _canned_response(Refusal.HEADER_TIMEOUT)
HEAD_TOO_LARGE_RESPONSE = _canned_response(Refusal.HEAD_TOO_LARGE)
# The first bytes of HTTP/2's connection preface ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), which
# opens a connection. The parser takes a "PRI" request line and its empty line for the start of
# the preface and waits for the rest, so a client that sent only those would wait for the header
# timeout and a 408: a connection that opens with them is answered at once.
HTTP2_PREFACE_START = b"PRI "
HTTP2_PREFACE_RESPONSE = _canned_response(Refusal.HTTP2_PREFACE)
# aiohttp bounds each line and the number of header fields; this bounds a whole request head.
MAX_HEAD_BYTES = 32 * 1024
# Bytes one read of a client socket takes at most: what uvloop reads into for a plain
# protocol, while a request body flows unheld (`set_read_size`). Otherwise (request heads,
# bodies not let in yet or held back by a limit) reads are smaller: a held upload's buffer
# is then bounded by its reads, not by 256 KiB blocks. One buffer serves every connection:
# each read is copied out before the next.
FULL_READ = 256 * 1024
SMALL_READ = 64 * 1024
_read_buffer = memoryview(bytearray(FULL_READ))


def set_read_size(transport: asyncio.BaseTransport | None, size: int) -> None:
    """The most one read of this client connection's socket takes from now on."""
    protocol = transport.get_protocol() if transport is not None else None
    if isinstance(protocol, _GuardedConnection):
        protocol.read_size = min(size, FULL_READ)


# What aiohttp's parser is fed in place of body bytes that bypassed it (`caught_up`).
_ZEROS = memoryview(bytes(FULL_READ))


def caught_up(transport: asyncio.BaseTransport | None, body: StreamReader, size: int, *,
              whole: bool = False) -> None:
    """`size` bytes of the request body were taken from the socket without passing through
    here (moved in the kernel, `backends.splice`); `whole`: they were all of it that was
    left. aiohttp's parser counts a body down to its end before it takes the next request
    head: a whole body's parser is replaced by a fresh one, and the body reader ended; a
    part of a body is fed to the parser as that many zeros, which the body reader drops. Then
    the socket is read again (its reading was paused meanwhile).

    aiohttp has no way to be told that a body was read elsewhere; without this the next
    request on the connection would be taken for the rest of the body.
    """
    protocol = transport.get_protocol() if transport is not None else None
    if not isinstance(protocol, _GuardedConnection) or transport is None:
        return
    if transport.is_closing():
        return  # the connection is over: nothing more is parsed on it
    handler = protocol._handler
    if whole and body.exception() is None:
        # Cheaper than counting the parser down (it copies each byte it is fed): a parser
        # that starts at the next request, as a fresh connection's does.
        handler._parser = HttpRequestParser(
            handler, handler._loop, handler._read_bufsize,
            max_line_size=handler.max_line_size, max_field_size=handler.max_field_size,
            max_headers=handler.max_headers, payload_exception=RequestPayloadError,
            auto_decompress=protocol._factory._auto_decompress,
            max_msg_queue_size=MAX_MSG_QUEUE_SIZE,
        )
        body.feed_eof()
        size = 0
    while size:
        piece = min(size, len(_ZEROS))
        handler.data_received(_ZEROS[:piece])  # type: ignore[arg-type]
        size -= piece
        if body.exception() is None:
            body.read_nowait()
    cast(asyncio.ReadTransport, transport).resume_reading()


class GuardedProtocolFactory:
    """Protocol factory for ``loop.create_server`` wrapping an aiohttp low-level Server.

    Caps the number of open client connections (over the cap: canned 503, no
    RequestHandler) and closes connections whose request line and headers are not
    complete within ``header_timeout`` (408 if some bytes arrived, else silently),
    or whose request head grows over ``max_head_bytes`` (431), or that open with
    HTTP/2's preface (400).
    """

    __slots__ = ("_auto_decompress", "_header_timeout", "_max_connections", "_max_head_bytes",
                 "_open", "_rejected", "_server", "_timed_out")

    def __init__(self, server: web.Server, *, max_connections: int = 2048,
                 header_timeout: float = 5.0, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if not header_timeout > 0:
            raise ValueError(f"header_timeout must be > 0, got {header_timeout}")
        missing = [name for name in _HANDLER_INTERNALS if not hasattr(RequestHandler, name)]
        if missing:
            raise RuntimeError(
                f"aiohttp's RequestHandler has no {', '.join(missing)}: "
                "gateway.edge.admission needs updating for this aiohttp version"
            )
        self._server = server
        self._auto_decompress = bool(server._kwargs.get("auto_decompress", True))
        self._max_connections = max_connections
        self._header_timeout = float(header_timeout)
        self._max_head_bytes = max_head_bytes
        self._open = 0
        self._rejected = 0
        self._timed_out = 0

    def __call__(self) -> asyncio.Protocol:
        return _GuardedConnection(self)

    @property
    def count(self) -> int:
        """Client connections currently open and admitted (served by aiohttp)."""
        return self._open

    @property
    def rejected(self) -> int:
        """Connections answered 503 because the cap was reached, since start."""
        return self._rejected

    @property
    def timed_out(self) -> int:
        """Connections closed by the header/idle timeout, since start."""
        return self._timed_out

    @property
    def max_connections(self) -> int:
        return self._max_connections

    @property
    def header_timeout(self) -> float:
        return self._header_timeout


def guarded_protocol_factory(server: web.Server, *, max_connections: int = 2048,
                             header_timeout: float = 5.0,
                             max_head_bytes: int = MAX_HEAD_BYTES) -> GuardedProtocolFactory:
    return GuardedProtocolFactory(server, max_connections=max_connections,
                                  header_timeout=header_timeout, max_head_bytes=max_head_bytes)


class _RejectedConnection(asyncio.Protocol):
    __slots__ = ("_timer",)

    def __init__(self) -> None:
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport
        stream.write(TOO_MANY_CONNECTIONS_RESPONSE)
        if stream.can_write_eof():
            stream.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REJECT_LINGER, stream.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _GuardedConnection(asyncio.BufferedProtocol):
    """Sits between the transport and aiohttp's RequestHandler, forwarding everything but
    a connection that opens with HTTP/2's preface (400). It reads the socket into a buffer
    of its own choosing (`read_size`), and hands aiohttp bytes.

    The header timeout runs on a timer; no request is scanned (only a connection's first
    four bytes are looked at, for the preface). Each tick looks at
    the handler. Busy (reading a body, handling, streaming): look again in
    header_timeout / 2. Idle with another request count than at the last look:
    open a header_timeout window. Still idle with the same count when the window
    ends: no request head completed for header_timeout seconds, so 408 / close.
    The first window opens at connection_made (the first request head is bounded
    exactly); a later one, or an idle keep-alive connection, is cut 1 to 1.5
    header_timeout after the previous response finished.
    """

    __slots__ = ("_factory", "_handler", "_head_bytes", "_head_bytes_count", "_head_start",
                 "_idle_count", "_payload", "_timer", "_transport", "read_size")

    def __init__(self, factory: GuardedProtocolFactory) -> None:
        self._factory = factory
        self._handler: RequestHandler  # set by connection_made when admitted
        self._transport: asyncio.Transport
        self._timer: asyncio.TimerHandle | None = None
        self._idle_count = 0
        # handler._request_count when bytes last arrived while no request was in progress:
        # equal to the current count => part of a request head is waiting (408, not silence).
        self._head_bytes_count = -1
        # Bytes of a request head that has not completed yet.
        self._head_bytes = 0
        # The connection's first bytes (leading CRLFs skipped), until they can tell HTTP/2.
        self._head_start = b""
        # Body of the last request whose head completed (aiohttp's StreamReader).
        self._payload: StreamReader | None = None
        self.read_size = SMALL_READ

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        factory = self._factory
        if factory._open >= factory._max_connections:
            factory._rejected += 1
            rejected = _RejectedConnection()
            transport.set_protocol(rejected)
            rejected.connection_made(transport)
            return
        handler = factory._server()
        self._handler = handler
        self._transport = cast(asyncio.Transport, transport)
        factory._open += 1
        handler.connection_made(transport)
        self._idle_count = handler._request_count
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + factory._header_timeout, self._tick)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer[:self.read_size]

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_read_buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        handler = self._handler
        waiter = handler._waiter
        count = handler._request_count
        # Bytes start the next request head when aiohttp waits for one, or when the body of
        # the last request is all in: a client may send its next head as soon as it has the
        # answer, before aiohttp's loop is back to waiting (on a loaded machine it often is).
        payload = self._payload
        in_head = ((waiter is not None and not waiter.done()) or not count
                   or (payload is not None and payload.is_eof()))
        if in_head:
            self._head_bytes_count = count
        if not count and len(self._head_start) < len(HTTP2_PREFACE_START):
            start = (self._head_start + data[:64]).lstrip(b"\r\n")
            self._head_start = start[:len(HTTP2_PREFACE_START)]
            if self._head_start == HTTP2_PREFACE_START:
                self._refuse_http2()
                return
        handler.data_received(data)
        if handler._request_count != count:
            messages = handler._messages
            self._payload = messages[-1][1] if messages else None
        if in_head and handler._request_count == count:
            self._head_bytes += len(data)
            if (self._head_bytes > self._factory._max_head_bytes
                    and not self._transport.is_closing()):
                self._transport.write(HEAD_TOO_LARGE_RESPONSE)
                handler.force_close()
        else:
            self._head_bytes = 0

    def _refuse_http2(self) -> None:
        transport = self._transport
        if not transport.is_closing():
            transport.write(HTTP2_PREFACE_RESPONSE)
            peer = transport.get_extra_info("peername")
            log_reject(peer[0] if peer else None, Refusal.HTTP2_PREFACE.given())
        self._handler.force_close()

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._factory._open -= 1
        self._handler.connection_lost(exc)

    def _tick(self) -> None:
        self._timer = None
        handler, transport = self._handler, self._transport
        if transport.is_closing():
            return
        timeout = self._factory._header_timeout
        waiter = handler._waiter
        if waiter is None or waiter.done():
            self._idle_count = -1
            delay = timeout / 2
        elif handler._request_count != self._idle_count:
            self._idle_count = handler._request_count
            delay = timeout
        else:
            self._factory._timed_out += 1
            if self._head_bytes_count == handler._request_count:
                transport.write(REQUEST_TIMEOUT_RESPONSE)
            handler.force_close()
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + delay, self._tick)
