"""Operator commands: `explain` (why would the gateway allow or refuse this request?) and
`config show` (the rendered rclone configuration, secrets masked).

Both read the live configuration from Redis once; the decisions themselves are
pure functions of that snapshot, taken in the order of the request pipeline
(spec section 4) with the source address left out (the operator names no source).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from backends.rclone_conf import render
from gateway.access.credentials import USER_PREFIXES
from gateway.access.paths import PathError, canonicalise
from gateway.access.policy import (
    Caller,
    Request,
    WireProtocol,
    decide,
    detect_protocol,
    is_probe,
    module_caller,
    node_caller,
)
from gateway.cluster.redis_source import connect, read_state
from gateway.cluster.state import ClusterState
from gateway.limits.config import LimitsKeeper

OPERATIONS_PATHS = frozenset({"/health", "/health/", "/metrics", "/metrics/"})
MASK = "***"

# rclone.conf keys whose values are shown: they name a backend or a place, never a credential.
# Everything else is masked, user names included (for several providers, e.g. the
# `access_key_id` of s3 or the `account` of b2, the "user" half is itself a credential).
SHOWN_KEYS = frozenset({
    "type", "provider", "vendor", "region", "location_constraint", "endpoint", "url", "host",
    "port", "remote", "upstreams", "env_auth", "acl", "storage_class",
})
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
# An rclone connection string (`:s3,secret_access_key=...:bucket`) carries parameters inline.
_INLINE_PARAMETERS = re.compile(r",\s*[A-Za-z_][\w-]*\s*=")
_HEADER = re.compile(r"^\s*\[[^\]]*\]\s*$")
_KEY_VALUE = re.compile(r"^(\s*)([^=\s][^=]*?)\s*=\s*(.*)$")


@dataclass(frozen=True)
class Explanation:
    allowed: bool
    status: int | None  # the gateway's own answer; None when the request goes to a backend
    rule: str
    reason: str
    protocol: str = "-"
    path: str = "-"
    backend: str = "-"

    @property
    def exit_code(self) -> int:
        return 0 if self.allowed else 1


def login_refusal(state: ClusterState, user: str) -> str | None:
    """Why `user` cannot log in whatever the password, or None when it can."""
    if not user.startswith(USER_PREFIXES):
        return "only node/<id> and module/<id> users may log in"
    acl = state.users.get(user)
    if acl is None:
        return "user not in cluster/acls"
    if not acl.enabled:
        return "user is off"
    if acl.nopass:
        return "nopass users may not log in"
    if not acl.password_hashes:
        return "user has no password"
    return None


def explain(
    state: ClusterState,
    user: str,
    method: str,
    raw_target: str,
    *,
    rest: bool = False,
    depth: str | None = None,
) -> Explanation:
    """The gateway's decision for a request from a trusted source with valid credentials."""
    method = method.upper()
    if raw_target in OPERATIONS_PATHS:
        return Explanation(True, None, "operations",
                           "no credentials needed from trusted sources", path=raw_target)
    try:
        target = canonicalise(raw_target)
    except PathError as exc:
        return Explanation(False, 400, "canonical-path", f"bad request target: {exc}",
                           path=raw_target)
    path = target.display
    if is_probe(method, target):
        return Explanation(True, None, "probe", "health probe needs no credentials", path=path)

    refusal = login_refusal(state, user)
    if refusal is not None:
        return Explanation(False, 401, "authentication", refusal, path=path)
    caller: Caller = (
        node_caller(user) if user.startswith("node/")
        else module_caller(user, state.module_uuids, state.restore_grants)
    )
    protocol = WireProtocol.REST if rest else detect_protocol("", target.query)
    decision = decide(Request(caller, protocol, method, target, depth))
    return Explanation(
        decision.allowed,
        None if decision.allowed else 403,
        decision.rule,
        decision.reason,
        protocol=protocol.value,
        path=target.path_and_query if target.query else path,
        backend=decision.backend.value if decision.backend else "-",
    )


@dataclass(frozen=True)
class LimitsExplanation:
    lines: tuple[str, ...]
    status: int | None  # 507 or 503 when a limit refuses the request now


