"""Moving a body from one socket to another inside the kernel: splice(2) through a pipe.

A body read into the process and written out again costs two copies, a `bytes` object
per piece and the Python around them: most of a proxy's CPU per GiB (docs/performance.md).
Spliced, a piece goes from the source socket into a pipe and from the pipe into the
destination socket as references to the same pages; the process sees only its length.
Where the bytes themselves must be seen (the SHA-256 of a module's upload), a piece is
first peeked at (MSG_PEEK: copied into one buffer that every body shares, left in the
socket), and then spliced: one copy instead of two, and no object per piece.

One piece at a time: a piece is taken from the source only once the last one is all in
the destination, so a body holds one pipe's worth of memory at most (in the kernel), and
the last piece can be held back until the whole body was seen (`before_last`). The
sockets' own buffers keep both sides flowing meanwhile.

The sockets stay owned by their event-loop transports: the pump works on duplicates of
their descriptors, and its caller keeps the transports from touching them meanwhile
(reading paused, nothing left to write).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from collections.abc import Awaitable, Callable

# Bytes a pipe holds (F_SETPIPE_SZ; 1 MiB is the most an unprivileged process may ask).
# When the kernel refuses (the user's pipe pages are spent), the pipe keeps what it has,
# down to 8 KiB: the pieces are smaller then, nothing else changes.
PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_MOVE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_MORE = _MOVE | os.SPLICE_F_MORE
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)

# The peeked bytes of a piece, shown to `see` with no wait between the peek and the showing:
# one buffer serves every body.
_peeked = memoryview(bytearray(PIPE_SIZE))

# Asked before each piece: how much of `want` bytes may pass now (a bandwidth limit).
Pace = Callable[[int], Awaitable[int]]
Stalled = Callable[[], BaseException]


class SourceEnded(Exception):
    """The source socket ended (or was reset) before the whole body came."""


class DestinationGone(Exception):
    """The destination socket was closed or reset before the whole body went out."""


class _Pipe:
    __slots__ = ("capacity", "read_end", "write_end")

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.capacity = fcntl.fcntl(self.write_end, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            self.capacity = fcntl.fcntl(self.write_end, _F_GETPIPE_SZ)

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)


class _Watch:
    """Readiness of one descriptor, to read or to write, for the length of one body.

    Registered with the event loop at the first wait and left so while the body flows:
    a fresh registration per wait (uvloop makes and closes a poll handle each time) cost
    more than the splice itself for the small pieces some children write. Readiness that
    comes while nobody waits takes the registration away (the descriptor would else wake
    the loop at every turn), and the next wait makes it again.
    """

    __slots__ = ("_fd", "_loop", "_registered", "_waiter", "_writable")

    def __init__(self, fd: int, writable: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._writable = writable
        self._registered = False
        self._waiter: asyncio.Future[None] | None = None

    async def ready(self, timeout: float | None, stalled: Stalled | None) -> None:
        """Waits until the descriptor can be read (or written); `stalled()` is raised
        after `timeout` seconds."""
        loop = self._loop
        if not self._registered:
            if self._writable:
                loop.add_writer(self._fd, self._fired)
            else:
                loop.add_reader(self._fd, self._fired)
            self._registered = True
        waiter = self._waiter = loop.create_future()
        timer = None
        if timeout is not None:
            timer = loop.call_later(timeout, _settle, waiter, stalled or _timed_out)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _fired(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        else:
            self.close()

    def close(self) -> None:
        if self._registered:
            self._registered = False
            if self._writable:
                self._loop.remove_writer(self._fd)
            else:
                self._loop.remove_reader(self._fd)


def _timed_out() -> BaseException:
    return TimeoutError("no progress in time")


def _settle(future: asyncio.Future[None], stalled: Stalled | None = None) -> None:
    if not future.done():
        if stalled is None:
            future.set_result(None)
        else:
            future.set_exception(stalled())


async def pump(
    source: int,
    destination: int,
    count: int,
    *,
    source_idle: float | None,
    source_stalled: Stalled | None = None,
    destination_idle: float | None,
    destination_stalled: Stalled | None = None,
    pace: Pace | None = None,
    see: Callable[[memoryview], None] | None = None,
    before_last: Callable[[], None] | None = None,
    taken: Callable[[int], None] | None = None,
    moved: Callable[[int], None] | None = None,
) -> None:
    """Moves exactly `count` bytes from the socket `source` to the socket `destination`.

    `source_idle`, `destination_idle`: seconds each may keep the body waiting (None: no
    limit) before `source_stalled()` or `destination_stalled()` is raised (TimeoutError
    if not given). `pace` grants bytes before they are taken: a grant the source had not
    all of yet is used up by the next pieces before another is asked for, so the grants
    add up to `count`; `see` is shown every byte, in order; `before_last` runs
    once the whole body was taken and seen, before its last piece goes out, and may
    raise to keep it from going out. `taken(n)`: n more bytes were taken from the source
    (they are no longer in its socket); `moved(n)`: n more are in the destination. A
    source that ends early raises SourceEnded; a destination that goes away,
    DestinationGone.
    """
    src = socket.socket(fileno=os.dup(source))
    dst = os.dup(destination)
    readable, writable = _Watch(src.fileno(), False), _Watch(dst, True)
    pipe: _Pipe | None = None
    buffer = _peeked if see is not None else None
    try:
        pipe = _Pipe()
        piece_size = min(pipe.capacity, len(_peeked))
        left = count
        granted = 0  # of the last grant, what the socket did not have yet: used up first
        while left:
            if pace is None:
                want = min(left, piece_size)
            else:
                if not granted:
                    granted = await pace(min(left, piece_size))
                want = granted
            size = await _take(src, readable, pipe.write_end, want, buffer, source_idle,
                               source_stalled)
            if pace is not None:
                granted -= size
            if see is not None and buffer is not None:
                see(buffer[:size])  # before any other body peeks into the buffer
            if taken is not None:
                taken(size)
            left -= size
            if not left and before_last is not None:
                before_last()
            await _give(pipe.read_end, dst, writable, size, more=bool(left),
                        idle=destination_idle, stalled=destination_stalled)
            if moved is not None:
                moved(size)
    finally:
        readable.close()  # before the descriptors they watch
        writable.close()
        if pipe is not None:
            pipe.close()
        src.close()
        os.close(dst)


async def _take(src: socket.socket, readable: _Watch, pipe_in: int, want: int,
                peek: memoryview | None, idle: float | None, stalled: Stalled | None) -> int:
    """Up to `want` bytes from `src` into the pipe; first copied into `peek` if given."""
    fd = src.fileno()
    while True:
        try:
            if peek is not None:
                # The bytes stay in the socket: the splice below takes the same ones.
                want = src.recv_into(peek, want, socket.MSG_PEEK)
                if not want:
                    raise SourceEnded("source closed before the end of the body")
            size = os.splice(fd, pipe_in, want, flags=_MOVE)
        except BlockingIOError:
            await readable.ready(idle, stalled)
            continue
        except _GONE as exc:
            raise SourceEnded(f"source reset ({type(exc).__name__})") from None
        if not size:
            raise SourceEnded("source closed before the end of the body")
        return size


async def _give(pipe_out: int, dst: int, writable: _Watch, size: int, *, more: bool,
                idle: float | None, stalled: Stalled | None) -> None:
    flags = _MORE if more else _MOVE
    while size:
        try:
            size -= os.splice(pipe_out, dst, size, flags=flags)
        except BlockingIOError:
            await writable.ready(idle, stalled)
        except _GONE as exc:
            raise DestinationGone(f"destination gone ({type(exc).__name__})") from None


def socket_fd(transport: asyncio.BaseTransport | None) -> int | None:
    """The descriptor of a stream transport's socket, or None (closing, or no socket)."""
    if transport is None or transport.is_closing():
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        fd = sock.fileno()
        return fd if fd >= 0 else None
    return None


async def flushed(transport: asyncio.WriteTransport, timeout: float | None = None,
                  stalled: Stalled | None = None) -> None:
    """Waits until `transport` has written all it buffered: the socket is the pump's then."""
    if not transport.get_write_buffer_size():
        return
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    # Rare (a head does not fill an empty socket): polled, not worth a protocol callback.
    while transport.get_write_buffer_size():
        if transport.is_closing():
            raise DestinationGone("destination closed")
        if deadline is not None and loop.time() > deadline:
            raise (stalled or _timed_out)()
        await asyncio.sleep(0.005)
