"""Notices a client that hangs up while its connection is not being read (spec section 7).

aiohttp stops reading a connection whose request body it has buffered enough of: while an
upload waits for its bandwidth share, or for a backend that does not take data, nothing
reads the socket, so neither a FIN nor an RST from the client is seen, and the request
would keep its slot, its quota reservation and its partial object until reading resumed.
`HangupWatch` keeps an epoll set of its own over the sockets of requests whose body is
still on its way: the kernel reports a peer's FIN (EPOLLRDHUP) or reset (EPOLLERR,
EPOLLHUP) there whatever data is still unread, and the watch aborts that transport at
once, which makes aiohttp cancel the request's handler (the gateway runs with
`handler_cancellation`) and the backend connection is cut short.

A client that half-closes its side after sending its request is treated as gone: aiohttp
does the same when it reads that FIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections.abc import Callable

_HANGUP = getattr(select, "EPOLLRDHUP", 0x2000)


class HangupWatch:
    """Client transports watched for a hang-up, by file descriptor."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: dict[int, asyncio.BaseTransport] = {}

    def watch(self, transport: asyncio.BaseTransport | None) -> Callable[[], None]:
        """Watches `transport` until the returned function is called."""
        fd = _fileno(transport)
        if transport is None or fd is None or not hasattr(select, "epoll"):
            return _nothing  # gone already, or no epoll (not Linux)
        epoll = self._ready_epoll()
        try:
            epoll.register(fd, _HANGUP)
        except FileExistsError:  # a closed socket's number, taken again before unwatch
            epoll.modify(fd, _HANGUP)
        except OSError:
            return _nothing
        self._watched[fd] = transport
        return lambda: self._unwatch(fd, transport)

    def _ready_epoll(self) -> select.epoll:
        if self._epoll is None:
            self._epoll = select.epoll()
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._epoll.fileno(), self._on_events)
        return self._epoll

    def _unwatch(self, fd: int, transport: asyncio.BaseTransport) -> None:
        if self._watched.get(fd) is not transport:
            return  # noticed already, or the number belongs to another request now
        del self._watched[fd]
        if self._epoll is not None:
            with contextlib.suppress(OSError):  # closed already: the kernel dropped it
                self._epoll.unregister(fd)

    def _on_events(self) -> None:
        assert self._epoll is not None
        for fd, _events in self._epoll.poll(0):
            transport = self._watched.pop(fd, None)
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)
            if transport is not None and not transport.is_closing():
                transport.abort()  # connection_lost: aiohttp cancels the handler

    def close(self) -> None:
        if self._epoll is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
        self._watched.clear()


def _fileno(transport: asyncio.BaseTransport | None) -> int | None:
    if transport is None or transport.is_closing():
        return None
    sock = transport.get_extra_info("socket")
    try:
        return sock.fileno() if sock is not None else None
    except OSError:
        return None


def _nothing() -> None:
    pass
