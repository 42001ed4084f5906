"""Streams one request to a backend and its response back, in bounded memory (spec section 7)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, replace

from aiohttp import StreamReader, web
from aiohttp.client_exceptions import ClientConnectionResetError
from multidict import CIMultiDict, CIMultiDictProxy

from backends import splice
from backends.client import (
    ConnectionPool,
    HopFailure,
    NextHopError,
    Response,
    SocketBody,
    header_tokens,
)
from gateway.access.paths import Target
from gateway.access.refusals import Notes, Refusal, Refused, record
from gateway.access.webdav_headers import References, rewrite_references
from gateway.edge.admission import FULL_READ, SMALL_READ, caught_up, set_read_size

CHUNK = 256 * 1024
# Seconds a request body may stay silent while the gateway waits for it: far above the gaps
# of a slow but live link (TCP's retransmissions after a short outage reach a minute), and
# below restic's own 5 minutes without progress. After it the request gets 408 and frees
# its slot, its quota reservation and its partial object.
CLIENT_BODY_TIMEOUT = 120.0
# Bytes of a request body aiohttp reads ahead of the gateway once it flows unheld (up to
# twice this, then the socket waits): enough for a PUT to keep flowing while this process
# waits for the CPU, small enough for 2048 connections.
READ_AHEAD = 512 * 1024
# Until then (the server's `read_bufsize`), and while a limit holds it back, a body is read
# ahead this much, and a held one read in pieces of this size, reading the socket in
# pieces as small (`connections.SMALL_READ`): an upload that waits for its share holds a
# few hundred KiB at most, not the megabytes the fast path reads ahead to batch its writes.
HELD_PIECE = SMALL_READ
# aiohttp's body reader pauses the socket past `_high_water` buffered bytes and resumes it
# under `_low_water`; no public way lowers them once the request was parsed.
_READ_AHEAD_FIELDS = ("_low_water", "_high_water")
if not all(name in getattr(StreamReader, "__slots__", ()) for name in _READ_AHEAD_FIELDS):
    raise RuntimeError("aiohttp's StreamReader has no _low_water or _high_water: "
                       "gateway.forwarding.proxy.read_ahead needs updating for this aiohttp "
                       "version")

# A body of known length with at least this much still to come moves between the sockets
# in the kernel (`backends.splice`), when what it goes through allows (`Splicing`): below
# it, the pipe and the set-up cost more than the copies they save.
SPLICE_AT_LEAST = 128 * 1024

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never sent to a backend: credentials, and what the gateway itself answers or sets.
# Content-Length too: the client sets the framing of what it sends on.
REQUEST_DROP = HOP_BY_HOP | {
    "authorization", "host", "expect", "x-gateway-forwarded", "content-length",
}
# The backend's `Server` stays (spec section 7): restic from 0.16.3 reads `rclone/<version>`
# there to tell a listing that failed inside rclone from a missing directory.
RESPONSE_DROP = HOP_BY_HOP | {"x-gateway-backend", "date"}


class _ProxyResponse(web.StreamResponse):
    # The status line and headers go out with the first piece of the body (or at the end):
    # one write, one segment for a small response instead of two.
    _send_headers_immediately = False


# The gateway's answer when its next hop failed the exchange. A peer that fails leads to
# the next peer instead; only a peer is asked to decline (`forward`'s `refuse_statuses`).
NEXT_HOP_REFUSALS = {
    HopFailure.UNREACHABLE: Refusal.BACKEND_UNREACHABLE,
    HopFailure.TIMED_OUT: Refusal.BACKEND_TIMEOUT,
    HopFailure.BROKEN: Refusal.BACKEND_ERROR,
    HopFailure.DECLINED: Refusal.BACKEND_ERROR,
}


class BodyRefused(Exception):
    """A body transform refused the request body before its end: the answer to give instead.

    Raised inside the body stream, it reaches the caller of forward() as the cause of a
    BodyFailed, after the next hop's connection was aborted short of the announced length.
    """

    def __init__(self, refusal: Refusal, *detail: object) -> None:
        self.given = refusal.given(*detail)
        super().__init__(self.given.reason)

    @property
    def status(self) -> int:
        return self.given.status

    @property
    def reason(self) -> str:
        """The access log's."""
        return self.given.reason or ""

    def answer(self) -> web.Response:
        return refusal_response(self.given)


