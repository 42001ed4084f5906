"""Every refusal the gateway gives, as data: one table, `Refusal`.

A row says the answer's status, the short text of its body, the access log's reason,
its `Retry-After` and, where a metric counts it, its label there. The code that refuses
names a row (`x.refuse(Refusal.NO_CREDENTIALS)`); a row with `{}` in its text or reason
is given with the detail that fills them (`x.refuse(Refusal.FORBIDDEN, decision.reason)`),
which never changes its status, label or `Retry-After`. The one `Retry-After` not in
the table is the login throttle's, computed for each caller (`COMPUTED`).

Pure data: no I/O, nothing of the gateway imported. The answer is built from a row by
`gateway.forwarding.proxy.refusal_response`, and by `gateway.edge` for the answers given
before aiohttp has a request.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, unique
from typing import Final, Literal, NamedTuple, Protocol

# The row's `Retry-After` is given with each refusal (the login throttle's).
COMPUTED: Final = "computed"
REALM = 'Basic realm="ns8-rclone-gateway"'
_CHALLENGE = (("WWW-Authenticate", REALM),)
_AS_TEXT: Final = "as text"

RetryAfter = int | Literal["computed"] | None


class _Row(NamedTuple):
    status: int
    text: str | None  # the body, without its final newline; None: no body
    # The access log's; None: it keeps what the stages before noted (the policy's reason).
    reason: str | None
    retry_after: RetryAfter  # seconds
    label: str | None  # the `reason` label of rclone_gateway_auth_failures_total (401s)
    headers: tuple[tuple[str, str], ...]
    phrase: str | None  # the status line's reason phrase, for a status HTTP names none for


def _row(status: int, text: str | None, reason: str | None = _AS_TEXT, *,
         retry_after: RetryAfter = None, label: str | None = None,
         headers: tuple[tuple[str, str], ...] = (), phrase: str | None = None) -> _Row:
    """A row; its access log reason is its text unless another is given."""
    return _Row(status, text, text if reason == _AS_TEXT else reason, retry_after, label,
                headers, phrase)


@unique
class Refusal(Enum):
    """The gateway's own answers, other than the ones that serve a request."""

    # --- a connection or a request head refused before aiohttp hands a request on
    # (gateway/edge): in the access log, a reject line with the reason at most
    TOO_MANY_CONNECTIONS = _row(503, "too many connections", retry_after=1)
    HEADER_TIMEOUT = _row(408, "request header timeout")
    HEAD_TOO_LARGE = _row(431, "request head too large")  # as it arrives, and once parsed
    HTTP2_PREFACE = _row(400, "HTTP/2 is not served here: use HTTP/1.1")
    LINE_TOO_LONG = _row(431, "request line or header field too long")
    TOO_MANY_HEADER_FIELDS = _row(431, "too many header fields")
    MALFORMED_REQUEST = _row(400, "malformed request: {}")  # the part aiohttp found wrong
    UNPARSABLE_REQUEST = _row(400, "malformed request")  # aiohttp said nothing more
    BAD_REQUEST = _row(400, "bad request")
    INTERNAL_ERROR = _row(500, "internal error")  # the gateway's own code failed
    HANDLER_TIMEOUT = _row(504, "timed out")

    # --- the stages (gateway/pipeline/stages.py), in their order
    SOURCE_NOT_ALLOWED = _row(403, "source address not allowed")
    # /health and /metrics; /status
    METHOD_NOT_ALLOWED = _row(405, "method not allowed", None, headers=(("Allow", "GET, HEAD"),))
    STATUS_METHOD_NOT_ALLOWED = _row(405, "method not allowed", None,
                                     headers=(("Allow", "GET, HEAD, POST"),))
    BAD_TARGET = _row(400, "{}", "bad request target: {}")  # why the path is not canonical
    PROBE_NOT_SERVED = _row(503, "destination not served here", None, retry_after=5)
    NO_CREDENTIALS = _row(401, "authentication required", "no credentials", label="missing",
                          headers=_CHALLENGE)
    TOO_MANY_FAILED_LOGINS = _row(429, "too many failed logins, retry later",
                                  "too many failed logins", retry_after=COMPUTED)
    BAD_CREDENTIALS = _row(401, "authentication required", "bad credentials", label="invalid",
                           headers=_CHALLENGE)
    NOT_FOR_MODULES = _row(403, "forbidden: /status is for nodes", None)
    FORBIDDEN = _row(403, "forbidden: {}", "{}")  # the policy's reason, or a Destination's
    BAD_REFERENCE = _row(400, "bad request: {}", "{}")  # a malformed Destination or If
    TOO_MANY_IN_FLIGHT = _row(503, "too many requests in flight; retry",
                              "too many requests in flight", retry_after=1)
    TOO_LARGE = _row(413, "object too large: at most {} bytes for its kind",
                     "object too large for its kind")  # the limit, in bytes
    LENGTH_REQUIRED = _row(411, "Content-Length required for restic object uploads",
                           "upload without Content-Length")
    DIGEST_MISMATCH = _row(400, "body does not match the object name (sha256)",
                           "upload does not match its object name")
    OVER_QUOTA = _row(507, "quota exceeded: the repository holds {} of {}", "over quota")

    # --- while the request is sent on (gateway/pipeline/dispatch.py, upload.py, forwarding/)
    UNKNOWN_DESTINATION = _row(404, "unknown destination", None)
    BACKEND_UNAVAILABLE = _row(503, "backend unavailable", None, retry_after=2)  # not ready
    # the backend child failed the exchange (`backends.client.HopFailure`)
    BACKEND_UNREACHABLE = _row(502, "backend unavailable", retry_after=2)
    BACKEND_TIMEOUT = _row(504, "backend did not answer in time", retry_after=2)
    BACKEND_ERROR = _row(502, "backend error", retry_after=2)
    STORAGE_UNREACHABLE = _row(503, "storage unreachable from this node", retry_after=2)
    DESTINATION_NOT_SERVED = _row(503, "{}", "{}", retry_after=5)  # why no peer can serve it
    OBJECT_EXISTS = _row(403, "forbidden: the object exists already (append-only)",
                         "object exists already")
    PARTIAL_OBJECT_REMOVED = _row(503, "partial object removed; retry",
                                  "object left partial by an earlier upload", retry_after=1)
    BODY_STALLED = _row(408, "request body timeout", "client body stalled for {:.0f} s")
    CLIENT_CLOSED = _row(499, None, "client went away", phrase="Client Closed Request")
    CUT_BY_STOP = _row(499, None, "cut: gateway stopping", phrase="Client Closed Request")

    def __init__(self, status: int, text: str | None, reason: str | None,
                 retry_after: RetryAfter, label: str | None,
                 headers: tuple[tuple[str, str], ...], phrase: str | None) -> None:
        self.status = status
        self.text = text
        self.reason = reason
        self.retry_after = retry_after
        self.label = label
        self.headers = headers
        self.phrase = phrase

    def given(self, *detail: object, retry_after: int | None = None) -> Refused:
        """This refusal given: `detail` fills the `{}` of its text and reason; `retry_after`
        is the computed `Retry-After` of a row that says COMPUTED."""
        return Refused(self, detail, retry_after)


