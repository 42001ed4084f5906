"""Removes what a crashed backend left of an upload it was receiving.

`rclone serve restic` writes an object under its final name while it arrives
and removes it when the upload fails; killed in the middle, it cannot, and the
half-written object stays. The append-only server would then refuse the
client's retry (the object "exists") and the repository would hold a broken
object. Restic names every object but `config` after the sha256 of its content,
so an object whose content does not hash to its name is certainly partial: it
holds no backup data and is removed through the full-access server. That is
done when an upload breaks on the backend side (before the client is
answered), and when the append-only server refuses an upload because the
object exists (the leftover of a crash the gateway did not see, such as its
own): the client then gets a 503 and its retry goes through.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Protocol

import aiohttp
from aiohttp import web
from yarl import URL

from backends.manager import Generation
from gateway.paths import Target
from gateway.policy import Backend

log = logging.getLogger("rclone_gateway.repair")

OBJECT_TYPES = frozenset({"data", "keys", "locks", "snapshots", "index"})
_OBJECT_ID = re.compile(r"[0-9a-f]{64}\Z")
READY_WAIT = 10.0
REMOVED = "; partial object removed"
COMPLETE = "; stored object is complete"
REST_ACCEPT = "application/vnd.x.restic.rest.v2"


def is_restic_upload(method: str, backend: Backend, target: Target) -> bool:
    """A POST of `/<destination>/<app>/<module>/<type>/<id>` to a Restic REST backend."""
    segments = target.segments
    return (
        method == "POST"
        and backend in (Backend.RESTIC, Backend.RESTIC_APPEND_ONLY)
        and len(segments) == 5
        and segments[3] in OBJECT_TYPES
        and _OBJECT_ID.match(segments[4]) is not None
        and not target.trailing_slash
    )


async def _wait_ready(generation: Generation, backend: Backend) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_WAIT
    while not generation.children[backend].ready:
        if loop.time() > deadline or generation.stopping:
            return False
        await asyncio.sleep(0.05)
    return True


async def discard_partial_upload(generation: Generation, target: Target) -> str:
    """After an upload to `target` broke on the backend side: remove the object if partial.

    Returns a note for the access log reason.
    """
    object_id = target.segments[4]
    if generation.stopping:
        return ""  # stopped in order: rclone saw the upload cut and removed the object itself
    if not await _wait_ready(generation, Backend.RESTIC):
        return "; backend not back, partial object not checked"
    session = generation.session(Backend.RESTIC)
    url = URL("http://backend" + target.path, encoded=True)
    headers = {"Accept": REST_ACCEPT}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30)
    try:
        async with session.get(url, headers=headers, timeout=timeout) as response:
            if response.status == 404:
                return ""
            if response.status != 200:
                return f"; stored object not checked ({response.status})"
            digest = hashlib.sha256()
            async for chunk in response.content.iter_chunked(256 * 1024):
                digest.update(chunk)
        if digest.hexdigest() == object_id:
            return COMPLETE
        async with session.delete(url, headers=headers, timeout=timeout) as response:
            if response.status not in (200, 204, 404):
                return f"; partial object could not be removed ({response.status})"
    except (aiohttp.ClientError, TimeoutError, RuntimeError):  # RuntimeError: session closed
        return "; partial object not checked (backend error)"
    log.warning("removed the partial object left by a broken upload: %s", target.display)
    return REMOVED


class HasReason(Protocol):
    reason: str


def refused_upload_hook(
    generation: Generation, target: Target, outcome: HasReason
) -> Callable[[int], Awaitable[web.StreamResponse | None]]:
    """For forward(): a 403 over an existing object that proves partial becomes a 503."""

    async def on_status(status: int) -> web.StreamResponse | None:
        if status != 403:
            return None
        note = await discard_partial_upload(generation, target)
        if note != REMOVED:
            return None
        outcome.reason = "object left partial by an earlier upload" + REMOVED
        return web.Response(status=503, text="partial object removed; retry\n",
                            headers={"Retry-After": "1"})

    return on_status