@dataclass(frozen=True, slots=True)
class Splicing:
    """What a body moved in the kernel goes through, in place of its body transforms:
    the parts of them that do not need the bytes in hand. None of a request's means that
    one of its transforms needs them (its body is then read into the process)."""

    pace: splice.Pace | None = None  # the bandwidth limits: grants bytes before they pass
    see: Callable[[memoryview], None] | None = None  # sees every byte (a hash)
    # Runs once every byte was seen, before the last piece goes on: raises BodyRefused
    # to keep it from the next hop.
    before_last: Callable[[], None] | None = None

    def with_(self, other: Splicing) -> Splicing:
        """Both: each part comes from one of them at most."""
        if self is NOTHING_ON_THE_WAY:  # the first transform of most bodies: no merge
            return other
        merged = self
        for name in ("pace", "see", "before_last"):
            if (part := getattr(other, name)) is not None:
                if getattr(merged, name) is not None:
                    raise ValueError(f"two body transforms splice with a {name}")
                merged = replace(merged, **{name: part})
        return merged


# The spliced form of no transform at all: what a body goes through before any is added.
NOTHING_ON_THE_WAY = Splicing()


@functools.lru_cache(maxsize=4096)
def paced(pace: splice.Pace) -> Splicing:
    """The spliced form of a bandwidth limit alone: one per pace, not one per request."""
    return Splicing(pace=pace)


@dataclass
class Transfer:
    bytes_in: int = 0
    bytes_out: int = 0


def _connection_tokens(headers: CIMultiDict[str] | object) -> set[str]:
    return set(header_tokens(headers.getall("Connection", [])))  # type: ignore[attr-defined]


def request_headers(incoming: CIMultiDict[str]) -> CIMultiDict[str]:
    named = _connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in incoming.items():
        lower = key.lower()
        if lower in REQUEST_DROP or lower in named:
            continue
        out.add(key, value)
    return out


BodyFilter = Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]
# The X-Gateway-Backend value of a response, fixed or derived from the next hop's headers.
BackendLabel = str | Callable[[CIMultiDictProxy[str]], str]
# Sees the backend's status before anything is sent; a response it returns is sent instead.
StatusHook = Callable[[int], Awaitable[web.StreamResponse | None]]


