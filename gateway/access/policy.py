"""Who may do what (spec section 4): a table of rules read top to bottom.

Pure functions, no I/O. A request is described by `Request` (caller, protocol,
method, canonical target, WebDAV depth); `decide` returns the first matching
rule's decision, or a denial with the most telling reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from backends.kinds import Backend
from gateway.access.paths import Target
from gateway.access.repository import RepositoryAddress, Resource

REST_MEDIA_TYPE = "application/vnd.x.restic.rest.v2"
CREATE_QUERY = "create=true"
PROBE_SEGMENT = "_probe_rest_404"
_TRAILING_DIGITS = re.compile(r"\d+\Z")


class WireProtocol(StrEnum):
    REST = "rest"
    WEBDAV = "webdav"


class Scope(StrEnum):
    """Where a path lies, seen from a module."""

    ROOT = "root"  # "/"
    OWN = "own"  # /<dest>/<app>/<own uuid>[/...]
    OWN_META = "own-meta"  # /<dest>/<app>/<own uuid>.json
    RESTORE = "restore"  # the same for the granted uuid
    RESTORE_META = "restore-meta"
    OTHER = "other"


class Shape(StrEnum):
    """The restic REST shape of a path inside a repository."""

    REPO = "repo"  # the repository itself: /
    CONFIG = "config"  # /config
    LIST = "list"  # /<type>/
    OBJECT = "object"  # /<type>/<id>, type other than locks
    LOCK = "lock"  # /locks/<id>
    OTHER = "other"  # anything else below the repository
    NONE = "none"  # not inside a repository


@dataclass(frozen=True, slots=True)
class Caller:
    user: str  # "node/1", "module/traefik1"
    is_node: bool
    app: str = ""
    own_uuid: str | None = None
    restore_uuid: str | None = None

    @property
    def group(self) -> str:
        return "node" if self.is_node else "module"

    @property
    def module_id(self) -> str | None:
        """`traefik1` for `module/traefik1`; None for a node."""
        return None if self.is_node else self.user.removeprefix("module/")


def app_type(module_id: str) -> str:
    """`dokuwiki2` -> `dokuwiki`."""
    return _TRAILING_DIGITS.sub("", module_id)


def node_caller(user: str) -> Caller:
    return Caller(user=user, is_node=True)


def module_caller(user: str, module_uuids: dict[str, str], restore: dict[str, str]) -> Caller:
    module_id = user.removeprefix("module/")
    own = module_uuids.get(module_id)
    return Caller(
        user=user,
        is_node=False,
        app=app_type(module_id),
        own_uuid=own,
        restore_uuid=restore.get(own) if own else None,
    )


def is_probe(method: str, target: Target) -> bool:
    """A peer gateway's health probe, `GET`/`HEAD` of exactly `/<destination>/_probe_rest_404`:
    the one request naming a destination that needs no credentials."""
    return (
        method in ("GET", "HEAD")
        and len(target.segments) == 2
        and target.segments[1] == PROBE_SEGMENT
        and not target.trailing_slash
        and not target.query
    )


def detect_protocol(accept: str, query: str) -> WireProtocol:
    if REST_MEDIA_TYPE in accept or query == CREATE_QUERY:
        return WireProtocol.REST
    return WireProtocol.WEBDAV


@dataclass(frozen=True, slots=True)
class Request:
    caller: Caller
    protocol: WireProtocol
    method: str
    target: Target
    depth: str | None = None  # WebDAV Depth header, as sent


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str
    reason: str
    backend: Backend | None = None


def scope_of(caller: Caller, target: Target) -> Scope:
    if not target.segments:
        return Scope.ROOT
    where = target.address
    if where is None or where.key.app != caller.app:
        return Scope.OTHER
    for uuid, repo, meta in (
        (caller.own_uuid, Scope.OWN, Scope.OWN_META),
        (caller.restore_uuid, Scope.RESTORE, Scope.RESTORE_META),
    ):
        if uuid and where.key.uuid == uuid:
            return meta if where.metadata else repo
    return Scope.OTHER


_SHAPES = {
    Resource.REPOSITORY: Shape.REPO,
    Resource.CONFIG: Shape.CONFIG,
    Resource.LIST: Shape.LIST,
    Resource.OBJECT: Shape.OBJECT,
    Resource.NONE: Shape.OTHER,
}


def shape_of(where: RepositoryAddress | None) -> Shape:
    if where is None or where.metadata:
        return Shape.NONE
    if where.resource is Resource.OBJECT and where.object_type == "locks":
        return Shape.LOCK
    return _SHAPES[where.resource]


ANY_SHAPE = frozenset(Shape)
READ = frozenset({"GET", "HEAD"})
DAV_READ = frozenset({"GET", "HEAD", "OPTIONS", "PROPFIND"})
SHALLOW = frozenset({"0", "1"})
OBJECTS = frozenset({Shape.OBJECT, Shape.LOCK})


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    protocol: WireProtocol
    scopes: frozenset[Scope]
    shapes: frozenset[Shape]
    methods: frozenset[str]
    reason: str
    query: str = ""
    depths: frozenset[str] | None = None  # PROPFIND Depth allowed; None: any


def _rule(
    name: str,
    protocol: WireProtocol,
    scopes: set[Scope],
    shapes: set[Shape] | frozenset[Shape],
    methods: set[str] | frozenset[str],
    reason: str,
    **kw: object,
) -> Rule:
    return Rule(
        name, protocol, frozenset(scopes), frozenset(shapes), frozenset(methods), reason,
        **kw,  # type: ignore[arg-type]
    )


REST, DAV = WireProtocol.REST, WireProtocol.WEBDAV
OWN, RESTORE = Scope.OWN, Scope.RESTORE

# Spec section 4, modules. Read top to bottom; the first match allows.
MODULE_RULES: tuple[Rule, ...] = (
    _rule("rest-create", REST, {OWN}, {Shape.REPO}, {"POST"},
          "create own repository", query=CREATE_QUERY),
    _rule("rest-config-read", REST, {OWN, RESTORE}, {Shape.CONFIG}, READ,
          "read repository config"),
    _rule("rest-config-write", REST, {OWN}, {Shape.CONFIG}, {"POST"},
          "write own config once (append-only)"),
    _rule("rest-list", REST, {OWN, RESTORE}, {Shape.LIST}, {"GET"},
          "list repository objects"),
    _rule("rest-object-read", REST, {OWN, RESTORE}, OBJECTS, READ,
          "read repository object"),
    _rule("rest-object-add", REST, {OWN}, OBJECTS, {"POST"},
          "add new object to own repository (append-only)"),
    _rule("rest-lock-own", REST, {OWN}, {Shape.LOCK}, {"DELETE"},
          "remove own lock"),
    _rule("rest-lock-restore", REST, {RESTORE}, {Shape.LOCK}, {"POST", "DELETE"},
          "lock granted repository for restore"),
    _rule("dav-root", DAV, {Scope.ROOT}, {Shape.NONE}, DAV_READ,
          "read the root listing", depths=SHALLOW),
    _rule("dav-repo-read", DAV, {OWN, RESTORE}, ANY_SHAPE, DAV_READ,
          "read own or granted repository"),
    _rule("dav-meta-read", DAV, {Scope.OWN_META, Scope.RESTORE_META}, {Shape.NONE}, DAV_READ,
          "read repository metadata"),
)

# Spec section 4, "Sizes": restic writes these well under 4 KiB. A module's larger upload
# of one is refused; a lock, which no quota refuses, would otherwise store anything.
SMALL_OBJECT_MAX = 64 * 1024
SMALL_OBJECT_TYPES = frozenset({"keys", "locks"})


def size_limit(request: Request) -> int | None:
    """The most bytes the body of `request` may hold: a module's upload of `config`, a key
    or a lock; None: no limit (nodes, other objects, other requests)."""
    if request.caller.is_node or request.protocol is not REST or request.method != "POST":
        return None
    where = request.target.address
    if where is None or where.metadata:
        return None
    if where.resource is Resource.CONFIG or (where.resource is Resource.OBJECT
                                             and where.object_type in SMALL_OBJECT_TYPES):
        return SMALL_OBJECT_MAX
    return None


WRITE_METHODS = frozenset({"POST", "PUT", "DELETE", "MKCOL", "COPY", "MOVE", "PROPPATCH", "LOCK",
                           "UNLOCK", "PATCH"})


def _matches(rule: Rule, request: Request, scope: Scope, shape: Shape) -> bool:
    return (
        request.protocol is rule.protocol
        and scope in rule.scopes
        and shape in rule.shapes
        and request.method in rule.methods
        and request.target.query == rule.query
        and (rule.depths is None or request.method != "PROPFIND" or request.depth in rule.depths)
    )


def _module_denial(request: Request, scope: Scope, shape: Shape) -> str:
    method = request.method
    if request.caller.own_uuid is None:
        return "module has no repository uuid"
    if scope is Scope.OTHER:
        return "not the module's own or granted repository"
    if request.protocol is DAV:
        if method in WRITE_METHODS:
            return "WebDAV is read-only for modules"
        if scope is Scope.ROOT and method == "PROPFIND":
            return "PROPFIND of the root needs Depth 0 or 1"
        if request.target.query:
            return "query not allowed"
        return f"{method} not allowed for modules"
    if scope in (Scope.OWN_META, Scope.RESTORE_META, Scope.ROOT):
        return "not a restic repository path"
    if request.target.query and request.target.query != CREATE_QUERY:
        return "query not allowed"
    if scope is RESTORE and method in WRITE_METHODS:
        return "granted repository is read-only (locks aside)"
    if method == "DELETE":
        return "modules may not delete backup data"
    if shape is Shape.OTHER or shape is Shape.NONE:
        return "not a restic repository path"
    return f"{method} not allowed on {shape.value} for modules"


def decide(request: Request) -> Decision:
    caller = request.caller
    if caller.is_node:
        backend = Backend.RESTIC if request.protocol is REST else Backend.WEBDAV
        return Decision(True, "node-full-access", "nodes have full access", backend)
    scope = scope_of(caller, request.target)
    shape = shape_of(request.target.address) if scope in (OWN, RESTORE) else Shape.NONE
    if caller.own_uuid is not None:
        for rule in MODULE_RULES:
            if _matches(rule, request, scope, shape):
                backend = Backend.RESTIC_APPEND_ONLY if rule.protocol is REST else Backend.WEBDAV
                return Decision(True, rule.name, rule.reason, backend)
    return Decision(False, "module-default-deny", _module_denial(request, scope, shape))
