"""Micro-benchmark for `make bench`: what the limit stages cost a request, no limit set.

The three stages of issue 13 (`concurrency_cap`, `storage_quota`, `bandwidth`) run
in-process on real `Exchange`s of the requests a restic backup made (read from the
gateway's access log), with the gateway's own `Limiter` and no Limits key in Redis,
and their end-of-request callbacks run after. The stages also put every body
through the bandwidth transform, which with no limit set only passes the pieces on:
its cost is timed per stream and per piece, and counted for every request's answer
and every request body. The pieces' count is not in the access log; it is taken as
one per `ASSUMED_PIECE` bytes, so the estimate errs high: counted in a gateway, a
restic backup of 128 MiB sent 120 pieces, most of 1 to 2 MiB, where 64 KiB pieces
make 2,048.

Times are the CPU time of this thread (the best of several passes), so the load of
the machine weighs less than on the end-to-end comparison.

    python bench/limit_checks_cost.py   # a made-up backup's requests, for a quick look
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from gateway.access.paths import canonicalise
from gateway.access.policy import Request, decide, detect_protocol, module_caller, node_caller
from gateway.access.repository import RepositoryKey
from gateway.cluster.state import ClusterState
from gateway.limits.limiter import Limiter
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.stages import bandwidth, concurrency_cap, storage_quota

LIMIT_STAGES = (concurrency_cap, storage_quota, bandwidth)
REST_ACCEPT = "application/vnd.x.restic.rest.v2"
ASSUMED_PIECE = 64 * 1024  # bytes per piece of a body, for the count of pieces
REPLAYS = 50  # each request of the backup goes through the stages this many times a pass
PASSES = 5  # the best pass counts
PIECES = 20000  # pieces per pass of the transform's timing


@dataclass(frozen=True)
class Logged:
    """One access-log line: a request the gateway answered."""

    user: str
    method: str
    path: str
    status: int
    bytes_in: int
    bytes_out: int


def logged(entry: dict) -> Logged:
    """One access line (a JSON object with a method and a status) as a Logged."""
    return Logged(entry.get("user", "-"), entry["method"], entry.get("path", "-"),
                  int(entry["status"]), int(entry.get("bytes_in") or 0),
                  int(entry.get("bytes_out") or 0))


@dataclass
class _Request:
    """What the three stages read of aiohttp's request (a mocked one costs more to build
    than the stages to run, and its attributes more to read than a real request's)."""

    method: str
    path: str
    content_length: int | None
    body_exists: bool


class _Listings:
    """The storage listings the quota stage asks for (`BackupInsight` in the gateway)."""

    def __init__(self) -> None:
        self._due: dict[RepositoryKey, float] = {}

    def scan_soon(self, key: RepositoryKey) -> None:
        self._due[key] = time.monotonic() + 5.0

    def forget(self, keys: Iterable[RepositoryKey]) -> None:
        for key in keys:
            self._due.pop(key, None)


class _Serving:
    def served_here(self, uuid: str) -> bool:
        return True


class _Services:
    """What the three stages use of the gateway: its Limiter, the storage listings, where
    destinations are served."""

    def __init__(self, module_uuids: dict[str, str]) -> None:
        self.state = ClusterState(module_uuids=dict(module_uuids))
        self.limits = Limiter(lambda: self.state)
        self.insight = _Listings()
        self.serving = _Serving()
        self.stopping = False

    def cluster_state(self) -> ClusterState:
        return self.state


@dataclass(frozen=True)
class Cost:
    requests: int
    stages_s: float  # the three stages and their callbacks, for all the requests
    streams_s: float  # the bandwidth transform set up on each body
    pieces_s: float  # and each piece passed through it
    per_request_us: float
    per_stream_us: float
    per_piece_us: float

    @property
    def total_s(self) -> float:
        return self.stages_s + self.streams_s + self.pieces_s


