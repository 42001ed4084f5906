"""HTTP Basic credentials checked against the Redis ACL lines of `cluster/acls`."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

USER_PREFIXES = ("node/", "module/")


@dataclass(frozen=True, slots=True)
class AclUser:
    name: str
    enabled: bool
    nopass: bool
    password_hashes: tuple[bytes, ...]


def parse_acl_line(line: str) -> AclUser | None:
    """Parse one `ACL LIST` line (`user <name> on|off ... #<sha256 hex> ...`)."""
    tokens = line.split()
    if len(tokens) < 2 or tokens[0] != "user":
        return None
    enabled = False
    nopass = False
    hashes: list[bytes] = []
    for token in tokens[2:]:
        if token == "on":
            enabled = True
        elif token == "off":
            enabled = False
        elif token == "nopass":
            nopass = True
        elif token == "resetpass":
            nopass = False
            hashes.clear()
        elif token.startswith("#") and len(token) == 65:
            try:
                hashes.append(bytes.fromhex(token[1:]))
            except ValueError:
                continue
    return AclUser(tokens[1], enabled, nopass, tuple(hashes))


def parse_acls(lines: list[str] | set[str]) -> dict[str, AclUser]:
    users: dict[str, AclUser] = {}
    for line in lines:
        user = parse_acl_line(line)
        if user is not None and user.name.startswith(USER_PREFIXES):
            users[user.name] = user
    return users


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """Return (user, password) from an `Authorization: Basic` value, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error, UnicodeDecodeError, or a non-ASCII value
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def password_digest(password: str) -> bytes:
    return hashlib.sha256(password.encode("utf-8")).digest()


def verify(users: dict[str, AclUser], user: str, password: str) -> bool:
    """True when `user` may log in with `password` (spec section 4, step 4)."""
    return verify_digest(users, user, password_digest(password))


def verify_digest(users: dict[str, AclUser], user: str, digest: bytes) -> bool:
    """verify() for a password already hashed with password_digest()."""
    acl = users.get(user)
    if acl is None or not acl.enabled or acl.nopass or not acl.password_hashes:
        # Same amount of work as a real comparison so that timing does not tell
        # whether the user exists.
        hmac.compare_digest(digest, bytes(32))
        return False
    matched = False
    for expected in acl.password_hashes:
        matched |= hmac.compare_digest(digest, expected)
    return matched
