"""A POST of a restic object, from its precheck to its outcome: one `Upload` owns it.

Restic names every object but `config` by the SHA-256 of its content, which gives
the gateway two powers over `/<destination>/<app>/<module>/<type>/<id>`:

- **Verification** (a module's upload; nodes are trusted with full access). The
  body must say its length (411 otherwise); an empty body is checked at once. It
  streams on as it arrives, except for the last chunk, held back until the whole
  body is hashed: on a mismatch `verify` raises, the next hop's connection is
  aborted short of `Content-Length` and `rclone serve restic` discards the partial
  file. It does so a moment after it sees the connection close, so the 400 waits
  until the backend no longer has the object. An upload over an object that exists
  is answered before any byte is sent, as the append-only backend would answer it;
  unless the stored object is complete and the body is the same bytes (a retry
  whose answer was lost): then 200, and nothing is written. Memory: one chunk.
- **Repair** (every upload, a node's too). `rclone serve restic` writes an object
  under its final name while it arrives and removes it when the upload fails;
  killed in the middle, it cannot, and the half-written object stays. The
  append-only server would then refuse the client's retry (the object "exists")
  and the repository would hold a broken object. An object whose content does not
  hash to its name is certainly partial: it holds no backup data and is removed
  through the full-access server. That is done when an upload breaks on the backend
  side (before the client is answered), and when the append-only server refuses an
  upload because the object exists (the leftover of a crash the gateway did not
  see, such as its own): the client then gets a 503 and its retry goes through.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import Enum, auto

import aiohttp
from aiohttp import web
from yarl import URL

from backends.kinds import Backend
from backends.manager import Generation
from gateway.access.paths import Target
from gateway.access.policy import REST_MEDIA_TYPE, Request
from gateway.access.refusals import Notes, Refusal
from gateway.access.repository import Resource
from gateway.forwarding.proxy import (
    BodyFilter,
    BodyRefused,
    Splicing,
    StatusHook,
    plain,
    refuse,
)

# The name operators' log filters know this from.
log = logging.getLogger("rclone_gateway.repair")

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Seconds a repair waits for the full-access child to be back after a crash.
READY_WAIT = 10.0
RESTIC_BACKENDS = frozenset({Backend.RESTIC, Backend.RESTIC_APPEND_ONLY})

# Lets the request body in and gives it to be read here, through the exchange's body
# transforms (`Upload.verify` among them for a verified upload).
BodyReader = Callable[[], Awaitable[AsyncIterator[bytes]]]


class DigestMismatch(BodyRefused):
    """The body of a verified upload does not hash to the object's name."""

    def __init__(self) -> None:
        super().__init__(Refusal.DIGEST_MISMATCH)


class TooLarge(BodyRefused):
    """The body of an upload went past the most bytes its kind of object may hold."""

    def __init__(self, limit: int) -> None:
        super().__init__(Refusal.TOO_LARGE, limit)


