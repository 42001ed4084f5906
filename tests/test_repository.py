"""The one parser of a repository's address (`gateway.access.repository`), and that it stays one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.access.paths import Target, canonicalise
from gateway.access.repository import (
    OBJECT_TYPES,
    RepositoryAddress,
    RepositoryKey,
    Resource,
    address_of,
    is_object_id,
)

DEST = "dddd0000-0000-4000-8000-000000000001"
UUID = "uuuu0000-0000-4000-8000-000000000001"
KEY = RepositoryKey(DEST, "traefik", UUID)
BASE = f"/{DEST}/traefik/{UUID}"
ID = "0123456789abcdef" * 4
GATEWAY = Path(__file__).resolve().parent.parent / "gateway"


def address(path: str) -> RepositoryAddress | None:
    return canonicalise(path).address


def test_the_types_are_restics() -> None:
    assert sorted(OBJECT_TYPES) == ["data", "index", "keys", "locks", "snapshots"]


@pytest.mark.parametrize("kind", sorted(OBJECT_TYPES))
def test_every_object_type_names_its_objects_and_its_list(kind: str) -> None:
    assert address(f"{BASE}/{kind}/{ID}") == RepositoryAddress(
        KEY, Resource.OBJECT, object_type=kind, object_id=ID)
    assert address(f"{BASE}/{kind}/") == RepositoryAddress(
        KEY, Resource.LIST, object_type=kind)
    # the storage's reading of the same paths, a trailing slash aside
    assert address(f"{BASE}/{kind}/{ID}/") == RepositoryAddress(
        KEY, Resource.NONE, object_type=kind, object_id=ID)
    assert address(f"{BASE}/{kind}") == RepositoryAddress(KEY, Resource.NONE, object_type=kind)


def test_data_objects_under_their_fan_out_directory_are_named_not_routed() -> None:
    where = address(f"{BASE}/data/01/{ID}")
    assert where == RepositoryAddress(KEY, Resource.NONE, object_type="data", object_id=ID)
    assert address(f"{BASE}/data/01/") == RepositoryAddress(KEY, Resource.NONE,
                                                              object_type="data")


def test_the_repository_itself_and_its_config() -> None:
    assert address(BASE) == RepositoryAddress(KEY, Resource.REPOSITORY)
    assert address(f"{BASE}/") == RepositoryAddress(KEY, Resource.REPOSITORY)
    assert address(f"{BASE}/?create=true") == RepositoryAddress(KEY, Resource.REPOSITORY)
    assert address(f"{BASE}/config") == RepositoryAddress(KEY, Resource.CONFIG, is_config=True)
    assert address(f"{BASE}/config/") == RepositoryAddress(KEY, Resource.NONE, is_config=True)
    assert address(f"{BASE}/config/x") == RepositoryAddress(KEY, Resource.NONE)


@pytest.mark.parametrize("name", [
    "0123456789ABCDEF" * 4,  # upper case
    ID[:-1],  # 63
    ID + "0",  # 65
    ID[:-1] + "g",
    "x",
])
def test_bad_ids_name_no_object(name: str) -> None:
    assert not is_object_id(name)
    assert address(f"{BASE}/data/{name}") == RepositoryAddress(
        KEY, Resource.NONE, object_type="data")
    assert address(f"{BASE}/locks/{name}") == RepositoryAddress(
        KEY, Resource.NONE, object_type="locks")


def test_the_metadata_file_beside_the_repository() -> None:
    assert address(f"{BASE}.json") == RepositoryAddress(KEY, Resource.NONE, metadata=True)
    # a directory of that name, or anything below it, is a repository of that name
    named = RepositoryKey(DEST, "traefik", f"{UUID}.json")
    assert address(f"{BASE}.json/") == RepositoryAddress(named, Resource.REPOSITORY)
    assert address(f"{BASE}.json/config") == RepositoryAddress(named, Resource.CONFIG,
                                                                is_config=True)
    # `.json` alone describes no repository
    assert address(f"/{DEST}/traefik/.json") == RepositoryAddress(
        RepositoryKey(DEST, "traefik", ".json"), Resource.REPOSITORY)


def test_too_short_and_too_long_paths() -> None:
    for path in ("/", f"/{DEST}", f"/{DEST}/", f"/{DEST}/traefik", f"/{DEST}/traefik/"):
        assert address(path) is None, path
    assert address(f"{BASE}/x") == RepositoryAddress(KEY, Resource.NONE)
    assert address(f"{BASE}/keys/{ID}/x") == RepositoryAddress(
        KEY, Resource.NONE, object_type="keys")
    assert address(f"{BASE}/keys/x/{ID}") == RepositoryAddress(
        KEY, Resource.NONE, object_type="keys", object_id=ID)


def test_a_target_is_split_once_and_alike_from_its_segments() -> None:
    target = Target((DEST, "traefik", UUID, "snapshots", ID), False, "")
    assert target.address == address_of(target.segments, target.trailing_slash)
    assert target.address is not None and target.address.key.path == BASE


# Sources that define restic's object types or the form of an object id again. The one
# list and the one pattern live in gateway/access/repository.py.
_TYPE_NAME = re.compile(r"""["'](data|keys|locks|snapshots|index)["']""")
_HEX_ID = re.compile(r"\{64\}|0-9a-f|a-f0-9")


def test_no_other_module_defines_the_types_or_the_id_pattern() -> None:
    found = []
    for source in sorted(GATEWAY.rglob("*.py")):
        if source == GATEWAY / "access" / "repository.py":
            continue
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if len(set(_TYPE_NAME.findall(line))) >= 3 or _HEX_ID.search(line):
                found.append(f"{source.relative_to(GATEWAY.parent)}:{number}: {line.strip()}")
    assert found == []
