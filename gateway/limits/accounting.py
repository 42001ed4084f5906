"""What the request path does to keep the count of stored bytes: the I/O around it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import aiohttp
from yarl import URL

from backends.kinds import Backend
from backends.manager import Generation
from gateway.access.paths import Target
from gateway.access.policy import REST_MEDIA_TYPE
from gateway.access.repository import RepositoryKey
from gateway.limits.limiter import Limiter

WEBDAV_WRITES = frozenset({"PUT", "DELETE", "MOVE", "COPY", "MKCOL"})
SIZE_TIMEOUT = 10.0


class StorageListings(Protocol):
    """What the count asks of the storage scan (`gateway.insight.scan.Scanner`), which
    the limits do not import: insight reads the limits, not the reverse."""

    def forget(self, keys: Iterable[RepositoryKey]) -> None: ...
    def scan_soon(self, key: RepositoryKey) -> None: ...


def written_by_webdav(method: str) -> bool:
    return method in WEBDAV_WRITES


def when_stored(action: Callable[[], object]) -> Callable[[int], None]:
    """An end-of-request callback that runs `action` when the answer was a success."""

    def ended(status: int) -> None:
        if 200 <= status < 300:
            action()

    return ended


def recount_after_webdav(limits: Limiter, scanner: StorageListings, method: str, target: Target,
                         destination: Target | None) -> Callable[[], None]:
    """What a node's successful WebDAV write does to the count: repositories removed whole
    hold nothing at once, those copied or moved are counted where they landed, and the
    storage is listed again where it was written."""

    def recount() -> None:
        gone, written = limits.webdav_written(
            method, target.segments, None if destination is None else destination.segments)
        scanner.forget(gone)
        for key in written:
            scanner.scan_soon(key)

    return recount


async def object_size(generation: Generation | None, backend: Backend,
                      target: Target) -> int | None:
    """The size of the object at `target` before a DELETE takes it away; None: unknown."""
    if generation is None or not generation.children[backend].ready:
        return None
    session = generation.session(backend)
    url = URL("http://backend" + target.path, encoded=True)
    try:
        async with session.head(url, headers={"Accept": REST_MEDIA_TYPE},
                                timeout=aiohttp.ClientTimeout(total=SIZE_TIMEOUT)) as response:
            if response.status != 200 or response.content_length is None:
                return None
            return response.content_length
    except (aiohttp.ClientError, TimeoutError, RuntimeError):  # RuntimeError: session closed
        return None
