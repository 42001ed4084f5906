"""The resources WebDAV names in Destination and If (spec section 7): pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from identities import DEST, NODE_ID, REMOTE_DEST, TRAEFIK, TRAEFIK_UUID
from multidict import CIMultiDict

from backends.client import ConnectionPool
from gateway.access.paths import Target, canonicalise
from gateway.access.policy import Caller, Request, WireProtocol, decide, module_caller, node_caller
from gateway.access.refusals import Refusal
from gateway.access.webdav_headers import (
    SAME_DESTINATION,
    HeaderRefused,
    References,
    check_destination,
    parse_destination,
    parse_if,
    references_of,
    rewrite_references,
)

OTHER, OWN = REMOTE_DEST, TRAEFIK_UUID
HOST = "127.0.0.1:4694"
NODE = node_caller(f"node/{NODE_ID}")
MODULE = module_caller(TRAEFIK[0], {"traefik1": OWN}, {})


def described(method: str = "COPY", target: str = f"/{DEST}/dir/file.txt",
              caller: Caller = NODE) -> Request:
    return Request(caller, WireProtocol.WEBDAV, method, canonicalise(target))


def refusal(call: object, *args: object) -> tuple[int, str]:
    with pytest.raises(HeaderRefused) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value.status, caught.value.reason


@pytest.mark.parametrize(("value", "path"), [
    (f"http://{HOST}/{DEST}/dir/copy.txt", f"/{DEST}/dir/copy.txt"),
    (f"/{DEST}/dir/copy.txt", f"/{DEST}/dir/copy.txt"),
    (f"HTTP://{HOST}/{DEST}/dir/", f"/{DEST}/dir/"),
    # Escapes decoded once and written the canonical way, as for the request target.
    (f"http://{HOST}/{DEST}/a%20b%c3%a9%7e.txt", f"/{DEST}/a%20b%C3%A9~.txt"),
    (f"/{DEST}/x%3Ay", f"/{DEST}/x:y"),
])
def test_destination_is_canonicalised_like_the_target(value: str, path: str) -> None:
    target = parse_destination(value, HOST)
    assert target.path == path
    assert target == canonicalise(path)


@pytest.mark.parametrize(("value", "host"), [
    ("http://LocalHost:80/x/y", "localhost"),
    ("http://localhost/x/y", "LOCALHOST:80"),
    ("https://gw.example/x/y", "gw.example:443"),
    ("http://[::1]:4694/x/y", "[::1]:4694"),
])
def test_authority_compares_without_case_or_default_port(value: str, host: str) -> None:
    assert parse_destination(value, host).display == "/x/y"


@pytest.mark.parametrize(("value", "reason"), [
    ("", "neither an absolute URI nor a path"),
    ("dir/file.txt", "neither an absolute URI nor a path"),
    ("http:/x/y", "neither an absolute URI nor a path"),
    ("ftp://127.0.0.1:4694/x/y", "scheme is not http or https"),
    ("http:///x/y", "authority is empty"),
    ("http://user:pw@127.0.0.1:4694/x/y", "user information"),
    ("http://127.0.0.1:4695/x/y", "another host"),
    ("http://10.5.4.1:4694/x/y", "another host"),
    ("http://127.0.0.1/x/y", "another host"),
    ("/x/y?a=b", "query or fragment"),
    ("http://127.0.0.1:4694/x/y#frag", "query or fragment"),
    ("/x/y/é", "raw non-ASCII"),
    ("/x/../y", "dot segment"),
    ("/x/%2E%2e/y", "dot segment"),
    ("/x/./y", "dot segment"),
    ("/x/%2e/y", "dot segment"),
    ("/x//y", "empty path segment"),
    ("//127.0.0.1:4694/x/y", "empty path segment"),
    ("/x/a%2Fb", "escaped '/'"),
    ("/x/a%5cb", "escaped control character or backslash"),
    ("/x/a%00b", "escaped control character or backslash"),
    ("/x/a%zzb", "malformed percent-escape"),
    ("/x/a%4", "malformed percent-escape"),
    ("/x/a%ff", "not valid UTF-8"),
    ("/x/a b", "raw control character, space"),
    ("/x/a\\b", "raw control character, space"),
    ("/x/" + "a" * 256, "segment too long"),
])
def test_malformed_or_foreign_destination_is_a_bad_request(value: str, reason: str) -> None:
    status, why = refusal(parse_destination, value, HOST)
    assert status == 400
    assert reason in why, why


def test_absolute_destination_needs_the_host_of_the_request() -> None:
    assert refusal(parse_destination, f"http://{HOST}/x", None) == (
        400, "Destination names another host than the request")
    assert parse_destination("/x", None).display == "/x"


@pytest.mark.parametrize("value", [
    f"/{OTHER}/dir/file.txt",
    f"http://{HOST}/{OTHER}/",
    "/",
    f"http://{HOST}",
    f"/{DEST}x/file.txt",
])
def test_destination_must_stay_under_the_same_destination(value: str) -> None:
    for method in ("COPY", "MOVE"):
        assert refusal(check_destination, described(method), [value], HOST) == (
            403, SAME_DESTINATION)


def test_source_at_the_root_has_no_destination_to_stay_in() -> None:
    assert refusal(check_destination, described(target="/"), ["/"], HOST) == (
        403, SAME_DESTINATION)


def test_node_may_copy_and_move_anywhere_under_the_destination() -> None:
    for method in ("COPY", "MOVE"):
        for value in (f"/{DEST}/", f"/{DEST}/other/dir/", f"http://{HOST}/{DEST}/copy.txt"):
            got = check_destination(described(method), [value], HOST)
            assert got == parse_destination(value, HOST)


def test_destination_is_put_to_the_policy() -> None:
    # A module is refused COPY and MOVE of its own target already; were it not, the
    # Destination's own decision would refuse it: the policy is asked about both paths.
    for method in ("COPY", "MOVE"):
        request = described(method, f"/{DEST}/traefik/{OWN}/config", MODULE)
        assert not decide(request).allowed
        status, why = refusal(check_destination, request, [f"/{DEST}/traefik/{OWN}/copy"],
                              HOST)
        assert (status, why) == (403, "Destination: WebDAV is read-only for modules")


@pytest.mark.parametrize("values", [[], [f"/{DEST}/a", f"/{DEST}/b"]])
def test_exactly_one_destination_header(values: list[str]) -> None:
    assert refusal(check_destination, described(), values, HOST) == (
        400, "COPY needs exactly one Destination header")


def test_only_copy_and_move_name_a_destination() -> None:
    headers = CIMultiDict({"Host": HOST, "Destination": f"/{OTHER}/x"})
    for method in ("PUT", "GET", "PROPFIND", "DELETE", "MKCOL", "LOCK"):
        assert references_of(described(method), headers) is None
    assert refusal(references_of, described("MOVE"), headers) == (403, SAME_DESTINATION)
    headers["Destination"] = f"http://{HOST}/{DEST}/x%20y"
    assert references_of(described("MOVE"), headers) == References(
        canonicalise(f"/{DEST}/x%20y"))


def test_refusals_read_as_the_gateway_answers_them() -> None:
    assert (HeaderRefused(Refusal.FORBIDDEN, SAME_DESTINATION).text
            == f"forbidden: {SAME_DESTINATION}")
    assert HeaderRefused(Refusal.BAD_REFERENCE, "x").text == "bad request: x"


TOKEN = "<opaquelocktoken:f81d4fae-7dec-11d0-a765-00a0c91e6bf6>"


@pytest.mark.parametrize("value", [
    f"({TOKEN})",
    f'(Not {TOKEN} ["I am an (etag) <with> brackets"])',
    f"<http://10.5.4.9:4694/{DEST}/x> ({TOKEN})",  # another host: names nothing here
    f"</{DEST}/x> ({TOKEN})",  # not an absolute URI: rclone alone ignores it as well
    f"<https://{HOST}.example/{DEST}/x> ({TOKEN})",
    "",
])
def test_if_without_resources_here_goes_on_as_it_came(value: str) -> None:
    assert parse_if(value, HOST) == ((value,) if value else ())
    headers = CIMultiDict({"Host": HOST, "If": value})
    assert references_of(described("PUT"), headers) is None


def test_if_resources_here_are_canonical() -> None:
    value = (f"<http://{HOST}/{DEST}/d%69r/caf%c3%a9> ({TOKEN}) "
             f'<http://10.5.4.9/x> (["etag"]) <HTTP://{HOST}/{DEST}/> (Not {TOKEN})')
    assert parse_if(value, HOST) == (
        canonicalise(f"/{DEST}/dir/caf%C3%A9"),
        f' ({TOKEN}) <http://10.5.4.9/x> (["etag"]) ',
        canonicalise(f"/{DEST}/"),
        f" (Not {TOKEN})",
    )


@pytest.mark.parametrize(("value", "reason"), [
    (f"<http://{HOST}/{DEST}/../x> ({TOKEN})", "If resource: dot segment in path"),
    (f"<http://{HOST}/{DEST}/a%2Fb> ({TOKEN})", "If resource: escaped '/' in path"),
    (f"<http://{HOST}/{DEST}//x> ({TOKEN})", "If resource: empty path segment"),
    (f"<http://{HOST}/{DEST}/x?y> ({TOKEN})", "query or fragment in If resource"),
    (f"({TOKEN}", "malformed If header"),
    (f"{TOKEN})", "malformed If header"),
    ("(<opaquelocktoken:x)", "malformed If header"),
    ('(["etag)', "malformed If header"),
    (f"<http://{HOST}/{DEST}/x ({TOKEN})", "malformed If header"),
])
def test_malformed_if_is_a_bad_request(value: str, reason: str) -> None:
    assert refusal(parse_if, value, HOST) == (400, reason)


def test_rewrite_names_the_next_hop_and_the_canonical_paths() -> None:
    headers = CIMultiDict({"Destination": f"http://{HOST}/{DEST}/a%2fb", "Depth": "0",
                           "If": "stale", "Overwrite": "F"})
    headers.add("If", "stale too")
    references = References(
        parse_destination(f"http://{HOST}/{DEST}/d%69r/caf%C3%A9/", HOST),
        (parse_if(f"<http://{HOST}/{DEST}/x%2d> ({TOKEN})", HOST), parse_if(f"({TOKEN})", HOST)),
    )
    rewrite_references(headers, references, "backend")
    assert headers.getall("Destination") == [f"http://backend/{DEST}/dir/caf%C3%A9/"]
    assert headers.getall("If") == [f"<http://backend/{DEST}/x-> ({TOKEN})", f"({TOKEN})"]
    assert (headers["Depth"], headers["Overwrite"]) == ("0", "F")


def test_rewrite_leaves_what_names_nothing_here() -> None:
    headers = CIMultiDict({"If": f"({TOKEN})"})
    rewrite_references(headers, References(canonicalise(f"/{DEST}/x")), "backend")
    assert headers == CIMultiDict({"If": f"({TOKEN})", "Destination": f"http://backend/{DEST}/x"})


def test_rewrite_uses_the_host_the_upstream_pool_sends() -> None:
    references = References(canonicalise(f"/{DEST}/x"))
    for pool, authority in (
        (ConnectionPool.unix("/nonexistent.sock"), "backend"),
        (ConnectionPool.tcp("10.5.4.2", 4694), "10.5.4.2:4694"),
        (ConnectionPool.tcp("fd00::2", 4694), "[fd00::2]:4694"),
    ):
        headers: CIMultiDict[str] = CIMultiDict()
        rewrite_references(headers, references, pool.host)
        assert headers["Destination"] == f"http://{authority}/{DEST}/x"


URI_PIECES = st.sampled_from([
    "/", DEST, OTHER, "x", "..", ".", "%2e", "%2F", "%20", "%C3%A9", "%zz", "%", "?", "#",
    "é", " ", "\\", "http://", "https://", HOST, "127.0.0.1:4695", "@", "<", ">", "(", ")",
    '"', "[", "]", "Not ", TOKEN, "ftp://", ":80",
])
VALUES = st.one_of(st.lists(URI_PIECES, max_size=12).map("".join), st.text(max_size=40))


@given(VALUES)
@settings(max_examples=500)
def test_any_destination_is_canonical_or_refused(value: str) -> None:
    try:
        target = parse_destination(value, HOST)
    except HeaderRefused as exc:
        assert exc.status == 400 and exc.reason
        return
    # What is sent on names the same path again, through the same checks.
    assert parse_destination(f"http://{HOST}{target.path}", HOST) == target
    assert parse_destination(target.path, None) == target


@given(VALUES)
@settings(max_examples=500)
def test_any_if_is_kept_or_canonical_or_refused(value: str) -> None:
    try:
        condition = parse_if(value, HOST)
    except HeaderRefused as exc:
        assert exc.status == 400 and exc.reason
        return
    headers: CIMultiDict[str] = CIMultiDict({"If": value})
    rewrite_references(headers, References(conditions=(condition,)), "backend")
    sent = headers["If"]
    if not any(isinstance(piece, Target) for piece in condition):
        assert sent == value
    # The next hop finds the same resources, under its own authority.
    assert parse_if(sent, "backend") == condition
