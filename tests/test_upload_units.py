"""`Upload` alone: what a module's upload over an object already stored is answered when
its body does not come whole. The storage side (whether the object exists, whether it is
whole) is given; the body is a generator."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
from identities import TRAEFIK_UUID

from backends.kinds import Backend
from gateway.access.paths import canonicalise
from gateway.access.refusals import Refusal
from gateway.forwarding.proxy import CLIENT_BODY_TIMEOUT, BodyRefused
from gateway.pipeline.upload import Repair, RepairOutcome, Upload

CONTENT = b"restic pack" * 100
OBJECT_ID = hashlib.sha256(CONTENT).hexdigest()
TARGET = f"/dest/traefik/{TRAEFIK_UUID}/data/{OBJECT_ID}"


def stored_whole_upload() -> Upload:
    upload = Upload(canonicalise(TARGET), OBJECT_ID, Backend.RESTIC_APPEND_ONLY, verified=True)

    async def exists() -> bool:
        return True

    async def repair() -> Repair:
        return Repair(RepairOutcome.COMPLETE)

    upload._exists = exists  # type: ignore[method-assign]
    upload.repair = repair  # type: ignore[method-assign]
    return upload


def answer_to(upload: Upload, body: AsyncIterator[bytes]) -> tuple[int, str]:
    notes = SimpleNamespace(reason="")

    async def read_body() -> AsyncIterator[bytes]:
        return upload.verify(body)

    response = asyncio.run(upload.over_existing_object(read_body, notes))
    assert response is not None
    return response.status, notes.reason


async def pieces(*chunks: bytes, then: BaseException | None = None) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
    if then is not None:
        raise then


def test_a_retry_with_the_same_bytes_is_answered_200_without_a_write() -> None:
    assert answer_to(stored_whole_upload(), pieces(CONTENT[:500], CONTENT[500:]))[0] == 200


def test_other_bytes_over_a_stored_object_are_refused_403() -> None:
    status, reason = answer_to(stored_whole_upload(), pieces(b"x" * len(CONTENT)))
    assert (status, reason) == (403, "object exists already")


@pytest.mark.parametrize("refusal", [BodyRefused(Refusal.BODY_STALLED, CLIENT_BODY_TIMEOUT)],
                         ids=["stalled body"])
def test_a_body_refused_for_another_reason_gets_its_own_answer(refusal: BodyRefused) -> None:
    # A retry whose client stalled mid-body was answered 403 "the object exists already",
    # as if it had other bytes: its 408 was lost.
    status, reason = answer_to(stored_whole_upload(), pieces(CONTENT[:500], then=refusal))
    assert (status, reason) == (refusal.status, refusal.reason)