async def send_continue(request: web.BaseRequest) -> None:
    """Answers `Expect: 100-continue`: the client may send its body now."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


BodyHeld = Callable[[], bool]


def read_ahead(request: web.BaseRequest, size: int) -> None:
    """aiohttp reads up to twice `size` bytes of the body ahead of the gateway (one read
    of the socket more at most: up to `size` too), and goes on reading once less than
    `size` is left."""
    content = request.content
    content._low_water, content._high_water = size, 2 * size
    set_read_size(request.transport, FULL_READ if size > HELD_PIECE else SMALL_READ)


class _StallClock:
    """The request body's silence timer: one timer per body, not one per read (asyncio's
    `timeout()` around each read cost a few per cent of an upload's CPU). The timer looks
    at the read in progress when it fires, and fires again at that read's own deadline if
    it began later; a read waiting for `CLIENT_BODY_TIMEOUT` seconds is cancelled. The time
    the body waits for the backend between reads is not counted."""

    __slots__ = ("_expired", "_handle", "_limit", "_loop", "_since", "_task")

    def __init__(self, limit: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._limit = limit
        self._since: float | None = None  # when the read in progress began
        self._task: asyncio.Task[object] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._expired = False

    def start(self) -> None:
        """A read of the body begins in the current task."""
        self._since = now = self._loop.time()
        self._task = asyncio.current_task()
        if self._handle is None:
            self._handle = self._loop.call_at(now + self._limit, self._check)

    def stop(self) -> None:
        """The read ended (with data, at the end, or cancelled)."""
        self._since = None
        self._task = None

    def expired(self) -> bool:
        """Whether the CancelledError the read got came from this clock (and only from it)."""
        if not self._expired:
            return False
        self._expired = False
        task = asyncio.current_task()
        return task is not None and task.uncancel() == 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        since, task = self._since, self._task
        if since is None or task is None:
            return  # no read waits: the next one arms the timer again
        due = since + self._limit
        if self._loop.time() >= due:
            self._expired = True
            task.cancel()
        else:
            self._handle = self._loop.call_at(due, self._check)


async def request_body(request: web.BaseRequest, transfer: Transfer,
                       held: BodyHeld | None = None) -> AsyncIterator[bytes]:
    """The request body as it arrives. While `held()` says a limit holds it back, in small
    pieces with a small read ahead; otherwise one received piece (one read of the socket,
    up to `connections.FULL_READ`) at a time, as it was received: joining all that is
    buffered into one piece copied up to a few MiB into fresh memory for each, and saved
    no write to the backend, whose socket takes some 200 KiB a write."""
    content = request.content
    small: bool | None = None
    clock = _StallClock(CLIENT_BODY_TIMEOUT)
    try:
        while True:
            if (now_held := held is not None and held()) is not small:
                small = now_held
                read_ahead(request, HELD_PIECE if small else READ_AHEAD)
            clock.start()
            try:
                if small:
                    chunk = await content.read(HELD_PIECE)
                else:
                    chunk, end_of_http_chunk = await content.readchunk()
                    if not chunk and end_of_http_chunk:
                        continue  # a chunked body's chunk ended here: no data
            except asyncio.CancelledError:
                if clock.expired():
                    raise _client_body_stalled() from None
                raise
            finally:
                clock.stop()
            if not chunk:
                return
            transfer.bytes_in += len(chunk)
            yield chunk
    finally:
        clock.close()
        if not small:  # the next request's head and body start in small reads again
            set_read_size(request.transport, SMALL_READ)


class _SplicedRequestBody(SocketBody):
    """A request body of known length that moves from the client's socket to the next
    hop's in the kernel, through its `Splicing` (`backends.splice`)."""

    def __init__(self, request: web.BaseRequest, client_fd: int, transfer: Transfer,
                 splicing: Splicing) -> None:
        self._request = request
        self._client_fd = client_fd
        self._transfer = transfer
        self._splicing = splicing
        self._begun = self._moving = False

    async def begin(self) -> bytes:
        request, splicing = self._request, self._splicing
        content = request.content
        if request.transport is None or request.content_length is None:
            raise ClientConnectionResetError("client went away")
        # Taking what aiohttp buffered may resume its reading (below its low water mark):
        # paused after it, with no read between, what comes from now on stays in the socket.
        first = content.read_nowait() if content.total_bytes else b""
        request.transport.pause_reading()
        self._begun = True
        self._transfer.bytes_in += len(first)
        if first:
            await _paced(splicing.pace, len(first))
            if splicing.see is not None:
                splicing.see(memoryview(first))
        return first

    def finish(self) -> None:
        """Begun and never moved (the next hop failed between): the client's socket is read
        again, by aiohttp, which then drains or drops the body as for any unread one."""
        if self._begun and not self._moving:
            self._moving = True
            caught_up(self._request.transport, self._request.content, 0)

    async def move_to(self, fd: int, idle: float, stalled: splice.Stalled) -> None:
        request, splicing, transfer = self._request, self._splicing, self._transfer
        self._moving = True
        assert request.content_length is not None
        left = request.content_length - request.content.total_bytes
        taken = 0

        def took(n: int) -> None:
            nonlocal taken
            taken += n
            transfer.bytes_in += n

        try:
            await splice.pump(
                self._client_fd, fd, left,
                source_idle=CLIENT_BODY_TIMEOUT, source_stalled=_client_body_stalled,
                destination_idle=idle, destination_stalled=stalled,
                pace=splicing.pace, see=splicing.see, before_last=splicing.before_last,
                taken=took,
            )
        finally:
            caught_up(request.transport, request.content, taken, whole=taken == left)


def _client_body_stalled() -> BaseException:
    return BodyRefused(Refusal.BODY_STALLED, CLIENT_BODY_TIMEOUT)


async def _paced(pace: splice.Pace | None, size: int) -> None:
    """`size` bytes that are in hand already, held to the bandwidth limits."""
    granted = 0
    while pace is not None and granted < size:
        granted += await pace(size - granted)


def _spliced_request_body(request: web.BaseRequest, transfer: Transfer,
                          splicing: Splicing | None) -> _SplicedRequestBody | None:
    """The request body as a spliced one, when it can be: a known length with at least
    `SPLICE_AT_LEAST` bytes still in the socket, transforms that allow it, a socket."""
    length = request.content_length
    content = request.content
    if splicing is None or length is None or content.exception() is not None:
        return None
    if length - content.total_bytes < SPLICE_AT_LEAST:
        return None
    client_fd = splice.socket_fd(request.transport)
    if client_fd is None:
        return None
    return _SplicedRequestBody(request, client_fd, transfer, splicing)


