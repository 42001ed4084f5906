"""The table of refusals (`gateway/access/refusals.py`): what each refusal puts on the
wire and in the access log, pinned byte for byte; the answers built from it at the edge;
the metric labels taken from it."""

from __future__ import annotations

import pytest
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong

from gateway.access.refusals import COMPUTED, REALM, Refusal, Refused, auth_failure_labels
from gateway.edge import admission
from gateway.edge.server import classify
from gateway.forwarding.proxy import refusal_response
from gateway.status.metrics import GatewayMetrics

CHALLENGE = {"WWW-Authenticate": REALM}
CLIENT_CLOSED_PHRASE = "Client Closed Request"

# name: (detail, status, body, header fields, access log reason); a `Retry-After` of
# TOO_MANY_FAILED_LOGINS given as 37 (the throttle's).
WIRE: dict[str, tuple[tuple[object, ...], int, bytes, dict[str, str], str | None]] = {
    "TOO_MANY_CONNECTIONS": ((), 503, b"too many connections\n", {"Retry-After": "1"},
                             "too many connections"),
    "HEADER_TIMEOUT": ((), 408, b"request header timeout\n", {}, "request header timeout"),
    "HEAD_TOO_LARGE": ((), 431, b"request head too large\n", {}, "request head too large"),
    "HTTP2_PREFACE": ((), 400, b"HTTP/2 is not served here: use HTTP/1.1\n", {},
                      "HTTP/2 is not served here: use HTTP/1.1"),
    "LINE_TOO_LONG": ((), 431, b"request line or header field too long\n", {},
                      "request line or header field too long"),
    "TOO_MANY_HEADER_FIELDS": ((), 431, b"too many header fields\n", {},
                               "too many header fields"),
    "MALFORMED_REQUEST": (("no Host header",), 400, b"malformed request: no Host header\n",
                          {}, "malformed request: no Host header"),
    "UNPARSABLE_REQUEST": ((), 400, b"malformed request\n", {}, "malformed request"),
    "BAD_REQUEST": ((), 400, b"bad request\n", {}, "bad request"),
    "INTERNAL_ERROR": ((), 500, b"internal error\n", {}, "internal error"),
    "HANDLER_TIMEOUT": ((), 504, b"timed out\n", {}, "timed out"),
    "SOURCE_NOT_ALLOWED": ((), 403, b"source address not allowed\n", {},
                           "source address not allowed"),
    "METHOD_NOT_ALLOWED": ((), 405, b"method not allowed\n", {"Allow": "GET, HEAD"}, None),
    "STATUS_METHOD_NOT_ALLOWED": ((), 405, b"method not allowed\n",
                                  {"Allow": "GET, HEAD, POST"}, None),
    "BAD_TARGET": (("dot segment in path",), 400, b"dot segment in path\n", {},
                   "bad request target: dot segment in path"),
    "PROBE_NOT_SERVED": ((), 503, b"destination not served here\n", {"Retry-After": "5"},
                         None),
    "NO_CREDENTIALS": ((), 401, b"authentication required\n", CHALLENGE, "no credentials"),
    "TOO_MANY_FAILED_LOGINS": ((), 429, b"too many failed logins, retry later\n",
                               {"Retry-After": "37"}, "too many failed logins"),
    "BAD_CREDENTIALS": ((), 401, b"authentication required\n", CHALLENGE, "bad credentials"),
    "NOT_FOR_MODULES": ((), 403, b"forbidden: /status is for nodes\n", {}, None),
    "FORBIDDEN": (("modules may not delete backup data",), 403,
                  b"forbidden: modules may not delete backup data\n", {},
                  "modules may not delete backup data"),
    "BAD_REFERENCE": (("malformed If header",), 400, b"bad request: malformed If header\n",
                      {}, "malformed If header"),
    "TOO_MANY_IN_FLIGHT": ((), 503, b"too many requests in flight; retry\n",
                           {"Retry-After": "1"}, "too many requests in flight"),
    "TOO_LARGE": ((65536,), 413, b"object too large: at most 65536 bytes for its kind\n", {},
                  "object too large for its kind"),
    "LENGTH_REQUIRED": ((), 411, b"Content-Length required for restic object uploads\n", {},
                        "upload without Content-Length"),
    "DIGEST_MISMATCH": ((), 400, b"body does not match the object name (sha256)\n", {},
                        "upload does not match its object name"),
    "OVER_QUOTA": (("600 B", "1000 B"), 507,
                   b"quota exceeded: the repository holds 600 B of 1000 B\n", {}, "over quota"),
    "UNKNOWN_DESTINATION": ((), 404, b"unknown destination\n", {}, None),
    "BACKEND_UNAVAILABLE": ((), 503, b"backend unavailable\n", {"Retry-After": "2"}, None),
    "BACKEND_UNREACHABLE": ((), 502, b"backend unavailable\n", {"Retry-After": "2"},
                            "backend unavailable"),
    "BACKEND_TIMEOUT": ((), 504, b"backend did not answer in time\n", {"Retry-After": "2"},
                        "backend did not answer in time"),
    "BACKEND_ERROR": ((), 502, b"backend error\n", {"Retry-After": "2"}, "backend error"),
    "STORAGE_UNREACHABLE": ((), 503, b"storage unreachable from this node\n",
                            {"Retry-After": "2"}, "storage unreachable from this node"),
    "DESTINATION_NOT_SERVED": (("destination not served here and no other node is known",),
                               503, b"destination not served here and no other node is known\n",
                               {"Retry-After": "5"},
                               "destination not served here and no other node is known"),
    "OBJECT_EXISTS": ((), 403, b"forbidden: the object exists already (append-only)\n", {},
                      "object exists already"),
    "PARTIAL_OBJECT_REMOVED": ((), 503, b"partial object removed; retry\n",
                               {"Retry-After": "1"}, "object left partial by an earlier upload"),
    "BODY_STALLED": ((120.0,), 408, b"request body timeout\n", {},
                     "client body stalled for 120 s"),
    "CLIENT_CLOSED": ((), 499, b"", {}, "client went away"),
    "CUT_BY_STOP": ((), 499, b"", {}, "cut: gateway stopping"),
}


