"""Properties of the path canonicaliser and of the access policy, over generated inputs."""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from identities import (
    DEST,
    DOKUWIKI_UUID,
    FOREIGN_UUID,
    NODE_ID,
    REMOTE_DEST,
    TRAEFIK,
    TRAEFIK_UUID,
)
from yarl import URL

from gateway.access.paths import MAX_SEGMENT_BYTES, PathError, Target, canonicalise
from gateway.access.policy import (
    CREATE_QUERY,
    Backend,
    Request,
    WireProtocol,
    decide,
    module_caller,
    node_caller,
)
from gateway.access.repository import OBJECT_TYPES

PROFILE = settings(max_examples=300, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- paths

# Pieces that exercise every rule of spec section 5, mixed with arbitrary text.
PIECES = st.sampled_from([
    "/", "/", "/", "//", ".", "..", "%2e", "%2E%2e", "%2f", "%2F", "%00", "%0a", "%5c", "%5C",
    "\\", "%", "%g1", "%4", "%c3%a9", "%C3", "%ff", "%80", "a", "b", "data", "~", "-", " ",
    "?", "#", "&", "=", "x=1", "create=true", "%3F", "%25", "%20", "+", ";", "@", ":", "\x00",
    "\x7f", "\t", "é", "0" * 64, "x" * 255, "x" * 256,
])
RAW_TARGETS = st.builds(
    lambda lead, parts: lead + "".join(parts),
    st.sampled_from(["/", "/", "/", "", "*", "http://h/"]),
    st.lists(PIECES | st.text(max_size=4), max_size=12),
)


def backend_segments(path: str) -> list[bytes]:
    """How a server decodes the path it is sent: split on '/', then decode each segment."""
    parts = path[1:].split("/")
    if parts and parts[-1] == "":
        parts = parts[:-1]
    return [unquote_to_bytes(p) for p in parts]


@PROFILE
@given(RAW_TARGETS)
@example("/a/%2e%2e/b")
@example("/a//b")
@example("/a%2Fb")
def test_canonical_targets_are_idempotent_clean_and_sent_as_decided(raw: str) -> None:
    try:
        target = canonicalise(raw)
    except PathError:
        return
    # never a dot or empty segment, nor one a backend would split or treat specially
    for segment in target.segments:
        assert segment not in ("", ".", "..")
        assert "/" not in segment and "\\" not in segment
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in segment)
        assert len(segment.encode()) <= MAX_SEGMENT_BYTES
    # idempotent: the canonical form is its own canonical form
    sent = target.path_and_query
    assert canonicalise(sent) == target
    assert canonicalise(sent).path_and_query == sent
    # byte for byte: the client library puts on the wire exactly what was decided on ...
    assert URL("http://backend" + sent, encoded=True).raw_path_qs == sent
    # ... and a backend decoding it finds the very segments the policy saw
    assert backend_segments(target.path) == [s.encode() for s in target.segments]


SEGMENTS = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
    min_size=1, max_size=40,
).filter(lambda s: s not in (".", ".."))


@PROFILE
@given(st.lists(SEGMENTS, max_size=6), st.booleans())
def test_any_clean_segment_list_round_trips(segments: list[str], slash: bool) -> None:
    target = Target(tuple(segments), slash and bool(segments), "")
    assert canonicalise(target.path) == target


# --------------------------------------------------------------------------- policy

DESTS = [DEST, REMOTE_DEST]
OWN, GRANTED, FOREIGN = TRAEFIK_UUID, DOKUWIKI_UUID, FOREIGN_UUID
IDS = ["a" * 64, "0123456789abcdef" * 4, "A" * 64, "a" * 63]
VOCABULARY = st.sampled_from([
    *DESTS, "traefik", "dokuwiki", "traefik1", OWN, GRANTED, FOREIGN, f"{OWN}.json",
    f"{GRANTED}.json", f"{FOREIGN}.json", "config", *OBJECT_TYPES, *IDS, "x", "_probe_rest_404",
])
INNER = [(), ("config",), *((t,) for t in sorted(OBJECT_TYPES)),
         *((t, i) for t in sorted(OBJECT_TYPES) for i in IDS[:2]), ("x",), ("data", "x", "y")]
