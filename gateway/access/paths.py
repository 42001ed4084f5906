"""Canonical request targets (spec section 5).

The raw request target is decoded exactly once; everything downstream (the
policy decision, the routing, the request sent to a backend) uses the
`Target` computed here and nothing else. Its repository address
(`gateway.access.repository`) is split once with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import quote

from gateway.access.repository import RepositoryAddress, address_of

MAX_SEGMENT_BYTES = 255
MAX_PATH_BYTES = 4096

# Characters that stay literal in a canonical path; everything else is
# percent-encoded with upper-case hex.
_PATH_SAFE = "-._~!$&'()*+,;=:@"
_HEX = frozenset(b"0123456789abcdefABCDEF")
_RAW_FORBIDDEN = re.compile(rb"[\x00-\x20\x7f-\xff\\#]")
_DECODED_FORBIDDEN = re.compile(rb"[\x00-\x1f\x7f\\]")
# Segments that quote() would leave as they are (restic's uuids and hex names).
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9_.~-]*\Z")


class PathError(ValueError):
    """The request target is not canonical; the message is the reason sent to the client."""


@dataclass(frozen=True, slots=True)
class Target:
    segments: tuple[str, ...]
    trailing_slash: bool
    query: str
    # The canonical, percent-encoded path sent to the backend (computed once).
    path: str = field(init=False, repr=False, compare=False)
    # Where it lies in the repository layout, split once here for every reader.
    address: RepositoryAddress | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.segments:
            path = "/"
        else:
            path = "/" + "/".join(
                s if _PLAIN_SEGMENT.match(s) else quote(s, safe=_PATH_SAFE)
                for s in self.segments
            )
            if self.trailing_slash:
                path += "/"
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "address", address_of(self.segments, self.trailing_slash))

    @property
    def path_and_query(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def display(self) -> str:
        """The decoded path, for logs and error messages."""
        if not self.segments:
            return "/"
        return "/" + "/".join(self.segments) + ("/" if self.trailing_slash else "")


def _unescape(raw: bytes, what: str) -> bytes:
    if b"%" not in raw:
        return raw
    out = bytearray()
    i = 0
    n = len(raw)
    while i < n:
        c = raw[i]
        if c == 0x25:  # '%'
            if i + 2 >= n:
                raise PathError(f"malformed percent-escape in {what}")
            h1, h2 = raw[i + 1], raw[i + 2]
            if h1 not in _HEX or h2 not in _HEX:
                raise PathError(f"malformed percent-escape in {what}")
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(c)
            i += 1
    return bytes(out)


def _segment(raw: bytes) -> str:
    if b"%" not in raw:  # no escape: canonicalise() has checked every raw byte already
        if raw in (b".", b".."):
            raise PathError("dot segment in path")
        if len(raw) > MAX_SEGMENT_BYTES:
            raise PathError("path segment too long")
        return raw.decode("ascii")
    decoded = _unescape(raw, "path")
    if b"/" in decoded:
        raise PathError("escaped '/' in path")
    if _DECODED_FORBIDDEN.search(decoded):
        raise PathError("escaped control character or backslash in path")
    if decoded in (b".", b".."):
        raise PathError("dot segment in path")
    if len(decoded) > MAX_SEGMENT_BYTES:
        raise PathError("path segment too long")
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise PathError("path is not valid UTF-8") from None


def canonicalise(raw_target: str | bytes) -> Target:
    """Parse an origin-form request target into its canonical `Target`.

    Raises PathError (answered with 400) for anything spec section 5 rejects.
    """
    if isinstance(raw_target, str):
        if not raw_target.isascii():
            raise PathError("raw non-ASCII character in request target")
        raw = raw_target.encode("ascii")
    else:
        raw = raw_target
    if not raw.startswith(b"/"):
        raise PathError("request target is not origin-form")
    raw_path, sep, raw_query = raw.partition(b"?")
    if _RAW_FORBIDDEN.search(raw_path):
        raise PathError("raw control character, space, non-ASCII, backslash or '#' in path")
    if len(raw_path) > 3 * MAX_PATH_BYTES:
        raise PathError("path too long")
    parts = raw_path[1:].split(b"/")
    trailing = len(parts) > 1 and parts[-1] == b""
    if trailing or parts == [b""]:
        parts = parts[:-1]
    if any(p == b"" for p in parts):
        raise PathError("empty path segment")
    segments = tuple(_segment(p) for p in parts)
    if sum(len(s.encode()) + 1 for s in segments) > MAX_PATH_BYTES:
        raise PathError("path too long")
    return Target(segments, trailing, _query(raw_query) if sep else "")


def _query(raw: bytes) -> str:
    if _RAW_FORBIDDEN.search(raw):
        raise PathError("raw control character, space or non-ASCII in query")
    decoded = _unescape(raw, "query")
    if _DECODED_FORBIDDEN.search(decoded.replace(b"\\", b"")):
        raise PathError("escaped control character in query")
    try:
        decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise PathError("query is not valid UTF-8") from None
    return raw.decode("ascii")
