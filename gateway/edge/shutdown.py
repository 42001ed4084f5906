"""Stopping the gateway on SIGTERM without cutting what can still finish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiohttp import web

log = logging.getLogger("rclone_gateway")

CANCEL_TIMEOUT = 0.5
STOP_RESERVE = 1.0  # of the grace, kept for cutting what is left and stopping the children


def close_idle_connections(server: web.Server) -> int:
    """Closes the connections waiting for their next request; returns how many."""
    closed = 0
    for handler in list(server.connections):
        waiter = handler._waiter  # pending exactly while waiting for the next request head
        if waiter is not None and not waiter.done():
            handler.force_close()
            closed += 1
    return closed


def close_after_response(request: web.BaseRequest) -> None:
    """The connection closes once this request's response is written (no keep-alive)."""
    # Not before: aiohttp drops what a closing connection receives, and the request
    # body may still be arriving.
    if request.protocol is not None:
        request.protocol.close()


async def drain_connections(
    listener: asyncio.AbstractServer,
    server: web.Server,
    inflight: Callable[[], int],
    grace: float,
) -> None:
    """Stop accepting, let in-flight requests finish, then cut the rest, all within `grace`.

    Idle keep-alive connections are closed at once, busy ones once their
    current response is written (the request handler calls close_after_response),
    so a client cannot keep the gateway alive by sending request after request
    on a connection it already has. Requests cut at the end are cancelled while
    the backends still run: their backend connection closes mid-body, so rclone
    discards the partial upload instead of leaving it behind when it is stopped.
    """
    listener.close()
    await asyncio.sleep(0)  # let connections accepted just before start their first request
    close_idle_connections(server)
    loop = asyncio.get_running_loop()
    wait = max(grace - STOP_RESERVE, grace / 2)
    deadline = loop.time() + wait
    while inflight() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if inflight():
        log.warning("%d requests still running after %.1f s; cutting them", inflight(), wait)
    with contextlib.suppress(Exception):
        await server.shutdown(timeout=CANCEL_TIMEOUT)
