"""A restic repository's address: where a canonical target lies in the layout
`/<destination uuid>/<app>/<module uuid>/...` (spec section 4).

The one place that knows restic's object types, the form of an object's id and the
REST routes of a repository, as restic's rest-server has one list of types and one
path pattern. A target is split once, when it is canonicalised (`Target.address`);
the policy, uploads, quotas and insight read what it says. Pure, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

OBJECT_TYPES = frozenset({"data", "keys", "locks", "snapshots", "index"})
# An object's name: the SHA-256 of its content, in lowercase hex.
OBJECT_ID = re.compile(r"[0-9a-f]{64}\Z")
CONFIG = "config"
# `<module uuid>.json`, beside the repository: the module's backup metadata.
METADATA_SUFFIX = ".json"


def is_object_id(name: str) -> bool:
    return OBJECT_ID.match(name) is not None


@dataclass(frozen=True, slots=True, order=True)
class RepositoryKey:
    """One module repository: `/<destination>/<app>/<uuid>`."""

    destination: str
    app: str
    uuid: str

    @property
    def path(self) -> str:
        return f"/{self.destination}/{self.app}/{self.uuid}"


class Resource(StrEnum):
    """What a Restic REST request names in a repository: rest-server's routes."""

    REPOSITORY = "repository"  # `/`, created with `?create=true`
    CONFIG = "config"  # `/config`
    LIST = "list"  # `/<type>/`
    OBJECT = "object"  # `/<type>/<id>`
    NONE = "none"  # no route: anything else below the repository, or its metadata file


@dataclass(frozen=True, slots=True)
class RepositoryAddress:
    """A target at or below `/<destination>/<app>/<name>`, split once.

    `key` is the repository the target lies in, or the one whose metadata file
    (`<uuid>.json`) it is. `resource` is the Restic REST route it matches, exactly
    (trailing slash included). The other fields read the path as the storage lays it
    out, a trailing slash aside: `object_type` is the type directory the target lies in,
    `object_id` the object's name (data objects sit under a two-hex fan-out directory in
    the storage), `is_config` whether it is the repository's `config`.
    """

    key: RepositoryKey
    resource: Resource
    metadata: bool = False  # `<uuid>.json` beside the repository
    object_type: str | None = None
    object_id: str | None = None
    is_config: bool = False


def address_of(segments: Sequence[str], trailing_slash: bool) -> RepositoryAddress | None:
    """The address of a canonical target's decoded segments; None above the repositories
    (the root, a destination, an app directory)."""
    if len(segments) < 3:
        return None
    destination, app, name = segments[0], segments[1], segments[2]
    below = tuple(segments[3:])
    if not below:
        uuid = name.removesuffix(METADATA_SUFFIX)
        if uuid and uuid != name and not trailing_slash:
            return RepositoryAddress(RepositoryKey(destination, app, uuid), Resource.NONE,
                                     metadata=True)
        return RepositoryAddress(RepositoryKey(destination, app, name), Resource.REPOSITORY)
    key = RepositoryKey(destination, app, name)
    if below == (CONFIG,):
        return RepositoryAddress(key, Resource.NONE if trailing_slash else Resource.CONFIG,
                                 is_config=True)
    object_type = below[0]
    if object_type not in OBJECT_TYPES:
        return RepositoryAddress(key, Resource.NONE)
    object_id = below[-1] if len(below) > 1 and is_object_id(below[-1]) else None
    if len(below) == 1:
        resource = Resource.LIST if trailing_slash else Resource.NONE
    elif len(below) == 2 and object_id is not None and not trailing_slash:
        resource = Resource.OBJECT
    else:
        resource = Resource.NONE
    return RepositoryAddress(key, resource, object_type=object_type, object_id=object_id)
