"""Answers to requests aiohttp cannot parse: a fixed short reason, one log line.

aiohttp's own answer echoes up to ~100 bytes of what the client sent and logs a
traceback that includes them, which can carry an `Authorization` value into the
log. Here neither the body nor the log line holds a byte of the request.
"""

from __future__ import annotations

import logging
import traceback

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler

from gateway.edge.admission import MAX_HEAD_BYTES
from gateway.edge.logs import log_reject

log = logging.getLogger("rclone_gateway")

# Per line (request line, one header field) and per request head. The whole head is
# bounded twice: while it arrives (gateway.edge.admission) and once parsed (head_too_large).
MAX_LINE_BYTES = 8190
MAX_FIELD_BYTES = 8190
MAX_HEADERS = 100


def head_too_large(request: web.BaseRequest) -> bool:
    """Whether the request line and header fields together exceed MAX_HEAD_BYTES."""
    size = len(request.method) + len(request.raw_path) + 12
    for name, value in request.raw_headers:
        size += len(name) + len(value) + 4
    return size > MAX_HEAD_BYTES


def classify(status: int, exc: BaseException | None) -> tuple[int, str]:
    """(status, short reason) for an error raised while reading a request head."""
    if isinstance(exc, LineTooLong):
        return 431, "request line or header field too long"
    if isinstance(exc, HttpProcessingError):
        if exc.message == "Too many headers received":
            return 431, "too many header fields"
        if exc.message.startswith("Missing 'Host'"):
            return 400, "malformed request: no Host header"
        if exc.message.startswith("Duplicate '"):
            return 400, "malformed request: repeated header field"
        if isinstance(exc, BadHttpMethod):
            return 400, "malformed request: bad method"
        if isinstance(exc, InvalidURLError):
            return 400, "malformed request: bad request target"
        if isinstance(exc, BadStatusLine):
            return 400, "malformed request: bad request line"
        if isinstance(exc, InvalidHeader):
            return 400, "malformed request: invalid header"
        return 400, "malformed request"
    if status == 500:
        return 500, "internal error"
    if status == 504:
        return 504, "timed out"
    return status, "bad request"


def _where(exc: BaseException | None) -> str:
    if exc is None or exc.__traceback__ is None:
        return "?"
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


class QuietRequestHandler(RequestHandler):
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        status, reason = classify(status, exc)
        if status == 500:
            # An error in the gateway's own code. Its message could quote request bytes:
            # log where it happened, not what it says.
            log.error("error handling a request: %s at %s", type(exc).__name__, _where(exc))
        log_reject(request.remote, status, reason)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        response = web.Response(status=status, text=reason + "\n")
        response.force_close()
        return response


class GatewayServer(web.Server):
    """aiohttp's low-level server, with QuietRequestHandler and the gateway's head limits."""

    def __init__(self, handler, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("max_line_size", MAX_LINE_BYTES)
        kwargs.setdefault("max_field_size", MAX_FIELD_BYTES)
        kwargs.setdefault("max_headers", MAX_HEADERS)
        super().__init__(handler, **kwargs)

    def __call__(self) -> RequestHandler:
        return QuietRequestHandler(self, loop=self._loop, **self._kwargs)
