"""The limits in force, from the raw values of the Limits keys (spec section 2).

Redis holds strings written by hand or by `rclone-gateway limits set`; each is parsed
on every read. A value that does not parse is logged once (until it changes) and the
last good value of that same field stays in force; a field removed from Redis is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from gateway.cluster.keys import BWLIMIT_KEY, CONCURRENCY_KEY, QUOTA_PREFIX
from gateway.cluster.state import RawLimits
from gateway.limits.values import BadValue, Schedule, parse_cap, parse_quota, parse_schedule

log = logging.getLogger("rclone_gateway.limits")

DEFAULT_MODULE_CAP = 8
DIRECTIONS = ("upload", "download")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Limits:
    # destination -> module id or `*` -> bytes; None: that module has no quota (`off`)
    quotas: Mapping[str, Mapping[str, int | None]] = field(default_factory=dict)
    bandwidth: Mapping[str, Schedule] = field(default_factory=dict)  # bwlimit field -> schedule
    module_cap: int | None = DEFAULT_MODULE_CAP
    node_cap: int | None = None

    def quota(self, destination: str, module_id: str) -> int | None:
        """Bytes the module's repository in `destination` may hold; None: no quota."""
        hashed = self.quotas.get(destination)
        if not hashed:
            return None
        return hashed[module_id] if module_id in hashed else hashed.get("*")

    def cap(self, is_node: bool) -> int | None:
        return self.node_cap if is_node else self.module_cap


def bandwidth_field(field_name: str) -> tuple[str | None, str] | None:
    """`upload` -> (None, "upload"); `module/<id>/download` -> ("<id>", "download")."""
    if field_name in DIRECTIONS:
        return None, field_name
    parts = field_name.split("/")
    if len(parts) == 3 and parts[0] == "module" and parts[1] and parts[2] in DIRECTIONS:
        return parts[1], parts[2]
    return None


def parse_bandwidth(field_name: str, text: str) -> Schedule:
    where = bandwidth_field(field_name)
    if where is None:
        raise BadValue("unknown field (upload, download, module/<id>/upload|download)")
    return parse_schedule(text, side=DIRECTIONS.index(where[1]))


def parse_concurrency(field_name: str, text: str) -> int | None:
    if field_name not in ("module", "node"):
        raise BadValue("unknown field (module, node)")
    return parse_cap(text)


class LimitsKeeper:
    """Turns each read of the raw values into the limits in force."""

    def __init__(self) -> None:
        self.current = Limits()
        self._good: dict[tuple[str, ...], object] = {}
        self._complained: dict[tuple[str, ...], str] = {}

    def update(self, raw: RawLimits) -> Limits:
        seen: set[tuple[str, ...]] = set()

        def value(where: tuple[str, ...], text: str, parse: Callable[[str], T]) -> T | None:
            seen.add(where)
            try:
                parsed = parse(text)
            except (BadValue, ValueError, OverflowError) as exc:
                if self._complained.get(where) != text:
                    self._complained[where] = text
                    kept = "keeping the last good value" if where in self._good else "ignored"
                    log.warning("limits: %s: %s; %s", _name(where), exc, kept)
                return self._good.get(where)  # type: ignore[return-value]
            self._complained.pop(where, None)
            self._good[where] = parsed
            return parsed

        quotas: dict[str, dict[str, int | None]] = {}
        for destination, hashed in raw.quota.items():
            for module, text in hashed.items():
                where = ("quota", destination, module)
                allowed = value(where, text, parse_quota)
                if where in self._good:  # `off` (None) too: it overrides `*`
                    quotas.setdefault(destination, {})[module] = allowed
        bandwidth: dict[str, Schedule] = {}
        for name, text in raw.bwlimit.items():
            schedule = value(("bwlimit", name), text,
                             lambda t, name=name: parse_bandwidth(name, t))  # type: ignore[misc]
            if schedule is not None:
                bandwidth[name] = schedule
        caps: dict[str, int | None] = {}
        for name, text in raw.concurrency.items():
            where = ("concurrency", name)
            cap = value(where, text, lambda t, name=name: parse_concurrency(name, t))  # type: ignore[misc]
            if where in self._good:
                caps[name] = cap
        for stale in [w for w in self._good if w not in seen]:
            del self._good[stale]
        for stale in [w for w in self._complained if w not in seen]:
            del self._complained[stale]
        self.current = Limits(
            quotas=quotas,
            bandwidth=bandwidth,
            module_cap=caps.get("module", DEFAULT_MODULE_CAP),
            node_cap=caps.get("node"),
        )
        return self.current


def _name(where: tuple[str, ...]) -> str:
    if where[0] == "quota":
        return f"{QUOTA_PREFIX}{where[1]} field {where[2]!r}"
    key = BWLIMIT_KEY if where[0] == "bwlimit" else CONCURRENCY_KEY
    return f"{key} field {where[1]!r}"
