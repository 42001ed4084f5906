import pytest

from gateway.access.paths import MAX_PATH_BYTES, PathError, canonicalise

ACCEPTED = [
    ("/", "/", ()),
    ("/a/b", "/a/b", ("a", "b")),
    ("/a/b/", "/a/b/", ("a", "b")),
    ("/a%20b/c", "/a%20b/c", ("a b", "c")),
    ("/caf%c3%a9", "/caf%C3%A9", ("café",)),
    ("/a%3Fb", "/a%3Fb", ("a?b",)),
    ("/%61%62", "/ab", ("ab",)),
    ("/a:b@c", "/a:b@c", ("a:b@c",)),
    ("/x?create=true", "/x?create=true", ("x",)),
]


@pytest.mark.parametrize(("raw", "sent", "segments"), ACCEPTED)
def test_accepted_targets_have_one_canonical_form(raw: str, sent: str, segments: tuple) -> None:
    target = canonicalise(raw)
    assert target.path_and_query == sent
    assert target.segments == segments
    assert canonicalise(target.path_and_query) == target


REJECTED = [
    ("*", "origin-form"),
    ("http://host/a", "origin-form"),
    ("/a/../b", "dot segment"),
    ("/a/./b", "dot segment"),
    ("/a/%2e%2e/b", "dot segment"),
    ("/a/%2E/b", "dot segment"),
    ("/a/.%2e/b", "dot segment"),
    ("/a//b", "empty path segment"),
    ("//a", "empty path segment"),
    ("/a/b//", "empty path segment"),
    ("/a%2fb", "escaped '/'"),
    ("/a%2Fb", "escaped '/'"),
    ("/a\\b", "backslash"),
    ("/a%5cb", "backslash"),
    ("/a%00b", "control character"),
    ("/a\x00b", "control character"),
    ("/a%0ab", "control character"),
    ("/a\tb", "control character"),
    ("/a%7fb", "control character"),
    ("/a b", "space"),
    ("/a%zz", "malformed"),
    ("/a%4", "malformed"),
    ("/a%", "malformed"),
    ("/%ff%fe", "UTF-8"),
    ("/%c3", "UTF-8"),
    ("/caf\u00e9", "non-ASCII"),
    ("/" + "a" * 256, "segment too long"),
    ("/" + "%61" * 256, "segment too long"),
    ("/" + "/".join(["a" * 200] * 21), "path too long"),
    ("/a?x=%zz", "malformed"),
    ("/a?x=%00", "control character"),
    ("/a?x y", "space"),
]


@pytest.mark.parametrize(("raw", "reason"), REJECTED)
def test_rejected_targets_name_their_reason(raw: str, reason: str) -> None:
    with pytest.raises(PathError, match=reason):
        canonicalise(raw)


def test_limits_are_inclusive() -> None:
    assert canonicalise("/" + "a" * 255).segments == ("a" * 255,)
    long_path = "/" + "/".join(["a" * 255] * 16)
    assert len(long_path) == 4096
    assert len(canonicalise(long_path).path) == MAX_PATH_BYTES


def test_display_form_is_decoded() -> None:
    assert canonicalise("/a%20b/c/").display == "/a b/c/"
