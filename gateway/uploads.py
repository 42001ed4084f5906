"""Verified uploads: a module's restic object must hash to its own name.

restic names every object but `config` by the SHA-256 of its content. The body
streams to the backend as it arrives, except for the last chunk, which is held
back until the whole body is hashed: on a mismatch the filter raises, the
backend connection is aborted short of `Content-Length`, and `rclone serve
restic` discards the partial file. It does so a moment after it sees the
connection close, so the 400 waits until the backend no longer has the object;
an upload over an existing object is refused (403) before any byte is sent, as
the append-only backend would refuse it. Memory: one chunk.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from yarl import URL

from gateway.paths import Target
from gateway.policy import REST_MEDIA_TYPE, Protocol, Request, Shape, shape_of

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Below this, handing a chunk to a thread costs more than hashing it here.
THREAD_HASH_MIN = 64 * 1024


def expected_digest(request: Request) -> str | None:
    """The SHA-256 (hex) the body must have, or None when the request is not verified."""
    if (
        request.caller.is_node
        or request.protocol is not Protocol.REST
        or request.method != "POST"
        or request.target.query
        or shape_of(request.target) not in (Shape.OBJECT, Shape.LOCK)
    ):
        return None
    return request.target.segments[-1]


class DigestMismatch(Exception):
    """The body of a verified upload does not hash to the object's name."""


@dataclass
class UploadCheck:
    expected: str

    def matches_empty_body(self) -> bool:
        return hmac.compare_digest(self.expected, EMPTY_SHA256)

    async def body_matches(self, chunks: AsyncIterator[bytes]) -> bool:
        """Reads the whole body, keeping none of it: True when it hashes to the name."""
        try:
            async for _ in self.filter(chunks):
                pass
        except DigestMismatch:
            return False
        return True

    async def filter(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        digest = hashlib.sha256()
        loop = asyncio.get_running_loop()
        held: bytes | None = None
        async for chunk in chunks:
            # A large chunk is hashed in a thread (hashlib lets go of the GIL) while the
            # previous one goes to the backend: the event loop serves others meanwhile.
            hashing = (loop.run_in_executor(None, digest.update, chunk)
                       if len(chunk) >= THREAD_HASH_MIN else None)
            if hashing is None:
                digest.update(chunk)
            if held is not None:
                yield held
            if hashing is not None:
                await hashing
            held = chunk
        if not hmac.compare_digest(digest.hexdigest(), self.expected):
            raise DigestMismatch(self.expected)
        if held is not None:
            yield held


async def _status(session: aiohttp.ClientSession, target: Target, timeout: float) -> int | None:
    url = URL("http://backend" + target.path, encoded=True)
    try:
        async with session.head(url, headers={"Accept": REST_MEDIA_TYPE},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            return response.status
    except (TimeoutError, aiohttp.ClientError):
        return None


async def object_exists(session: aiohttp.ClientSession, target: Target) -> bool:
    """Whether the backend has the object already (then an append-only upload is refused
    anyway, and a mismatching body could not be told from the stored object)."""
    return await _status(session, target, 5.0) == 200


async def wait_until_absent(
    session: aiohttp.ClientSession, target: Target, *, within: float = 5.0,
    every: float = 0.02, settle: float = 0.25,
) -> bool:
    """Polls the backend until the object is gone (True) or `within` seconds passed (False).

    The aborted upload's handler in the backend may not even have created the file when the
    first check runs (a loaded machine delays it): the object counts as gone only when it is
    still absent `settle` seconds after it was first seen absent.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    absent_since: float | None = None
    while True:
        now = loop.time()
        if await _status(session, target, 1.0) == 404:
            if absent_since is None:
                absent_since = now
            elif now - absent_since >= settle:
                return True
        else:
            absent_since = None
        if now >= deadline:
            return False
        await asyncio.sleep(every)