async def forward(
    request: web.BaseRequest,
    target: Target,
    pool: ConnectionPool,
    backend_label: BackendLabel,
    transfer: Transfer,
    body_filter: BodyFilter | None = None,
    *,
    backend_timeout: float,
    headers: CIMultiDict[str] | None = None,
    refuse_statuses: Collection[int] = (),
    on_status: StatusHook | None = None,
    references: References | None = None,
    response_filter: BodyFilter | None = None,
    body_held: BodyHeld | None = None,
    request_splicing: Splicing | None = None,
    response_splicing: Splicing | None = None,
) -> web.StreamResponse:
    """Streams `request` to the canonical target on `pool`'s backend and the answer back.

    `headers` replaces the filtered client headers. A next hop that cannot be reached,
    breaks the exchange or does not answer in time raises NextHopError, as does one whose
    status is in `refuse_statuses` (DECLINED), before anything is sent to the client.
    A request body that fails (the client went away, `body_filter` refused it) raises
    BodyFailed, after the backend's connection was aborted. The other resources a WebDAV
    request names (`references`: its Destination, its If header's) are named at `pool`'s
    own authority. `response_filter` transforms the answer's body on its way back.
    `body_held` says whether a limit holds the request body back now (read it in small
    pieces). A body of known length moves in the kernel instead, past the transforms,
    when its `Splicing` (`request_splicing`, `response_splicing`) is given.
    """
    if headers is None:
        headers = request_headers(request.headers)
    if references is not None:
        rewrite_references(headers, references, pool.host)
    data: AsyncIterator[bytes] | _SplicedRequestBody | None = None
    if request.body_exists:
        data = _spliced_request_body(request, transfer, request_splicing)
        if data is None:
            data = request_body(request, transfer, body_held)
            if body_filter is not None:
                data = body_filter(data)
    hop_answer = await pool.request(
        request.method, target.path_and_query, headers, data,
        content_length=request.content_length, timeout=backend_timeout,
    )
    async with hop_answer:
        if hop_answer.status in refuse_statuses:
            raise NextHopError(HopFailure.DECLINED, f"answered {hop_answer.status}",
                               hop_answer.status)
        if on_status is not None and (instead := await on_status(hop_answer.status)):
            return instead
        response = _ProxyResponse(status=hop_answer.status, reason=hop_answer.reason or None)
        named = _connection_tokens(hop_answer.headers)
        for key, value in hop_answer.headers.items():
            lower = key.lower()
            if lower not in RESPONSE_DROP and lower not in named:
                response.headers.add(key, value)
        response.headers["X-Gateway-Backend"] = (
            backend_label if isinstance(backend_label, str) else backend_label(hop_answer.headers)
        )
        await response.prepare(request)
        try:
            if (response_splicing is not None
                    and (hop_answer.body_left or 0) >= SPLICE_AT_LEAST
                    and (client_fd := splice.socket_fd(request.transport)) is not None):
                await _splice_answer(request, response, hop_answer, client_fd, transfer,
                                     response_splicing)
                return response
            chunks = hop_answer.iter_body(CHUNK)
            if response_filter is not None:
                chunks = response_filter(chunks)
            async for chunk in chunks:
                transfer.bytes_out += len(chunk)
                await response.write(chunk)
        except NextHopError:
            # Headers are gone already: all that is left is to cut the response short.
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response


async def _splice_answer(request: web.BaseRequest, response: web.StreamResponse,
                         hop_answer: Response, client_fd: int, transfer: Transfer,
                         splicing: Splicing) -> None:
    """The answer's body of known length moved from the next hop's socket to the client's
    in the kernel, after the head and what came with it."""
    first = hop_answer.begin_splice()
    if first:
        await _paced(splicing.pace, len(first))
        transfer.bytes_out += len(first)
        await response.write(first)
    else:
        request.writer.send_headers()  # type: ignore[attr-defined]
    transport = request.transport
    if transport is None:
        raise ClientConnectionResetError("client went away")

    def moved(n: int) -> None:
        transfer.bytes_out += n

    try:
        await splice.flushed(transport)
        await hop_answer.splice_body(client_fd, pace=splicing.pace, moved=moved)
    except splice.DestinationGone:
        raise ClientConnectionResetError("client went away") from None
    await response.write_eof()


def plain(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=reason + "\n", headers=headers)


def refusal_response(given: Refused) -> web.Response:
    """The answer of a refusal (`gateway.access.refusals`): its status, its text and a
    newline, its header fields."""
    text = given.text
    return web.Response(status=given.status, reason=given.refusal.phrase,
                        text=None if text is None else text + "\n", headers=given.headers)


def refuse(notes: Notes, given: Refused, note: str = "") -> web.Response:
    """The answer of a refusal, noted for the access log (`note` after its reason)."""
    record(notes, given, note)
    return refusal_response(given)
