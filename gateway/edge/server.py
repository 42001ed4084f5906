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

from gateway.access.refusals import Refusal, Refused
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


def classify(status: int, exc: BaseException | None) -> Refused:
    """The refusal of an error raised while reading a request head (`status`, aiohttp's:
    400, or 500 and 504 for the handler's own failures)."""
    if isinstance(exc, LineTooLong):
        return Refusal.LINE_TOO_LONG.given()
    if isinstance(exc, HttpProcessingError):
        if exc.message == "Too many headers received":
            return Refusal.TOO_MANY_HEADER_FIELDS.given()
        if (part := _malformed_part(exc)) is not None:
            return Refusal.MALFORMED_REQUEST.given(part)
        return Refusal.UNPARSABLE_REQUEST.given()
    if status == 500:
        return Refusal.INTERNAL_ERROR.given()
    if status == 504:
        return Refusal.HANDLER_TIMEOUT.given()
    return Refusal.BAD_REQUEST.given()


def _malformed_part(exc: HttpProcessingError) -> str | None:
    """What the parser found wrong in a request head, in a few fixed words."""
    if exc.message.startswith("Missing 'Host'"):
        return "no Host header"
    if exc.message.startswith("Duplicate '"):
        return "repeated header field"
    if isinstance(exc, BadHttpMethod):
        return "bad method"
    if isinstance(exc, InvalidURLError):
        return "bad request target"
    if isinstance(exc, BadStatusLine):
        return "bad request line"
    if isinstance(exc, InvalidHeader):
        return "invalid header"
    return None


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
        refused = classify(status, exc)
        if refused.refusal is Refusal.INTERNAL_ERROR:
            # An error in the gateway's own code. Its message could quote request bytes:
            # log where it happened, not what it says.
            log.error("error handling a request: %s at %s", type(exc).__name__, _where(exc))
        log_reject(request.remote, refused)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        response = web.Response(status=refused.status, text=f"{refused.text}\n")
        response.force_close()
        return response


class GatewayServer(web.Server):
    """aiohttp's low-level server, with QuietRequestHandler and the gateway's head limits."""

    def __init__(self, handler, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("max_line_size", MAX_LINE_BYTES)
        kwargs.setdefault("max_field_size", MAX_FIELD_BYTES)
        kwargs.setdefault("max_headers", MAX_HEADERS)
        # A request body is passed on as the client sent it, Content-Encoding and all:
        # decoded, it would no longer match its length, nor a module's object its name.
        kwargs.setdefault("auto_decompress", False)
        super().__init__(handler, **kwargs)

    def __call__(self) -> RequestHandler:
        return QuietRequestHandler(self, loop=self._loop, **self._kwargs)
