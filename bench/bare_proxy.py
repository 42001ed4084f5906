"""A reference for `make bench`: the gateway's proxy hop with none of its checks.

The same event loop (uvloop), HTTP server (aiohttp's), canonical path and
streaming code (`gateway.forwarding.proxy.forward` over `backends.client`) as the gateway,
in front of the gateway's own `rclone serve restic` unix socket, and nothing
else: no source filter, no credentials, no policy, no access log, no metrics.
What it reaches is the most a Python proxy hop built this way can reach; the
gap between it and the gateway is what the gateway's own work costs.

    python bench/bare_proxy.py PORT UNIX_SOCKET
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop
from aiohttp import web

from backends.client import ConnectionPool, NextHopError
from gateway.access.paths import PathError, canonicalise
from gateway.access.refusals import Refusal
from gateway.forwarding.proxy import NEXT_HOP_REFUSALS, Transfer, forward, refusal_response


async def serve(port: int, socket_path: str) -> None:
    pool = ConnectionPool.unix(socket_path)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        try:
            target = canonicalise(request.raw_path)
        except PathError as exc:
            return refusal_response(Refusal.BAD_TARGET.given(exc))
        try:
            return await forward(request, target, pool, "bare", Transfer(), backend_timeout=300.0)
        except NextHopError as exc:
            return refusal_response(NEXT_HOP_REFUSALS[exc.kind].given())

    server = web.Server(handle, access_log=None)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    listener.close()
    await pool.close()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2]))
