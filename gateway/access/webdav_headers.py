"""The headers in which a WebDAV request names other resources (spec section 7).

`Destination` (COPY and MOVE) names a second path, to be written; the `If` header
may tag its conditions with the resources they are about (litmus's lock tests do).
Both name them by absolute URI under the authority the client used, which is not
the one the next hop (a backend, or a peer gateway) sees itself under: rclone's
WebDAV server ignores a tagged condition, and answers 502 to a Destination, whose
host is not its own request's `Host`.

Pure functions, no I/O. A Destination is an absolute URI under the client's
authority, or an absolute path. Its path is canonicalised by the same function as
the request target; it must stay under the request target's destination, and it is
put to the policy as a request of its own (the same caller and method on that path),
so who may write where is decided in one place. A tagged `If` resource under the
client's authority is canonicalised the same way (a condition writes nothing: no
policy decision); one under another authority names nothing here and goes on as it
came, as `rclone serve webdav` alone would ignore it too. What is sent on names the
next hop's own authority and the canonical path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.access.paths import PathError, Target, canonicalise
from gateway.access.policy import Request, decide
from gateway.access.refusals import Refusal

DESTINATION = "Destination"
IF = "If"
METHODS = frozenset({"COPY", "MOVE"})  # the methods that name a Destination
SAME_DESTINATION = "Destination must stay under the same destination"
RULE = "webdav-references"  # the access log's rule for a refusal made here

_ABSOLUTE_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)\Z", re.DOTALL)
_DEFAULT_PORTS = {"http": "80", "https": "443"}
# An `If` value's pieces: a quoted string (inside an entity tag), a bracketed
# coded URL or resource tag, a list's parentheses, or a run of anything else.
_IF_PIECE = re.compile(r'"[^"]*"|<[^<>]*>|[()]|[^"<>()]+')

Headers = CIMultiDictProxy[str] | CIMultiDict[str]
# One `If` value: text sent as it came, and tagged resources named here.
Condition = tuple[str | Target, ...]


class HeaderRefused(Exception):
    """A Destination or If header cannot be honoured: the refusal (BAD_REFERENCE or
    FORBIDDEN), and why."""

    def __init__(self, refusal: Refusal, reason: str) -> None:
        super().__init__(reason)
        self.refusal = refusal
        self.reason = reason

    @property
    def status(self) -> int:
        return self.refusal.status

    @property
    def text(self) -> str:
        """The body of the answer."""
        return self.refusal.given(self.reason).text or ""


def _bad(reason: str) -> HeaderRefused:
    """A malformed header: 400."""
    return HeaderRefused(Refusal.BAD_REFERENCE, reason)


@dataclass(frozen=True, slots=True)
class References:
    """The resources a request names besides its target, checked and canonical."""

    destination: Target | None = None
    conditions: tuple[Condition, ...] = ()  # every If value, when one names a resource here


def _authority(authority: str, scheme: str) -> str:
    """An authority as compared: lower case, without the scheme's default port."""
    return authority.lower().removesuffix(":" + _DEFAULT_PORTS[scheme])


def _split(uri: str) -> tuple[str, str, str] | None:
    """(lower-case scheme, authority, path) of an http or https URI; None for anything else."""
    match = _ABSOLUTE_URI.match(uri)
    if match is None or match.group(1).lower() not in _DEFAULT_PORTS:
        return None
    return match.group(1).lower(), match.group(2), match.group(3) or "/"


def _same_authority(scheme: str, authority: str, host: str | None) -> bool:
    return host is not None and _authority(authority, scheme) == _authority(host, scheme)


def _canonical(path: str, what: str) -> Target:
    if "?" in path or "#" in path:
        raise _bad(f"query or fragment in {what}")
    if not path.isascii():
        raise _bad(f"raw non-ASCII character in {what}")
    try:
        return canonicalise(path)
    except PathError as exc:
        raise _bad(f"{what}: {exc}") from None