def _exchange(services: _Services, logged: Logged) -> Exchange:
    has_body = logged.method in ("POST", "PUT") and logged.bytes_in > 0
    request = _Request(logged.method, logged.path, logged.bytes_in if has_body else None,
                       has_body)
    x = Exchange(request, services)  # type: ignore[arg-type]
    x.target = canonicalise(logged.path)
    state = services.state
    x.caller = (node_caller(logged.user) if logged.user.startswith("node/")
                else module_caller(logged.user, state.module_uuids, state.restore_grants))
    described = Request(x.caller, detect_protocol(REST_ACCEPT, x.target.query),
                        logged.method, x.target)
    x.decided(described, decide(described))
    _ = x.goes_to_peer  # found once per request whatever the stages: not theirs to pay
    return x


async def _stages_pass(exchanges: list[tuple[Exchange, int]]) -> float:
    started = time.thread_time()
    for x, status in exchanges:
        for stage in LIMIT_STAGES:
            if await stage(x) is not None:
                raise RuntimeError(f"a limit stage answered {x.request.method} "
                                   f"{x.request.path} with no limit set")
        for ended in x.at_end:
            ended(status)
    return time.thread_time() - started


async def _pieces(count: int, piece: bytes) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield piece


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    async for _ in chunks:
        pass


async def _transform_costs(services: _Services) -> tuple[float, float]:
    """Seconds per stream and per piece that the no-limit bandwidth transform adds."""
    limits = services.limits
    piece = bytes(ASSUMED_PIECE)

    async def timed(count: int, shaped: bool, streams: int = 1) -> float:
        best = math.inf
        for _ in range(PASSES):
            started = time.thread_time()
            for _ in range(streams):
                chunks = _pieces(count, piece)
                if shaped:
                    chunks = limits.shaping("upload", "bench1")(chunks)
                await _drain(chunks)
            best = min(best, time.thread_time() - started)
        return best

    streams = PIECES
    per_stream = (await timed(0, True, streams) - await timed(0, False, streams)) / streams
    per_piece = (await timed(PIECES, True) - await timed(PIECES, False)) / PIECES
    return max(per_stream, 0.0), max(per_piece, 0.0)


def measure(requests: Iterable[Logged], module_uuids: dict[str, str]) -> Cost:
    """The CPU the limit stages would take for `requests`, with no limit set."""
    requests = list(requests)

    async def run() -> Cost:
        services = _Services(module_uuids)
        await services.limits.on_state(services.state)  # no Limits key: defaults
        best = math.inf
        for _ in range(PASSES):
            exchanges = [(_exchange(services, r), r.status)
                         for _ in range(REPLAYS) for r in requests]
            best = min(best, await _stages_pass(exchanges))
        stages_s = best / REPLAYS
        per_stream, per_piece = await _transform_costs(services)
        streams = sum(1 + (r.bytes_in > 0) for r in requests)  # the answer, and a body sent
        pieces = sum(math.ceil(r.bytes_in / ASSUMED_PIECE) + math.ceil(r.bytes_out / ASSUMED_PIECE)
                     for r in requests)
        return Cost(len(requests), stages_s, streams * per_stream, pieces * per_piece,
                    stages_s / max(len(requests), 1) * 1e6, per_stream * 1e6, per_piece * 1e6)

    try:
        import uvloop  # the gateway's event loop
    except ImportError:  # pragma: no cover
        return asyncio.run(run())
    return uvloop.run(run())


if __name__ == "__main__":
    uuid = "5c1d6c1e-2f87-4e7b-9a34-0a1d9f9e4b01"
    base = f"/0d2b7ab6-8f8b-4c43-a1d3-7f3f5f7c1a01/bench/{uuid}"
    sample = [Logged("module/bench1", "POST", f"{base}/data/{i:064x}", 200, 12 << 20, 0)
              for i in range(40)]
    sample += [Logged("module/bench1", "GET", f"{base}/config", 200, 0, 155),
               Logged("module/bench1", "GET", f"{base}/keys/", 200, 0, 80),
               Logged("module/bench1", "POST", f"{base}/locks/{1:064x}", 200, 300, 0),
               Logged("module/bench1", "DELETE", f"{base}/locks/{1:064x}", 200, 0, 0)]
    cost = measure(sample, {"bench1": uuid})
    print(cost, f"total {cost.total_s * 1e3:.2f} ms")
