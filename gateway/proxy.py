"""Streams one request to a backend and its response back, in bounded memory (spec section 7)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.paths import Target

CHUNK = 256 * 1024
BACKEND_IDLE_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never sent to a backend: credentials, and what the gateway itself answers or sets.
REQUEST_DROP = HOP_BY_HOP | {"authorization", "host", "expect", "x-gateway-forwarded"}
RESPONSE_DROP = HOP_BY_HOP | {"x-gateway-backend", "server", "date"}


class _ProxyResponse(web.StreamResponse):
    # The status line and headers go out with the first piece of the body (or at the end):
    # one write, one segment for a small response instead of two.
    _send_headers_immediately = False


class UpstreamError(Exception):
    """The backend could not be reached or did not answer in time."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class UpstreamRefused(UpstreamError):
    """The upstream answered with a status the caller asked not to pass on (nothing was sent)."""


@dataclass
class Transfer:
    bytes_in: int = 0
    bytes_out: int = 0


def _connection_tokens(headers: CIMultiDict[str] | object) -> set[str]:
    values = headers.getall("Connection", [])  # type: ignore[attr-defined]
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def request_headers(incoming: CIMultiDict[str]) -> CIMultiDict[str]:
    named = _connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in incoming.items():
        lower = key.lower()
        if lower in REQUEST_DROP or lower in named:
            continue
        out.add(key, value)
    return out


BodyFilter = Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]
# The X-Gateway-Backend value of a response, fixed or derived from the upstream's headers.
BackendLabel = str | Callable[[CIMultiDictProxy[str]], str]
# Sees the backend's status before anything is sent; a response it returns is sent instead.
StatusHook = Callable[[int], Awaitable[web.StreamResponse | None]]


async def request_body(request: web.BaseRequest, transfer: Transfer) -> AsyncIterator[bytes]:
    content = request.content
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        transfer.bytes_in += len(chunk)
        yield chunk


async def forward(
    request: web.BaseRequest,
    target: Target,
    session: aiohttp.ClientSession,
    backend_label: BackendLabel,
    transfer: Transfer,
    body_filter: BodyFilter | None = None,
    *,
    base_url: str = "http://backend",
    headers: CIMultiDict[str] | None = None,
    idle_timeout: float = BACKEND_IDLE_TIMEOUT,
    refuse_statuses: Collection[int] = (),
    on_status: StatusHook | None = None,
) -> web.StreamResponse:
    """Streams `request` to `base_url` + the canonical target and the answer back.

    `headers` replaces the filtered client headers; an upstream status in
    `refuse_statuses` raises UpstreamRefused before anything is sent to the client.
    """
    if headers is None:
        headers = request_headers(request.headers)
    data: AsyncIterator[bytes] | None = None
    if request.body_exists:
        data = request_body(request, transfer)
        if body_filter is not None:
            data = body_filter(data)
    url = URL(base_url + target.path_and_query, encoded=True)
    timeout = aiohttp.ClientTimeout(
        total=None, connect=CONNECT_TIMEOUT, sock_connect=CONNECT_TIMEOUT,
        sock_read=idle_timeout,
    )
    try:
        upstream = await session.request(
            request.method, url, headers=headers, data=data, allow_redirects=False,
            timeout=timeout, compress=None, auto_decompress=False,
        )
    except TimeoutError as exc:
        raise UpstreamError(504, "backend did not answer in time") from exc
    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
        if request.content.exception() is not None:
            raise  # the client went away mid-upload
        raise UpstreamError(502, "backend unavailable") from exc
    except aiohttp.ClientPayloadError:
        raise
    except aiohttp.ClientError as exc:
        raise UpstreamError(502, "backend error") from exc

    async with upstream:
        if upstream.status in refuse_statuses:
            raise UpstreamRefused(upstream.status, f"answered {upstream.status}")
        if on_status is not None and (instead := await on_status(upstream.status)):
            return instead
        response = _ProxyResponse(status=upstream.status, reason=upstream.reason)
        named = _connection_tokens(upstream.headers)
        for key, value in upstream.headers.items():
            lower = key.lower()
            if lower not in RESPONSE_DROP and lower not in named:
                response.headers.add(key, value)
        response.headers["X-Gateway-Backend"] = (
            backend_label if isinstance(backend_label, str) else backend_label(upstream.headers)
        )
        await response.prepare(request)
        if request.method != "HEAD":
            try:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    transfer.bytes_out += len(chunk)
                    await response.write(chunk)
            except (TimeoutError, aiohttp.ClientError):
                # Headers are gone already: all that is left is to cut the response short.
                if request.transport is not None:
                    request.transport.close()
                return response
        await response.write_eof()
        return response


def plain(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=reason + "\n", headers=headers)

