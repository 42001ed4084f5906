"""The last stage: an allowed request goes to a backend child of this node, or to a peer.

Both ways let the body in the same way (`Exchange.admit_body`: `Expect: 100-continue`,
then the exchange's body transforms), and answer a body a transform refused the same
way: a concern on the request body is added once, for both.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from backends.client import RETRYABLE_METHODS, BodyFailed, HopFailure, NextHopError
from backends.kinds import Backend
from backends.manager import Generation
from backends.process import RcloneChild
from gateway.access.refusals import Refusal, record
from gateway.forwarding.peers import unavailable
from gateway.forwarding.proxy import (
    NEXT_HOP_REFUSALS,
    BodyFilter,
    BodyRefused,
    StatusHook,
    forward,
)
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.upload import Upload

# Seconds a request waits for its backend child to come back from a restart before 503.
CHILD_RESTART_WAIT = 5.0
# Seconds the supervisor takes, at most, to see that a child it thought running has exited.
CHILD_EXIT_NOTICE = 0.2
# Seconds a request for remote storage that sends no body may wait for its answer's head
# before it brings that destination's probe forward: a lost route makes requests hang, not
# fail.
SLOW_ANSWER = 2.0


class StorageUnreachable(Exception):
    """The probe found the destination's storage unreachable from here before the request
    was answered."""


async def dispatch(x: Exchange) -> web.StreamResponse:
    """To this node's backend when it serves the destination (or the root), else a peer."""
    segments = x.target.segments
    uuid = segments[0] if segments else None
    if uuid is not None and x.goes_to_peer:
        return await to_peer(x, uuid)
    return await to_backend(x, uuid)


async def to_peer(x: Exchange, uuid: str, body_filter: BodyFilter | None = None,
                  *, admitted: bool = False) -> web.StreamResponse:
    """A destination not served here: sent on to the peer gateway that can serve it (spec
    section 7), which checks the request again. `admitted`: the body was let in already
    (a request moved here from this node's backend), through `body_filter`, and is
    spliced without this node's pace."""
    dest = x.state.destinations.get(uuid)
    if dest is None:
        return x.refuse(Refusal.UNKNOWN_DESTINATION)
    peers = x.services.peers
    chosen = peers.route_request(dest, x.source, x.request.headers)
    if not chosen.peers:
        answer = unavailable(chosen.refusal)
    else:
        if not admitted:
            body_filter = await x.admit_body()
        splicing = x.body_splicing_for_peer() if admitted else x.body_splicing
        answer = await peers.forward(x.request, x.target, dest, chosen, x.outcome.transfer,
                                     x.references, body_filter=body_filter,
                                     body_splicing=splicing)
    x.outcome.backend = answer.backend
    if answer.refused is not None:
        record(x.outcome, answer.refused)
    return answer.response


async def to_backend(x: Exchange, uuid: str | None) -> web.StreamResponse:
    """Streams the request to this node's backend child the policy chose, and back."""
    backend = x.backend
    generation = x.services.backends.current
    if generation is None or not generation.children[backend].ready:
        generation = await _ready_generation(x, backend)
        if generation is None:
            return x.refuse(Refusal.BACKEND_UNAVAILABLE)
    label = x.services.backends.label(backend)
    x.outcome.backend = label
    x.outcome.served_here = True
    upload = x.upload
    remote = uuid is not None and x.services.serving.is_remote(uuid)
    # Counted before the first await: a reload now retires this generation only after us.
    with generation.use():
        try:
            if upload is not None:
                upload.stored_by(generation)
                if (answer := await upload.over_existing_object(x.read_body,
                                                                x.outcome)) is not None:
                    return answer
            body_filter = await x.admit_body()
            for attempt in (1, 2):
                child = generation.children[backend]
                try:
                    on_status = upload.refused_status_hook(x.outcome) if upload else None
                    if remote:
                        assert uuid is not None
                        response = await _forward_to_remote(x, uuid, generation, label,
                                                            body_filter, on_status)
                    else:
                        response = await forward(
                            x.request, x.target, generation.pool(backend), label,
                            x.outcome.transfer, body_filter=body_filter,
                            backend_timeout=x.services.backends.timeout,
                            on_status=on_status, references=x.references,
                            response_filter=x.response_transform, body_held=x.body_held,
                            request_splicing=x.body_splicing,
                            response_splicing=x.response_splicing,
                        )
                except BodyFailed as exc:
                    return await _body_failed(x, exc, upload)
                except NextHopError as exc:
                    # The child died under a request it had not begun to act on: the request
                    # waits for the restart, like one that came a moment later.
                    if (attempt == 1 and await _child_died(x, exc, child)
                            and (restarted := await _ready_generation(x, backend)) is not None):
                        generation = restarted
                        continue
                    # Noted now: the reason stays if the request goes to a peer instead.
                    answer = x.refuse(NEXT_HOP_REFUSALS[exc.kind])
                    x.services.serving.observe(uuid, answer.status)
                    if remote and await _storage_lost(x, uuid):
                        raise StorageUnreachable from exc
                    # a broken upload, not a slow one: the child may have left it partial
                    if exc.kind is not HopFailure.TIMED_OUT and upload is not None:
                        x.outcome.reason += (await upload.repair()).note
                    return answer
                x.services.serving.observe(uuid, response.status)
                return response
            raise AssertionError("unreachable")
        except StorageUnreachable:
            pass
    assert uuid is not None
    # The probe agrees: this node does not reach the storage. A request that has sent no
    # body goes to a peer that can serve the destination; one whose body is gone cannot be
    # sent again: restic retries it, and its retry goes to a peer.
    x.outcome.served_here = False
    if x.outcome.transfer.bytes_in:
        return x.refuse(Refusal.STORAGE_UNREACHABLE)
    return await to_peer(x, uuid, x.body_filter_for_peer(), admitted=True)


