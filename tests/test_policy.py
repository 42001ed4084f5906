"""The policy of spec section 4, as a table: (caller, protocol, method, path) -> decision."""

import pytest
from identities import DEST, DOKUWIKI_UUID, FOREIGN_UUID, NODE_ID, TRAEFIK, TRAEFIK_UUID

from gateway.access.paths import canonicalise
from gateway.access.policy import (
    Backend,
    Caller,
    Request,
    WireProtocol,
    app_type,
    decide,
    detect_protocol,
    module_caller,
    node_caller,
    size_limit,
)

OWN, GRANTED, OTHER = TRAEFIK_UUID, DOKUWIKI_UUID, FOREIGN_UUID
ID = "a" * 64

MODULE = module_caller(
    TRAEFIK[0], {"traefik1": OWN}, {OWN: GRANTED}
)
NODE = node_caller(f"node/{NODE_ID}")
NO_UUID = module_caller("module/ghost1", {}, {})

REPO = f"/{DEST}/traefik/{OWN}"
RESTORE = f"/{DEST}/traefik/{GRANTED}"
FOREIGN = f"/{DEST}/traefik/{OTHER}"
REST, DAV = WireProtocol.REST, WireProtocol.WEBDAV


def ask(caller: Caller, protocol: WireProtocol, method: str, target: str, depth: str | None = None):
    return decide(Request(caller, protocol, method, canonicalise(target), depth))


ALLOWED = [
    # REST, own repository
    (REST, "POST", f"{REPO}/?create=true"),
    (REST, "POST", f"{REPO}?create=true"),
    (REST, "GET", f"{REPO}/config"),
    (REST, "HEAD", f"{REPO}/config"),
    (REST, "POST", f"{REPO}/config"),
    *[(REST, "GET", f"{REPO}/{t}/") for t in ("data", "keys", "locks", "snapshots", "index")],
    *[(REST, m, f"{REPO}/{t}/{ID}") for t in ("data", "keys", "locks", "snapshots", "index")
      for m in ("GET", "HEAD", "POST")],
    (REST, "DELETE", f"{REPO}/locks/{ID}"),
    # REST, granted repository
    (REST, "GET", f"{RESTORE}/config"),
    (REST, "HEAD", f"{RESTORE}/config"),
    (REST, "GET", f"{RESTORE}/snapshots/"),
    (REST, "GET", f"{RESTORE}/data/{ID}"),
    (REST, "HEAD", f"{RESTORE}/index/{ID}"),
    (REST, "POST", f"{RESTORE}/locks/{ID}"),
    (REST, "DELETE", f"{RESTORE}/locks/{ID}"),
    # WebDAV reads
    (DAV, "GET", "/"),
    (DAV, "HEAD", "/"),
    (DAV, "OPTIONS", "/"),
    (DAV, "PROPFIND", "/", "0"),
    (DAV, "PROPFIND", "/", "1"),
    (DAV, "PROPFIND", f"{REPO}/", "1"),
    (DAV, "PROPFIND", f"{REPO}/config", "0"),
    (DAV, "GET", f"{REPO}/data/{ID}"),
    (DAV, "GET", f"{REPO}/any/deeper/file"),
    (DAV, "OPTIONS", REPO),
    (DAV, "GET", f"/{DEST}/traefik/{OWN}.json"),
    (DAV, "HEAD", f"/{DEST}/traefik/{OWN}.json"),
    (DAV, "PROPFIND", f"/{DEST}/traefik/{OWN}.json", "0"),
    (DAV, "GET", f"/{DEST}/traefik/{GRANTED}.json"),
    (DAV, "PROPFIND", f"{RESTORE}/", "1"),
    (DAV, "GET", f"{RESTORE}/config"),
]


@pytest.mark.parametrize("row", ALLOWED, ids=lambda r: f"{r[0].value}-{r[1]}-{r[2]}")
def test_module_allowed(row: tuple) -> None:
    decision = ask(MODULE, *row)
    assert decision.allowed, decision
    expected = Backend.RESTIC_APPEND_ONLY if row[0] is REST else Backend.WEBDAV
    assert decision.backend is expected


