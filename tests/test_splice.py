"""backends.splice on real sockets: a body moved in the kernel arrives whole, is seen
whole, keeps its last piece back when told to, and fails as its sockets do."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest
import uvloop

from backends import splice

SIZE = 3 * splice.PIPE_SIZE + 12345  # several pieces and a short last one


class Stalled(Exception):
    pass


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    for sock in (client, accepted):
        sock.setblocking(False)
    return client, accepted


async def _send(sock: socket.socket, data: bytes, close: bool = False) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    if close:
        sock.close()


async def _receive(sock: socket.socket) -> bytes:
    loop, got = asyncio.get_running_loop(), bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        got += chunk
    return bytes(got)


def _unix_pair() -> tuple[socket.socket, socket.socket]:
    pair = socket.socketpair()
    for sock in pair:
        sock.setblocking(False)  # as an event loop's transport keeps its socket
    return pair


def _run(coroutine):  # type: ignore[no-untyped-def]
    return uvloop.run(coroutine)


@pytest.mark.parametrize("seen", [True, False], ids=["seen", "unseen"])
def test_a_body_arrives_whole_and_is_seen_whole(seen: bool) -> None:
    data = os.urandom(SIZE)

    async def main() -> tuple[bytes, str, list[str], int, int]:
        sender, source = _tcp_pair()
        destination, receiver = _unix_pair()
        digest, at_last, counts = hashlib.sha256(), [], [0, 0]
        sending = asyncio.ensure_future(_send(sender, data))
        receiving = asyncio.ensure_future(_receive(receiver))
        await splice.pump(
            source.fileno(), destination.fileno(), SIZE,
            source_idle=30, destination_idle=30,
            see=digest.update if seen else None,
            before_last=lambda: at_last.append(digest.hexdigest()),
            taken=lambda n: counts.__setitem__(0, counts[0] + n),
            moved=lambda n: counts.__setitem__(1, counts[1] + n),
        )
        await sending
        destination.close()
        got = await receiving
        for sock in (sender, source, receiver):
            sock.close()
        return got, digest.hexdigest(), at_last, *counts

    got, digest, at_last, taken, moved = _run(main())
    assert got == data
    assert (taken, moved) == (SIZE, SIZE)
    if seen:
        assert digest == at_last[0] == hashlib.sha256(data).hexdigest()


def test_a_refusal_before_the_last_piece_keeps_it_back() -> None:
    data = os.urandom(SIZE)

    def refuse() -> None:
        raise Stalled("refused")

    async def main() -> int:
        sender, source = _tcp_pair()
        destination, receiver = _unix_pair()
        receiving = asyncio.ensure_future(_receive(receiver))
        await _send(sender, data)
        with pytest.raises(Stalled):
            await splice.pump(source.fileno(), destination.fileno(), SIZE,
                              source_idle=30, destination_idle=30, before_last=refuse)
        destination.close()
        received = len(await receiving)
        for sock in (sender, source, receiver):
            sock.close()
        return received

    received = _run(main())
    assert 0 < received < SIZE  # the pieces before the last went on, the last did not


def test_a_source_that_ends_early_and_one_that_stalls() -> None:
    async def main() -> None:
        sender, source = _tcp_pair()
        destination, receiver = _unix_pair()
        receiving = asyncio.ensure_future(_receive(receiver))
        await _send(sender, b"x" * 1000, close=True)
        with pytest.raises(splice.SourceEnded):
            await splice.pump(source.fileno(), destination.fileno(), 5000,
                              source_idle=30, destination_idle=30)
        sender, source = _tcp_pair()
        await _send(sender, b"x" * 1000)  # and then nothing
        with pytest.raises(Stalled):
            await splice.pump(source.fileno(), destination.fileno(), 5000,
                              source_idle=0.3, source_stalled=lambda: Stalled(),
                              destination_idle=30)
        destination.close()
        assert len(await receiving) == 2000
        for sock in (sender, source, receiver):
            sock.close()

    _run(main())


def test_a_destination_that_goes_away() -> None:
    async def main() -> None:
        sender, source = _tcp_pair()
        destination, receiver = _tcp_pair()
        receiver.close()
        sending = asyncio.ensure_future(_send(sender, os.urandom(SIZE)))
        with pytest.raises(splice.DestinationGone):
            await splice.pump(source.fileno(), destination.fileno(), SIZE,
                              source_idle=30, destination_idle=30)
        sending.cancel()
        for sock in (sender, source, destination):
            sock.close()

    _run(main())


def test_a_paced_body_is_granted_exactly_its_length() -> None:
    """A source slower than the grants: a grant the socket could not fill at once is used
    up by the next pieces before another is asked for, so the limits are charged for the
    body's bytes and no more."""
    trickle, size = 10_000, 300_000

    async def main() -> tuple[list[int], int]:
        sender, source = _tcp_pair()
        destination, receiver = _unix_pair()
        grants: list[int] = []

        async def pace(want: int) -> int:
            grants.append(min(want, 64 * 1024))
            return grants[-1]

        async def send_slowly() -> None:
            for _ in range(size // trickle):
                await _send(sender, bytes(trickle))
                await asyncio.sleep(0.001)

        sending = asyncio.ensure_future(send_slowly())
        receiving = asyncio.ensure_future(_receive(receiver))
        await splice.pump(source.fileno(), destination.fileno(), size,
                          source_idle=30, destination_idle=30, pace=pace)
        await sending
        destination.close()
        got = len(await receiving)
        for sock in (sender, source, receiver):
            sock.close()
        return grants, got

    grants, got = _run(main())
    assert got == size
    assert sum(grants) == size, f"granted {sum(grants)} for {size} bytes ({len(grants)} grants)"
