"""Renders the rclone configuration served by the backends (spec section 3).

Every destination's own section (named by its uuid) plus one `combine` remote
that presents them all as one tree: `/<destination uuid>/<app>/<module uuid>`.
The result holds secrets: it is written only into the private runtime
directory and never logged.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from backends.destinations import Destination

TREE_REMOTE = "gateway-tree"
_HEADER = re.compile(r"^\s*\[[^\]]*\]\s*$")
_UUID_LIKE = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.-]*\Z")


@dataclass(frozen=True)
class Placement:
    """Where each destination is served from, seen from this node."""

    local: dict[str, str] = field(default_factory=dict)  # uuid -> upstream ("remote:path")
    peer: dict[str, str] = field(default_factory=dict)  # uuid -> VPN address of hosting node
    invalid: dict[str, str] = field(default_factory=dict)  # uuid -> reason (no secrets)


@dataclass(frozen=True)
class RenderedConfig:
    text: str = field(repr=False)
    placement: Placement
    tree_root: str  # what `rclone serve` is pointed at

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def section_body(section: str) -> list[str]:
    """The key lines of one rclone.conf section, without its `[name]` header."""
    lines: list[str] = []
    seen_header = False
    for line in section.splitlines():
        if _HEADER.match(line):
            if seen_header or lines:
                break  # a second section: not ours to serve
            seen_header = True
            continue
        if line.strip():
            lines.append(line.rstrip())
    return lines


def _quote_upstream(spec: str) -> str:
    return '"' + spec.replace('"', '""') + '"'


def place(
    destinations: Mapping[str, Destination],
    own_address: str | None,
    local_repo: str,
    skip: frozenset[str] = frozenset(),
) -> Placement:
    """`own_address`: this node's VPN address; a cluster destination hosted there is served
    from `local_repo`."""
    placement = Placement()
    for uuid in sorted(destinations):
        dest = destinations[uuid]
        if not _UUID_LIKE.match(uuid):
            placement.invalid[uuid] = "destination id is not a plain name"
        elif dest.provider == "cluster":
            host = dest.cluster_host
            if host and own_address and host == own_address:
                placement.local[uuid] = local_repo
            elif host:
                placement.peer[uuid] = host
            else:
                placement.invalid[uuid] = "cluster destination without a node address"
        elif uuid in skip:
            placement.invalid[uuid] = "remote failed to start"
        elif not dest.rclone_section or not section_body(dest.rclone_section):
            placement.invalid[uuid] = "no rclone configuration"
        else:
            placement.local[uuid] = f"{uuid}:{dest.basepath}"
    return placement


def render(
    destinations: Mapping[str, Destination],
    own_address: str | None,
    local_repo: str,
    empty_root: str,
    skip: frozenset[str] = frozenset(),
) -> RenderedConfig:
    """`skip` names destinations left out of the tree (their remote failed to start)."""
    placement = place(destinations, own_address, local_repo, skip)
    out: list[str] = []
    for uuid, upstream in placement.local.items():
        if upstream == local_repo:
            continue
        section = destinations[uuid].rclone_section or ""
        out.append(f"[{uuid}]")
        out.extend(section_body(section))
        out.append("")
    if placement.local:
        upstreams = " ".join(
            _quote_upstream(f"{uuid}={spec}") for uuid, spec in placement.local.items()
        )
        out += [f"[{TREE_REMOTE}]", "type = combine", f"upstreams = {upstreams}", ""]
        root = f"{TREE_REMOTE}:"
    else:
        root = empty_root
    return RenderedConfig("\n".join(out), placement, root)