def test_every_refusal_is_pinned() -> None:
    assert [r.name for r in Refusal] == list(WIRE)


@pytest.mark.parametrize("name", list(WIRE))
def test_a_refusal_answers_as_it_always_did(name: str) -> None:
    detail, status, body, fields, reason = WIRE[name]
    refusal = Refusal[name]
    given = refusal.given(*detail, retry_after=37 if name == "TOO_MANY_FAILED_LOGINS" else None)
    response = refusal_response(given)
    assert response.status == status
    assert (response.body or b"") == body
    headers = dict(response.headers)
    content_type = headers.pop("Content-Type", None)
    assert content_type == ("text/plain; charset=utf-8" if body else None)
    assert headers == fields
    assert given.reason == reason
    if status == 499:
        assert response.reason == CLIENT_CLOSED_PHRASE


def test_retry_after_is_the_tables_but_the_throttles() -> None:
    with pytest.raises(ValueError):
        Refusal.TOO_MANY_FAILED_LOGINS.given()
    with pytest.raises(ValueError):
        Refusal.TOO_MANY_IN_FLIGHT.given(retry_after=3)
    computed = [r.name for r in Refusal if r.retry_after == COMPUTED]
    assert computed == ["TOO_MANY_FAILED_LOGINS"]


def test_the_edges_canned_answers_are_the_same_bytes() -> None:
    assert admission.TOO_MANY_CONNECTIONS_RESPONSE == (
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 21\r\n\r\ntoo many connections\n")
    assert admission.REQUEST_TIMEOUT_RESPONSE == (
        b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 23\r\n\r\nrequest header timeout\n")
    assert admission.HEAD_TOO_LARGE_RESPONSE == (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 23\r\n\r\nrequest head too large\n")
    assert admission.HTTP2_PREFACE_RESPONSE == (
        b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 40\r\n\r\nHTTP/2 is not served here: use HTTP/1.1\n")


@pytest.mark.parametrize(("status", "exc", "answer"), [
    (400, LineTooLong(b"x", "8190"), (431, "request line or header field too long")),
    (400, HttpProcessingError(message="Too many headers received"),
     (431, "too many header fields")),
    (400, HttpProcessingError(message="Missing 'Host' header"),
     (400, "malformed request: no Host header")),
    (400, HttpProcessingError(message="Duplicate 'Content-Length' header found."),
     (400, "malformed request: repeated header field")),
    (400, BadHttpMethod("G(T"), (400, "malformed request: bad method")),
    (400, HttpProcessingError(message="something else"), (400, "malformed request")),
    (400, None, (400, "bad request")),
    (500, RuntimeError("x"), (500, "internal error")),
    (504, None, (504, "timed out")),
], ids=["line", "fields", "host", "duplicate", "method", "other", "none", "500", "504"])
def test_unparsable_requests_get_the_same_short_reasons(
        status: int, exc: BaseException | None, answer: tuple[int, str]) -> None:
    refused = classify(status, exc)
    assert (refused.status, refused.text) == answer
    assert refused.reason == refused.text


def test_auth_failures_are_counted_under_the_tables_labels() -> None:
    assert auth_failure_labels() == ("missing", "invalid")
    metrics = GatewayMetrics(lambda: None)  # type: ignore[arg-type,return-value]

    def observe(refusal: Refusal | None) -> None:
        metrics.observe(caller="anonymous", protocol="-", method="GET", decision="-",
                        status=401, duration=0.001, bytes_in=0, bytes_out=0, refusal=refusal)

    observe(Refusal.NO_CREDENTIALS)
    observe(Refusal.BAD_CREDENTIALS)
    observe(Refusal.BAD_CREDENTIALS)
    observe(None)  # a peer's 401, passed on

    def count(label: str) -> float:
        samples = [s for family in metrics.auth_failures.collect() for s in family.samples
                   if s.name.endswith("_total") and s.labels == {"reason": label}]
        return samples[0].value if samples else 0.0

    assert (count("missing"), count("invalid"), count("other")) == (1.0, 2.0, 1.0)


def test_a_refused_is_given_with_its_detail() -> None:
    given = Refusal.FORBIDDEN.given("no {braces} are read")
    assert isinstance(given, Refused)
    assert given.text == "forbidden: no {braces} are read"
    assert given.reason == "no {braces} are read"