@dataclass(frozen=True, slots=True)
class Refused:
    """A refusal as given: its row, and what fills it."""

    refusal: Refusal
    detail: tuple[object, ...] = ()
    retry_after: int | None = None  # for a row whose `Retry-After` is COMPUTED

    def __post_init__(self) -> None:
        if (self.retry_after is None) == (self.refusal.retry_after == COMPUTED):
            raise ValueError(f"{self.refusal.name}: Retry-After is "
                             + ("computed: give it" if self.retry_after is None
                                else "in the table, not given"))

    @property
    def status(self) -> int:
        return self.refusal.status

    @property
    def text(self) -> str | None:
        """The answer's body, without its final newline."""
        text = self.refusal.text
        return None if text is None else text.format(*self.detail)

    @property
    def reason(self) -> str | None:
        """The access log's reason; None: the one noted before stays."""
        reason = self.refusal.reason
        return None if reason is None else reason.format(*self.detail)

    @property
    def headers(self) -> dict[str, str] | None:
        """The answer's own header fields, `Retry-After` last; None when it has none."""
        fields = dict(self.refusal.headers)
        retry_after = self.refusal.retry_after
        if retry_after == COMPUTED:
            retry_after = self.retry_after
        if retry_after is not None:
            fields["Retry-After"] = str(retry_after)
        return fields or None


class Notes(Protocol):
    """Where a refusal is noted for the access log and the metrics (an exchange's
    `Outcome`)."""

    reason: str
    refusal: Refusal | None


def record(notes: Notes, given: Refused, note: str = "") -> None:
    """Notes `given` as the request's refusal; `note` follows the access log's reason."""
    notes.refusal = given.refusal
    if (reason := given.reason) is not None:
        notes.reason = reason + note


def auth_failure_labels() -> tuple[str, ...]:
    """The labels an auth failure (401) is counted under, in the table's order."""
    return tuple(r.label for r in Refusal if r.label is not None)
