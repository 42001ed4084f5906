"""The cluster configuration as read from Redis: one immutable snapshot, swapped whole."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from backends.destinations import Destination
from gateway.access.credentials import AclUser

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class RawLimits:
    """The Limits keys as Redis holds them."""

    quota: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # destination -> hash
    bwlimit: Mapping[str, str] = field(default_factory=dict)
    concurrency: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ClusterState:
    users: dict[str, AclUser] = field(default_factory=dict, repr=False)
    module_uuids: dict[str, str] = field(default_factory=dict)
    restore_grants: dict[str, str] = field(default_factory=dict)
    destinations: dict[str, Destination] = field(default_factory=dict)
    networks: tuple[IPNetwork, ...] = ()
    node_vpn: dict[str, str] = field(default_factory=dict)
    leader: str | None = None
    limits: RawLimits = field(default_factory=RawLimits)  # this gateway's own keys


def parse_network(value: str | None) -> tuple[IPNetwork, ...]:
    if not value:
        return ()
    try:
        return (ipaddress.ip_network(value.strip(), strict=False),)
    except ValueError:
        return ()


LOCAL_ADDRESSES = frozenset({ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")})


@functools.lru_cache(maxsize=4096)  # parsed on every request: clients come back
def source_ip(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer address as an IP, IPv4-mapped IPv6 unwrapped; None when it is not one."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_trusted_source(address: str | None, networks: tuple[IPNetwork, ...]) -> bool:
    """Spec section 4, step 1: loopback clients, or clients inside the cluster network."""
    ip = source_ip(address)
    if ip is None:
        return False
    return ip in LOCAL_ADDRESSES or any(ip in net for net in networks)