# Mostly paths shaped like the storage layout (a listing with its trailing slash), so that
# many requests are allowed and so checked.
LAYOUT = st.sampled_from([
    Target((dest, app, repo, *inner), len(inner) == 1 and inner[0] in OBJECT_TYPES, "")
    for dest in DESTS for app in ("traefik", "dokuwiki")
    for repo in (OWN, GRANTED, FOREIGN, f"{OWN}.json", f"{GRANTED}.json") for inner in INNER
])
ANY_PATH = st.builds(
    lambda segments, slash: Target(tuple(segments), slash and bool(segments), ""),
    st.lists(VOCABULARY | SEGMENTS, max_size=6), st.booleans(),
)
PATHS = st.sampled_from([LAYOUT, LAYOUT, LAYOUT, ANY_PATH]).flatmap(lambda paths: paths)
QUERIES = st.sampled_from(["", "", "", "", "create=true", "x=1"])
METHODS = st.sampled_from([
    *["GET", "HEAD", "POST", "DELETE", "PROPFIND", "PUT"] * 4,
    "GET", "HEAD", "OPTIONS", "PROPFIND", "POST", "PUT", "DELETE", "MKCOL", "COPY", "MOVE",
    "PROPPATCH", "LOCK", "UNLOCK", "PATCH", "TRACE", "CONNECT", "SEARCH",
])
METHODS = st.one_of(METHODS, METHODS, METHODS,
                    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8))
READS = frozenset({"GET", "HEAD", "OPTIONS", "PROPFIND"})
MODULES = st.sampled_from([
    *[module_caller(TRAEFIK[0], {"traefik1": OWN}, {OWN: GRANTED})] * 4,
    module_caller(TRAEFIK[0], {"traefik1": OWN}, {}),
    module_caller("module/traefik2", {}, {}),
])


# Requests near what the rules allow: every protocol, method and restic shape of the
# layout; `module_requests` then changes some parts at random.
SHAPES = [((), True), (("config",), False), *(((t,), True) for t in sorted(OBJECT_TYPES)),
          *(((t, IDS[0]), False) for t in sorted(OBJECT_TYPES)), (("data", IDS[1], "x"), False)]
NEAR = [
    (protocol, method, inner, slash, query)
    for protocol in WireProtocol
    for method in ("GET", "HEAD", "OPTIONS", "PROPFIND", "POST", "PUT", "DELETE", "MKCOL",
                   "MOVE")
    for inner, slash in SHAPES
    for query in (("", "create=true") if inner == () else ("",))
]
REPOS = [OWN, OWN, OWN, GRANTED, GRANTED, FOREIGN, f"{OWN}.json", f"{GRANTED}.json", None]


@st.composite
def module_requests(draw: st.DrawFn) -> Request:
    caller = draw(MODULES)
    protocol, method, inner, slash, query = draw(st.sampled_from(NEAR))
    repo = draw(st.sampled_from(REPOS))
    segments = [] if repo is None else [
        draw(st.sampled_from(DESTS)), draw(st.sampled_from(["traefik"] * 4 + ["dokuwiki"])),
        repo, *inner]
    mutate = draw(st.lists(st.sampled_from(["protocol", "method", "path", "slash", "query"]),
                           max_size=2))
    if "protocol" in mutate:
        protocol = draw(st.sampled_from(list(WireProtocol)))
    if "method" in mutate:
        method = draw(METHODS)
    if "path" in mutate:
        segments = draw(st.lists(VOCABULARY | SEGMENTS, max_size=6))
    if "slash" in mutate:
        slash = not slash
    if "query" in mutate:
        query = draw(QUERIES)
    depth = draw(st.sampled_from([None, "0", "1", "infinity"]))
    return Request(caller, protocol, method, Target(tuple(segments), slash and bool(segments),
                                                    query), depth)


OBJECT_ID = re.compile(r"[0-9a-f]{64}\Z")


def is_object(inner: tuple[str, ...], slash: bool, kinds: frozenset[str] = OBJECT_TYPES) -> bool:
    """`/<type>/<id>` below a repository, `<type>` one of `kinds`."""
    return (len(inner) == 2 and inner[0] in kinds and bool(OBJECT_ID.match(inner[1]))
            and not slash)