async def _storage_lost(x: Exchange, uuid: str | None) -> bool:
    """Whether a request that failed on this node's backend may go to a peer instead: it
    has sent no body, and the probe (brought forward) finds the storage unreachable."""
    if uuid is None or x.outcome.transfer.bytes_in:
        return False
    return not await x.services.serving.confirm_reached(uuid)


async def _forward_to_remote(x: Exchange, uuid: str, generation: Generation, label: str,
                             body_filter: BodyFilter | None,
                             on_status: StatusHook | None) -> web.StreamResponse:
    """`forward` for a destination on remote storage, watching the storage meanwhile.

    A request without a body whose answer's head has not come within SLOW_ANSWER brings
    the destination's probe forward; the time its answer's body takes counts for nothing.
    When the probe finds the storage unreachable before the answer's head came, a request
    that has sent no body is given up here (StorageUnreachable); one that has sent some
    cannot be sent again, and goes on. So is a 5xx answer, when the request sent no body
    and a probe brought forward agrees.

    An upload has no such timer: its answer comes once the storage has taken the body's
    last bytes, seconds after the gateway sent them on a slow link (they wait in the
    buffers on the way), and each would bring a billed probe forward. It cannot be moved
    to a peer either; its failure (5xx, timeout) brings the probe forward.
    """
    head_seen = False
    answer_started = asyncio.Event()

    async def watch_status(status: int) -> web.StreamResponse | None:
        nonlocal head_seen
        answer_started.set()
        if status >= 500 and await _storage_lost(x, uuid):
            raise StorageUnreachable
        head_seen = True
        return await on_status(status) if on_status is not None else None

    async def watch_answer() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(answer_started.wait(), SLOW_ANSWER)
            return
        serving.probe_soon(uuid)

    serving = x.services.serving
    backend = x.backend
    forwarding = asyncio.ensure_future(forward(
        x.request, x.target, generation.pool(backend), label, x.outcome.transfer,
        body_filter=body_filter, backend_timeout=x.services.backends.timeout,
        on_status=watch_status, references=x.references,
        response_filter=x.response_transform, body_held=x.body_held,
        request_splicing=x.body_splicing, response_splicing=x.response_splicing,
    ))
    slow_answer = None if x.request.body_exists else asyncio.ensure_future(watch_answer())
    went_down = asyncio.ensure_future(serving.went_down(uuid))
    try:
        await asyncio.wait({forwarding, went_down}, return_when=asyncio.FIRST_COMPLETED)
        if forwarding.done() or head_seen or x.outcome.transfer.bytes_in:
            return await forwarding
        raise StorageUnreachable
    finally:
        went_down.cancel()
        if slow_answer is not None:
            slow_answer.cancel()
        if not forwarding.done():
            forwarding.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await forwarding


async def _body_failed(x: Exchange, exc: BodyFailed, upload: Upload | None) -> web.Response:
    """The body did not reach its end: a transform refused it, or the client went away."""
    if isinstance(exc.cause, BodyRefused):
        note = await upload.after_refused_body() if upload is not None else ""
        return x.refuse(exc.cause.given, note=note)
    return x.refuse(x.cut())


async def _child_died(x: Exchange, exc: NextHopError, child: RcloneChild) -> bool:
    """Whether `exc` came from `child` dying, at a point where sending the request again
    does no harm: refused (nothing sent), or cut on a request that may be repeated."""
    if x.outcome.transfer.bytes_in or not (
            exc.kind is HopFailure.UNREACHABLE
            or (exc.kind is HopFailure.BROKEN and x.request.method in RETRYABLE_METHODS)):
        return False
    await asyncio.sleep(CHILD_EXIT_NOTICE)
    return not child.ready or child.proc is None or child.proc.returncode is not None


async def _ready_generation(x: Exchange, backend: Backend) -> Generation | None:
    """The serving generation once its `backend` child answers, waiting a little.

    A crashed child is back within a second or two; restic gives up on a 503 to the
    first request of a run, so a request for it waits rather than fail at once.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CHILD_RESTART_WAIT
    while True:
        generation = x.services.backends.current
        if generation is not None and generation.children[backend].ready:
            return generation
        if loop.time() >= deadline or x.services.stopping:
            return None
        await asyncio.sleep(0.05)