DENIED = [
    # never delete or replace backup data
    (REST, "DELETE", f"{REPO}/data/{ID}", None, "delete"),
    (REST, "DELETE", f"{REPO}/snapshots/{ID}", None, "delete"),
    (REST, "DELETE", f"{REPO}/keys/{ID}", None, "delete"),
    (REST, "DELETE", f"{REPO}/config", None, "delete"),
    (REST, "DELETE", f"{REPO}/", None, "delete"),
    (REST, "PUT", f"{REPO}/data/{ID}", None, "not allowed"),
    # only the restic layout
    (REST, "POST", f"{REPO}/data/notahash", None, "not a restic repository path"),
    (REST, "POST", f"{REPO}/data/{'A' * 64}", None, "not a restic repository path"),
    (REST, "POST", f"{REPO}/other/{ID}", None, "not a restic repository path"),
    (REST, "POST", f"{REPO}/data/{ID}/", None, "not a restic repository path"),
    (REST, "POST", f"{REPO}/data/{ID}/x", None, "not a restic repository path"),
    (REST, "POST", f"{REPO}/", None, "not allowed"),
    (REST, "POST", f"{REPO}/?create=false", None, "query"),
    (REST, "GET", f"{REPO}/config?x=1", None, "query"),
    (REST, "GET", f"{REPO}/data", None, "not a restic repository path"),
    (REST, "HEAD", f"{REPO}/data/", None, "not allowed"),
    (REST, "GET", f"/{DEST}/traefik/{OWN}.json", None, "not a restic"),
    (REST, "GET", "/", None, "not a restic"),
    # granted repository is read-only, locks aside
    (REST, "POST", f"{RESTORE}/data/{ID}", None, "read-only"),
    (REST, "POST", f"{RESTORE}/config", None, "read-only"),
    (REST, "POST", f"{RESTORE}/?create=true", None, "read-only"),
    (REST, "DELETE", f"{RESTORE}/data/{ID}", None, "read-only"),
    # other modules' repositories
    (REST, "GET", f"{FOREIGN}/config", None, "not the module's own"),
    (REST, "POST", f"{FOREIGN}/?create=true", None, "not the module's own"),
    (REST, "GET", f"/{DEST}/nextcloud/{OWN}/config", None, "not the module's own"),
    (DAV, "PROPFIND", f"/{DEST}/", "1", "not the module's own"),
    (DAV, "PROPFIND", f"/{DEST}/traefik/", "1", "not the module's own"),
    (DAV, "GET", f"/{DEST}/traefik/{OTHER}.json", None, "not the module's own"),
    (DAV, "GET", f"{FOREIGN}/config", None, "not the module's own"),
    # WebDAV is read-only for modules
    (DAV, "PUT", f"{REPO}/config", None, "read-only"),
    (DAV, "PUT", f"/{DEST}/traefik/{OWN}.json", None, "read-only"),
    (DAV, "DELETE", f"{REPO}/data/{ID}", None, "read-only"),
    (DAV, "MKCOL", f"{REPO}/new/", None, "read-only"),
    (DAV, "MOVE", f"{REPO}/config", None, "read-only"),
    (DAV, "COPY", f"{REPO}/config", None, "read-only"),
    (DAV, "PROPPATCH", f"{REPO}/config", None, "read-only"),
    (DAV, "LOCK", f"{REPO}/config", None, "read-only"),
    (DAV, "PUT", "/", None, "read-only"),
    # root listing is shallow
    (DAV, "PROPFIND", "/", None, "Depth 0 or 1"),
    (DAV, "PROPFIND", "/", "infinity", "Depth 0 or 1"),
    (DAV, "GET", "/?x", None, "query"),
]


@pytest.mark.parametrize("row", DENIED, ids=lambda r: f"{r[0].value}-{r[1]}-{r[2]}")
def test_module_denied(row: tuple) -> None:
    protocol, method, target, depth, reason = row
    decision = ask(MODULE, protocol, method, target, depth)
    assert not decision.allowed
    assert decision.backend is None
    assert reason in decision.reason


@pytest.mark.parametrize("protocol", [REST, DAV])
@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE", "MKCOL", "PROPFIND",
                                    "MOVE", "COPY", "OPTIONS"])
@pytest.mark.parametrize("target", ["/", f"{REPO}/data/{ID}", f"{FOREIGN}/", f"/{DEST}/x.json"])
def test_nodes_have_full_access(protocol: WireProtocol, method: str, target: str) -> None:
    decision = ask(NODE, protocol, method, target)
    assert decision.allowed
    assert decision.backend is (Backend.RESTIC if protocol is REST else Backend.WEBDAV)


def test_module_without_uuid_gets_nothing() -> None:
    assert not ask(NO_UUID, DAV, "PROPFIND", "/", "1").allowed
    decision = ask(NO_UUID, REST, "POST", f"/{DEST}/ghost/x/?create=true")
    assert "no repository uuid" in decision.reason


def test_protocol_detection() -> None:
    assert detect_protocol("application/vnd.x.restic.rest.v2", "") is REST
    assert detect_protocol("text/html, application/vnd.x.restic.rest.v2;q=1", "") is REST
    assert detect_protocol("", "create=true") is REST
    assert detect_protocol("", "") is DAV
    assert detect_protocol("application/vnd.x.restic.rest.v1", "") is DAV


def test_app_type_strips_trailing_digits() -> None:
    assert app_type("dokuwiki2") == "dokuwiki"
    assert app_type("traefik1") == "traefik"
    assert app_type("samba10") == "samba"
    assert app_type("mail") == "mail"


def test_restore_grant_follows_own_uuid() -> None:
    caller = module_caller("module/dokuwiki3", {"dokuwiki3": OWN}, {OWN: GRANTED})
    assert caller.restore_uuid == GRANTED
    assert caller.app == "dokuwiki"
    assert module_caller("module/x1", {"x1": OTHER}, {OWN: GRANTED}).restore_uuid is None


SIZES = [  # (caller, protocol, method, path) -> the most bytes its body may hold
    (MODULE, REST, "POST", f"{REPO}/config", 64 * 1024),
    (MODULE, REST, "POST", f"{REPO}/keys/{ID}", 64 * 1024),
    (MODULE, REST, "POST", f"{REPO}/locks/{ID}", 64 * 1024),
    (MODULE, REST, "POST", f"{RESTORE}/locks/{ID}", 64 * 1024),  # a restore's lock too
    *[(MODULE, REST, "POST", f"{REPO}/{t}/{ID}", None) for t in ("data", "index", "snapshots")],
    (MODULE, REST, "POST", f"{REPO}/?create=true", None),
    (MODULE, REST, "GET", f"{REPO}/config", None),
    (MODULE, DAV, "POST", f"{REPO}/config", None),  # denied anyway
    (NODE, REST, "POST", f"{REPO}/locks/{ID}", None),  # nodes are not limited
    (NODE, REST, "POST", f"{REPO}/config", None),
]


@pytest.mark.parametrize("row", SIZES, ids=lambda r: f"{r[0].user}-{r[2]}-{r[3]}")
def test_a_modules_config_keys_and_locks_are_limited_in_size(row: tuple) -> None:
    """Spec section 4, "Sizes" (issue "Real links and real storage", 9)."""
    caller, protocol, method, target, limit = row
    assert size_limit(Request(caller, protocol, method, canonicalise(target))) == limit