def at_most(limit: int) -> BodyFilter:
    """A body transform that refuses the body once more than `limit` bytes came: a body of
    unknown length (chunked) is cut there and never sent on whole."""

    async def capped(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in chunks:
            seen += len(chunk)
            if seen > limit:
                raise TooLarge(limit)
            yield chunk

    return capped


class RepairOutcome(Enum):
    """What a repair found under the object's name, and did about it."""

    ABSENT = auto()  # nothing stored
    LEFT_TO_BACKEND = auto()  # its generation stopped in order: rclone removed it itself
    COMPLETE = auto()  # the stored content hashes to the name: kept
    REMOVED = auto()  # partial, removed
    BACKEND_NOT_BACK = auto()  # the full-access child did not come back in time
    NOT_CHECKED = auto()  # reading it back answered another status
    NOT_REMOVED = auto()  # partial, but the removal answered another status
    BACKEND_ERROR = auto()  # the full-access child failed meanwhile


# The access log's reason ends with the note of a repair made on the way.
_NOTES = {
    RepairOutcome.ABSENT: "",
    RepairOutcome.LEFT_TO_BACKEND: "",
    RepairOutcome.COMPLETE: "; stored object is complete",
    RepairOutcome.REMOVED: "; partial object removed",
    RepairOutcome.BACKEND_NOT_BACK: "; backend not back, partial object not checked",
    RepairOutcome.NOT_CHECKED: "; stored object not checked ({status})",
    RepairOutcome.NOT_REMOVED: "; partial object could not be removed ({status})",
    RepairOutcome.BACKEND_ERROR: "; partial object not checked (backend error)",
}


@dataclass(frozen=True, slots=True)
class Repair:
    outcome: RepairOutcome
    status: int | None = None  # the backend's answer, for NOT_CHECKED and NOT_REMOVED

    @property
    def note(self) -> str:
        return _NOTES[self.outcome].format(status=self.status)


class Upload:
    """One POST of a restic object to a Restic REST backend, a node's or a module's."""

    def __init__(self, target: Target, object_id: str, backend: Backend,
                 verified: bool) -> None:
        self.target = target  # `/<destination>/<app>/<module uuid>/<type>/<id>`
        self.object_id = object_id  # 64 lowercase hex: the SHA-256 of the content
        self.backend = backend
        self.verified = verified  # a module's: the body must hash to the object's name
        self.body_matched = False  # set by `verify` once the whole body hashed to the name
        self._generation: Generation | None = None
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def of(cls, request: Request, backend: Backend) -> Upload | None:
        """The upload `request` is, sent to `backend` as the policy decided; None if none."""
        if request.method != "POST" or backend not in RESTIC_BACKENDS:
            return None
        target = request.target
        where = target.address
        if where is None or where.resource is not Resource.OBJECT or where.object_id is None:
            return None
        return cls(target, where.object_id, backend,
                   not request.caller.is_node and not target.query)

    # --- before the body is let in, wherever it goes ---------------------------------------

    def precheck(self, content_length: int | None, notes: Notes) -> web.Response | None:
        """A verified upload must say its length; an empty one is checked here and now."""
        if not self.verified:
            return None
        if content_length is None:
            return refuse(notes, Refusal.LENGTH_REQUIRED.given())
        if content_length == 0 and not hmac.compare_digest(self.object_id, EMPTY_SHA256):
            return refuse(notes, Refusal.DIGEST_MISMATCH.given())
        return None

    async def verify(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The body transform of a verified upload: raises DigestMismatch before its end."""
        digest = hashlib.sha256()
        held: bytes | None = None
        async for chunk in chunks:
            # Hashed here, not in a thread: handing each piece to a thread and back cost a
            # third more CPU than the hash itself (docs/performance.md); a piece is one read
            # of the client's socket (256 KiB at most), some 0.2 ms of the event loop.
            digest.update(chunk)
            if held is not None:
                yield held
            held = chunk
        if not hmac.compare_digest(digest.hexdigest(), self.object_id):
            raise DigestMismatch()
        self.body_matched = True
        if held is not None:
            yield held

    def splicing(self) -> Splicing:
        """`verify` for a body moved in the kernel: the same hash, the same refusal, before
        the last piece goes on."""
        digest = hashlib.sha256()

        def matches() -> None:
            if not hmac.compare_digest(digest.hexdigest(), self.object_id):
                raise DigestMismatch()
            self.body_matched = True

        return Splicing(see=digest.update, before_last=matches)

    # --- at a backend of this node ---------------------------------------------------------

    def stored_by(self, generation: Generation) -> None:
        """The upload goes to `generation`'s backend (not to a peer, which owns it there)."""
        self._generation = generation
        self._session = generation.session(self.backend)

    async def over_existing_object(
        self, read_body: BodyReader, notes: Notes
    ) -> web.StreamResponse | None:
        """A verified upload over an object that exists: what the append-only server would
        answer, decided without sending it the body. None when there is no such object."""
        if not self.verified or not await self._exists():
            return None
        repair = await self.repair()
        if repair.outcome is RepairOutcome.REMOVED:
            return _partial_removed(repair, notes)
        # restic retries an upload whose answer it lost (a backend or peer died after storing
        # it). Stored bytes and sent bytes both hash to the object's name: they are the same
        # bytes, so the retry succeeds and nothing is written.
        try:
            same = (repair.outcome is RepairOutcome.COMPLETE
                    and await self._reads_whole(await read_body()))
        except BodyRefused as refused:  # not a mismatch: the body stalled, or grew too large
            return refuse(notes, refused.given)
        if same:
            notes.reason = "object stored already with the same content"
            return plain(200, "object stored already")
        return refuse(notes, Refusal.OBJECT_EXISTS.given())

    def refused_status_hook(self, notes: Notes) -> StatusHook:
        """For forward(): a 403 over an existing object that proves partial becomes a 503."""

        async def on_status(status: int) -> web.StreamResponse | None:
            if status != 403:
                return None
            repair = await self.repair()
            if repair.outcome is not RepairOutcome.REMOVED:
                return None
            return _partial_removed(repair, notes)

        return on_status

    async def after_refused_body(self) -> str:
        """The body was cut short of its end: waits until the backend has dropped what it
        received. Returns a note for the access log reason."""
        if await self._wait_until_absent():
            return ""
        return (await self.repair()).note

    async def repair(self) -> Repair:
        """After an upload broke or was refused: removes the stored object if it is partial."""
        generation = self._bound()
        if generation.stopping:
            return Repair(RepairOutcome.LEFT_TO_BACKEND)
        if not await _wait_ready(generation, Backend.RESTIC):
            return Repair(RepairOutcome.BACKEND_NOT_BACK)
        session = generation.session(Backend.RESTIC)
        url = self._url()
        headers = {"Accept": REST_MEDIA_TYPE}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30)
        try:
            async with session.get(url, headers=headers, timeout=timeout) as response:
                if response.status == 404:
                    return Repair(RepairOutcome.ABSENT)
                if response.status != 200:
                    return Repair(RepairOutcome.NOT_CHECKED, response.status)
                digest = hashlib.sha256()
                async for chunk in response.content.iter_chunked(256 * 1024):
                    digest.update(chunk)
            if digest.hexdigest() == self.object_id:
                return Repair(RepairOutcome.COMPLETE)
            async with session.delete(url, headers=headers, timeout=timeout) as response:
                if response.status not in (200, 204, 404):
                    return Repair(RepairOutcome.NOT_REMOVED, response.status)
        except (aiohttp.ClientError, TimeoutError, RuntimeError):  # RuntimeError: session closed
            return Repair(RepairOutcome.BACKEND_ERROR)
        log.warning("removed the partial object left by a broken upload: %s",
                    self.target.display)
        return Repair(RepairOutcome.REMOVED)

    async def _reads_whole(self, body: AsyncIterator[bytes]) -> bool:
        """Reads `body` (through `verify`) to its end, keeping none of it: True when it
        hashed to the object's name."""
        try:
            async for _ in body:
                pass
        except DigestMismatch:
            return False
        return self.body_matched

    def _bound(self) -> Generation:
        if self._generation is None:
            raise RuntimeError("the upload is not at a backend of this node")
        return self._generation

    def _url(self) -> URL:
        return URL("http://backend" + self.target.path, encoded=True)

    async def _status(self, timeout: float) -> int | None:
        assert self._session is not None
        try:
            async with self._session.head(
                    self._url(), headers={"Accept": REST_MEDIA_TYPE},
                    timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                return response.status
        except (TimeoutError, aiohttp.ClientError):
            return None

    async def _exists(self) -> bool:
        """Whether the backend has the object already (then an append-only upload is refused
        anyway, and a mismatching body could not be told from the stored object)."""
        return await self._status(5.0) == 200

    async def _wait_until_absent(
        self, *, within: float = 5.0, every: float = 0.02, settle: float = 0.25
    ) -> bool:
        """Polls the backend until the object is gone (True) or `within` seconds passed (False).

        The aborted upload's handler in the backend may not even have created the file when
        the first check runs (a loaded machine delays it): the object counts as gone only when
        it is still absent `settle` seconds after it was first seen absent.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        absent_since: float | None = None
        while True:
            now = loop.time()
            if await self._status(1.0) == 404:
                if absent_since is None:
                    absent_since = now
                elif now - absent_since >= settle:
                    return True
            else:
                absent_since = None
            if now >= deadline:
                return False
            await asyncio.sleep(every)


def _partial_removed(repair: Repair, notes: Notes) -> web.Response:
    return refuse(notes, Refusal.PARTIAL_OBJECT_REMOVED.given(), repair.note)


async def _wait_ready(generation: Generation, backend: Backend) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_WAIT
    while not generation.children[backend].ready:
        if loop.time() > deadline or generation.stopping:
            return False
        await asyncio.sleep(0.05)
    return True