def check_module_confinement(request: Request) -> None:
    """A module is allowed nothing outside its own and its granted repository (and their
    `.json`) but a shallow read of the root; never through the full-access backend. Its
    repository is append-only (spec section 4): it reads the restic layout, and it writes
    only over REST, only by POSTing a new object (create, config, `<type>/<id>`) to its own
    repository and by DELETEing a lock (`locks/<id>`, own or granted), never anything
    else: no DELETE of data, keys, snapshots, index or config, no PUT, no WebDAV write.
    "POST only when it does not exist yet" is the append-only backend's to enforce, so
    every module REST request goes there."""
    decision = decide(request)
    if not decision.allowed:
        return
    caller, protocol, method, target = (request.caller, request.protocol, request.method,
                                        request.target)
    assert decision.backend is not Backend.RESTIC
    segs, slash, query = target.segments, target.trailing_slash, target.query
    own, granted = caller.own_uuid, caller.restore_uuid
    assert own is not None
    if not segs:
        assert protocol is WireProtocol.WEBDAV and method in READS
        assert method != "PROPFIND" or request.depth in ("0", "1")
        return
    assert len(segs) >= 3 and segs[1] == caller.app
    repos = {own} | ({granted} if granted else set())
    inside = segs[2] in repos
    assert inside or (segs[2] in {f"{u}.json" for u in repos} and len(segs) == 3)
    inner = segs[3:]
    if protocol is WireProtocol.WEBDAV:
        assert method in READS, "WebDAV is read-only for modules"
        assert decision.backend is Backend.WEBDAV
        return
    assert inside, "the .json metadata is no REST path"
    assert decision.backend is Backend.RESTIC_APPEND_ONLY
    if method in ("GET", "HEAD"):
        lists = len(inner) == 1 and inner[0] in OBJECT_TYPES and slash and method == "GET"
        config = inner == ("config",) and not slash
        assert query == "" and (config or lists or is_object(inner, slash)), request
        return
    if method == "DELETE":
        assert query == "" and is_object(inner, slash, frozenset({"locks"})), (
            f"a module deletes only locks: {request}")
        return
    assert method == "POST", f"a module writes with POST and DELETE only: {request}"
    if segs[2] != own:
        assert segs[2] == granted
        assert query == "" and is_object(inner, slash, frozenset({"locks"})), (
            f"a granted repository takes only locks: {request}")
        return
    create = inner == () and query == CREATE_QUERY
    config = inner == ("config",) and not slash and query == ""
    assert create or config or (query == "" and is_object(inner, slash)), request


@settings(PROFILE, max_examples=500)
@given(module_requests())
def test_a_module_stays_inside_its_own_and_its_granted_repository(request: Request) -> None:
    check_module_confinement(request)


def test_every_near_request_keeps_a_module_confined() -> None:
    """The same property over the whole finite neighbourhood the strategy draws from."""
    callers = [module_caller(TRAEFIK[0], {"traefik1": OWN}, {OWN: GRANTED}),
               module_caller(TRAEFIK[0], {"traefik1": OWN}, {})]
    checked = allowed = 0
    for caller in callers:
        for protocol, method, inner, slash, query in NEAR:
            for repo in dict.fromkeys(REPOS):
                for app in ("traefik", "dokuwiki"):
                    segments = () if repo is None else (DESTS[0], app, repo, *inner)
                    for depth in (None, "0", "infinity"):
                        target = Target(segments, slash and bool(segments), query)
                        request = Request(caller, protocol, method, target, depth)
                        check_module_confinement(request)
                        checked += 1
                        allowed += decide(request).allowed
    assert checked > 10_000 and allowed > 100


@PROFILE
@given(st.sampled_from(list(WireProtocol)), METHODS, PATHS, QUERIES)
def test_nodes_may_do_anything(protocol, method, path, query) -> None:  # type: ignore[no-untyped-def]
    target = Target(path.segments, path.trailing_slash, query)
    decision = decide(Request(node_caller(f"node/{NODE_ID}"), protocol, method, target))
    assert decision.allowed