def parse_destination(value: str, host: str | None) -> Target:
    """The canonical target a Destination value sent with `Host: host` names.

    Raises HeaderRefused (400) when the value is malformed, not canonical, carries a
    query or fragment, or names an authority other than `host`.
    """
    if value.startswith("/"):
        return _canonical(value, DESTINATION)
    if not _ABSOLUTE_URI.match(value):
        raise _bad("Destination is neither an absolute URI nor a path")
    parts = _split(value)
    if parts is None:
        raise _bad("Destination scheme is not http or https")
    scheme, authority, path = parts
    if not authority or "@" in authority:
        raise _bad("Destination authority is empty or has user information")
    if not _same_authority(scheme, authority, host):
        raise _bad("Destination names another host than the request")
    return _canonical(path, DESTINATION)


def check_destination(request: Request, values: list[str], host: str | None) -> Target:
    """The canonical Destination of a COPY or MOVE described by `request` (allowed by the
    policy for its own target already), from the header's `values` sent with `Host: host`.

    Raises HeaderRefused: 400 for a missing, repeated or malformed header; 403 when it
    leaves the request target's destination or the policy does not allow it.
    """
    if len(values) != 1:
        raise _bad(f"{request.method} needs exactly one Destination header")
    destination = parse_destination(values[0], host)
    source = request.target.segments[:1]
    if not source or destination.segments[:1] != source:
        raise HeaderRefused(Refusal.FORBIDDEN, SAME_DESTINATION)
    decision = decide(replace(request, target=destination))
    if not decision.allowed:
        raise HeaderRefused(Refusal.FORBIDDEN, f"Destination: {decision.reason}")
    return destination


def parse_if(value: str, host: str | None) -> Condition:
    """One `If` value, its resource tags under `host` canonical (RFC 4918 section 10.4).

    A resource tag is a bracketed URI outside the parenthesised lists (inside them,
    brackets hold state tokens). Raises HeaderRefused (400) for unbalanced brackets,
    quotes or parentheses, or a tagged path here that is not canonical.
    """
    pieces: list[str | Target] = []
    depth = 0
    end = 0
    for match in _IF_PIECE.finditer(value):
        if match.start() != end:
            break
        end = match.end()
        piece = match.group()
        if piece == "(":
            depth += 1
        elif piece == ")":
            depth -= 1
            if depth < 0:
                break
        elif piece.startswith("<") and depth == 0:
            parts = _split(piece[1:-1])
            if parts is not None and _same_authority(parts[0], parts[1], host):
                pieces.append(_canonical(parts[2], "If resource"))
                continue
        if pieces and isinstance(pieces[-1], str):
            pieces[-1] += piece
        else:
            pieces.append(piece)
    if end != len(value) or depth != 0:
        raise _bad("malformed If header")
    return tuple(pieces)


def references_of(request: Request, headers: Headers) -> References | None:
    """What a request allowed by the policy names besides its target; None when nothing.

    Raises HeaderRefused for a Destination or If header that cannot be honoured.
    """
    destination = None
    if request.method in METHODS:
        destination = check_destination(request, headers.getall(DESTINATION, []),
                                         headers.get("Host"))
    elif IF not in headers:
        return None  # nearly every request: nothing more to look at
    conditions = tuple(parse_if(value, headers.get("Host")) for value in headers.getall(IF, []))
    if not any(isinstance(piece, Target) for condition in conditions for piece in condition):
        conditions = ()
    if destination is None and not conditions:
        return None
    return References(destination, conditions)


def _url(authority: str, target: Target) -> str:
    return f"http://{authority}{target.path}"


def rewrite_references(headers: CIMultiDict[str], references: References,
                       authority: str) -> None:
    """Names the `references` in `headers` at `authority`: the Host the next hop is sent."""
    if references.destination is not None:
        headers[DESTINATION] = _url(authority, references.destination)
    if references.conditions:
        headers.popall(IF, None)
        for condition in references.conditions:
            headers.add(IF, "".join(
                piece if isinstance(piece, str) else f"<{_url(authority, piece)}>"
                for piece in condition))
