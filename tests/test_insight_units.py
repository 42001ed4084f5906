"""Backup insight, the pure parts: what is recorded from requests, what a listing says,
and the report built from both."""

from __future__ import annotations

from gateway.access.paths import canonicalise
from gateway.access.repository import RepositoryKey
from gateway.insight.page import html_page, text_table
from gateway.insight.record import FinishedRequest, Recorder, recorded_under
from gateway.insight.report import STALE_AFTER, build_report
from gateway.insight.scan import figures, repositories, space
from gateway.status.model import DestinationHealth

DEST = "dddd0000-0000-4000-8000-000000000001"
UUID = "uuuu0000-0000-4000-8000-000000000001"
KEY = RepositoryKey(DEST, "traefik", UUID)
SNAP = "a" * 64
LOCK = "b" * 64


def exchange(method: str, path: str, status: int = 200, *, allowed: bool = True,
             reason: str = "", is_node: bool = False, bytes_in: int = 0, bytes_out: int = 0,
             at: float = 1000.0) -> FinishedRequest:
    return FinishedRequest(canonicalise(path), method, status, allowed, reason, is_node, bytes_in,
                    bytes_out, at)


def test_repository_paths() -> None:
    assert canonicalise(f"/{DEST}/traefik").address is None
    where = canonicalise(f"/{DEST}/traefik/{UUID}.json").address
    assert where is not None and recorded_under(where) == RepositoryKey(
        DEST, "traefik", f"{UUID}.json")  # a name
    where = canonicalise(f"/{DEST}/traefik/{UUID}/data/ab/{'ab' * 32}").address
    assert where is not None and (recorded_under(where), where.object_type, where.object_id) == (
        KEY, "data", "ab" * 32)
    where = canonicalise(f"/{DEST}/traefik/{UUID}/config").address
    assert where is not None and where.is_config


def test_recorder_follows_uploads_locks_restores_and_refusals() -> None:
    recorder = Recorder()
    base = f"/{DEST}/traefik/{UUID}"
    recorder.record(exchange("POST", f"{base}/locks/{LOCK}", bytes_in=100, at=10))
    recorder.record(exchange("POST", f"{base}/data/{'c' * 64}", bytes_in=5000, at=11))
    recorder.record(exchange("POST", f"{base}/data/{'d' * 64}", 403, bytes_in=7, at=12))
    assert recorder.record(exchange("POST", f"{base}/snapshots/{SNAP}", bytes_in=300,
                                    at=13)) == KEY
    recorder.record(exchange("DELETE", f"{base}/locks/{LOCK}", at=14))
    recorder.record(exchange("GET", f"{base}/data/{'c' * 64}", bytes_out=5000, at=20))
    recorder.record(exchange("GET", f"{base}/data/{'c' * 64}", bytes_out=5000, is_node=True,
                             at=21))  # a node's check is no restore
    recorder.record(exchange("DELETE", f"{base}/data/{'c' * 64}", 403, allowed=False,
                             reason="modules may not delete backup data", at=22))
    activity = recorder.activity(KEY)
    assert activity is not None
    assert (activity.uploaded_bytes, activity.uploaded_objects) == (5400, 3)
    assert (activity.last_snapshot_at, activity.last_upload_at) == (13, 13)
    assert (activity.restored_bytes, activity.last_restore_at) == (5000, 20)
    assert activity.locks == {} and activity.removed_locks == {LOCK}
    assert activity.refused == {"modules may not delete backup data": 1}


def test_listing_gives_the_figures_of_a_repository() -> None:
    listing = [
        {"Path": "config", "Size": 155, "ModTime": "2026-12-01T10:00:00Z"},
        {"Path": f"data/ab/{'ab' * 32}", "Size": 4_000_000,
         "ModTime": "2026-12-01T10:00:01.123456789Z"},
        {"Path": f"index/{'1' * 64}", "Size": 900, "ModTime": "2026-12-01T10:00:02Z"},
        {"Path": f"keys/{'2' * 64}", "Size": 450, "ModTime": "2026-12-01T10:00:00Z"},
        {"Path": f"snapshots/{'3' * 64}", "Size": 250, "ModTime": "2026-12-01T10:00:03Z"},
        {"Path": f"snapshots/{'4' * 64}", "Size": 250, "ModTime": "2026-12-02T10:00:03+00:00"},
        {"Path": f"locks/{LOCK}", "Size": 200, "ModTime": "2026-12-02T11:00:00Z"},
    ]
    found = figures(listing, now=5.0)
    assert found.stored_bytes == 155 + 4_000_000 + 900 + 450 + 250 + 250 + 200
    assert found.objects == {"data": 1, "index": 1, "keys": 1, "locks": 1, "snapshots": 2}
    assert found.snapshots == 2
    assert found.newest_snapshot_at == 1796205603.0
    assert found.locks == {LOCK: 1796209200.0}
    assert repositories([{"Path": "traefik", "IsDir": True},
                         {"Path": f"traefik/{UUID}", "IsDir": True},
                         {"Path": f"traefik/{UUID}/config", "IsDir": False},
                         {"Path": f"traefik/{UUID}/data", "IsDir": True},
                         {"Path": "traefik/other/data", "IsDir": True}], DEST) == [KEY]
    assert space({"total": 100, "free": 40, "used": 60}).free == 40
    assert space({"used": 60}).free is None  # a remote that does not tell


def test_report_flags_stale_repositories_and_old_locks_and_renders() -> None:
    now = 1_000_000.0
    recorder = Recorder()
    base = f"/{DEST}/traefik/{UUID}"
    recorder.record(exchange("POST", f"{base}/snapshots/{SNAP}", at=now - STALE_AFTER - 60))
    recorder.record(exchange("POST", f"{base}/locks/{LOCK}", at=now - 7200))
    other = RepositoryKey(DEST, "dokuwiki", "o" * 8)
    recorder.record(exchange("POST", f"{other.path}/snapshots/{SNAP}", at=now - 3600))
    elsewhere = RepositoryKey("elsewhere", "x", "y")
    recorder.record(exchange("POST", f"{elsewhere.path}/snapshots/{SNAP}", at=now))
    report = build_report(
        node_id="1", now=now, served_here={DEST}, activity=recorder.repositories, stored={},
        spaces={}, module_ids={UUID: "traefik1"},
        destinations=[DestinationHealth(DEST, "local", "cluster",
                                        {"served": "here", "state": "ok"}),
                      DestinationHealth("elsewhere", "n2", "cluster",
                                        {"served": "peer", "state": "forwarded",
                                         "peer": "node2", "peer_address": "10.5.4.2"})],
        last_scan_at=None)
    by_module = {r.label: r for r in report.repositories}
    assert set(by_module) == {"traefik1", "o" * 8}  # only what is served here
    assert by_module["traefik1"].stale and by_module["traefik1"].old_lock
    assert by_module["traefik1"].oldest_lock_age == 7200
    assert not by_module["o" * 8].stale and not by_module["o" * 8].old_lock
    assert [r.label for r in report.stale(26 * 3600)] == ["traefik1"]
    page = html_page(report)
    assert "traefik1" in page and "\u26a0" in page and LOCK not in page
    assert 'href="http://10.5.4.2:4694/status"' in page and "<script" not in page
    table = text_table(report)
    assert "traefik1" in table and "no snapshot in 26 h" in table