def explain_limits(state: ClusterState, user: str, method: str, result: Explanation, *,
                   size: int | None = None, used: int | None = None,
                   in_flight: int | None = None) -> LimitsExplanation:
    """The limits an allowed request meets (spec section 2, Limits): its user's cap of
    requests in flight, and for a module's upload its repository's quota. `used` and
    `in_flight` are the gateway's own figures, when it could be asked."""
    if not result.allowed or result.backend == "-":
        return LimitsExplanation((), None)
    limits = LimitsKeeper().update(state.limits)
    is_node = user.startswith("node/")
    lines, status = [], None
    cap = limits.cap(is_node)
    if cap is None:
        lines.append(f"in flight: no cap for {user}")
    else:
        now = "" if in_flight is None else f"; {in_flight} now"
        lines.append(f"in flight: at most {cap} requests of {user} at once, more get 503{now}")
        if in_flight is not None and in_flight >= cap:
            status = 503
    segments = result.path.split("?", 1)[0].strip("/").split("/")
    uploads = method.upper() == "POST" and len(segments) >= 4 and segments[3] != "locks"
    if uploads and not is_node:
        quota = limits.quota(segments[0], user.removeprefix("module/"))
        if quota is None:
            lines.append("quota: none for this repository")
        else:
            held = "unknown (the gateway could not be asked)" if used is None else (
                f"{used} bytes")
            lines.append(f"quota: {quota} bytes; the repository holds {held}; an upload "
                         "that would take it over is answered 507")
            if used is not None and size is not None and used + size > quota:
                lines.append(f"quota: an upload of {size} bytes would take it over")
                status = 507
    return LimitsExplanation(tuple(lines), status)


def format_explanation(result: Explanation, user: str, method: str,
                       limits: LimitsExplanation | None = None) -> str:
    if result.status is not None:
        answer = str(result.status)
    elif limits is not None and limits.status is not None:
        answer = f"{limits.status} (a limit, see above)"
    elif result.backend != "-":
        answer = "forwarded to the backend"
    else:
        answer = "answered by the gateway"
    return "\n".join([
        f"decision: {'allow' if result.allowed else 'deny'}",
        f"rule: {result.rule}",
        f"reason: {result.reason}",
        f"request: {user} {method.upper()} {result.path} ({result.protocol})",
        f"backend: {result.backend}",
        *(limits.lines if limits else ()),
        f"answer: {answer}",
    ]) + "\n"


def mask_value(key: str, value: str) -> str:
    if not value:
        return value
    if key.strip().lower() not in SHOWN_KEYS or _INLINE_PARAMETERS.search(value):
        return MASK
    return _URL_USERINFO.sub(MASK + "@", value)


def mask_config(text: str) -> str:
    """rclone.conf text with every value masked but those of SHOWN_KEYS (URL credentials
    removed from those too). A masked value is replaced whole by a constant: nothing of it,
    not even its length, can be read back."""
    out: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or _HEADER.match(line):
            out.append(line)
        elif stripped.startswith(("#", ";")):
            out.append(stripped[0] + " " + MASK)
        elif match := _KEY_VALUE.match(line):
            indent, key, value = match.groups()
            out.append(f"{indent}{key} = {mask_value(key, value)}")
        else:
            out.append(MASK)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def masked_rendered_config(state: ClusterState, node_id: str, local_repo: str) -> str:
    """What `config show` prints: the rclone.conf the backends of node `node_id` would get."""
    rendered = render(state.destinations, state.node_vpn.get(node_id), local_repo, empty_root="-")
    notes = [f"# rclone configuration of node {node_id}; secret values shown as {MASK}"]
    for uuid, host in sorted(rendered.placement.peer.items()):
        notes.append(f"# {uuid}: hosted by the node at {host}, not served here")
    for uuid, reason in sorted(rendered.placement.invalid.items()):
        notes.append(f"# {uuid}: not served: {reason}")
    if not rendered.placement.local:
        notes.append("# no destination served here")
    return "\n".join(notes) + "\n\n" + mask_config(rendered.text)


async def read_live_state(redis_url: str) -> ClusterState:
    client = connect(redis_url)
    try:
        return await read_state(client)
    finally:
        await client.aclose()
