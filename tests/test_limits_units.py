"""Limits, the pure parts: the values of the Limits keys parsed as rclone reads them, the
keeper of the last good values, the book of stored bytes and its quota decision, the
bandwidth buckets and their schedules, and the requests in flight.

No process is started. The bandwidth tests wait on real time, a fraction of a second
each; a rate is checked from below only (never "faster than"), and a wake-up with a
deadline far from the time it would otherwise take.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from datetime import datetime, timedelta

import pytest
from harness import wait_until
from identities import TRAEFIK_UUID

from gateway.access.repository import RepositoryKey
from gateway.cluster.state import RawLimits
from gateway.limits.concurrency import InFlight
from gateway.limits.config import DEFAULT_MODULE_CAP, Limits, LimitsKeeper
from gateway.limits.limiter import Limiter
from gateway.limits.quota import MAX_LOCKS, UsageBook
from gateway.limits.shaping import BURST_SECONDS, MIN_BURST, SLICE, Shaper, TokenBucket
from gateway.limits.values import (
    MINUTES_PER_WEEK,
    BadValue,
    parse_cap,
    parse_rate,
    parse_schedule,
    parse_size,
)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
DEST = "dddd0000-0000-4000-8000-000000000001"
OTHER_DEST = "dddd0000-0000-4000-8000-000000000002"
UUID = "uuuu0000-0000-4000-8000-000000000001"
KEY = RepositoryKey(DEST, "traefik", UUID)
OTHER_KEY = RepositoryKey(DEST, "traefik", "uuuu0000-0000-4000-8000-000000000002")
LOGGER = "rclone_gateway.limits"
MONDAY = datetime(2026, 12, 7)  # a Monday, 00:00
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DEADLINE = 5.0  # seconds: a wait that should end at once, on a loaded machine too


def at(day: str, hour: int, minute: int, second: float = 0.0) -> datetime:
    return MONDAY + timedelta(days=DAYS.index(day), hours=hour, minutes=minute,
                              seconds=second)


def run(scenario: Awaitable[object]) -> object:
    return asyncio.run(scenario)  # type: ignore[arg-type]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING]


# --- values.py: sizes, rates, caps -----------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("1073741824", 1073741824),
    ("0", 0),
    ("7b", 7),
    ("512k", 512 * KiB),
    ("512KiB", 512 * KiB),
    ("1.5M", 3 * MiB // 2),
    ("10G", 10 * GiB),
    ("10g", 10 * GiB),
    ("2 MiB", 2 * MiB),
    ("1T", TiB),
    ("1P", 1 << 50),
    (" 3G ", 3 * GiB),
])
def test_sizes_are_bytes_with_binary_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("1", KiB),  # a bare number is KiB/s, as rclone's --bwlimit
    ("100", 100 * KiB),
    ("0.5", 512),
    ("1b", 1),
    ("10M", 10 * MiB),
    ("1.5M", 3 * MiB // 2),
    ("2G", 2 * GiB),
    ("0", None),  # rclone: 0 is no limit
    ("0M", None),
    ("off", None),
    ("OFF", None),
    (" off ", None),
])
def test_rates_are_bytes_per_second_a_bare_number_in_kib(text: str, expected: int | None) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", [
    "", "   ", "-1", "-10M", "abc", "10X", "10 M M", "M", "1,5M", "10MiBs", "10K10",
])
def test_sizes_and_rates_that_do_not_parse_are_refused(text: str) -> None:
    with pytest.raises(BadValue):
        parse_size(text)
    with pytest.raises(BadValue):
        parse_rate(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("8", 8), ("1", 1), (" 3 ", 3), ("off", None), ("Off", None),
])
def test_caps_are_positive_counts_or_off(text: str, expected: int | None) -> None:
    assert parse_cap(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "", " ", "abc", "8x", "+3", "1e2"])
def test_caps_that_are_not_positive_counts_are_refused(text: str) -> None:
    with pytest.raises(BadValue):
        parse_cap(text)


# --- values.py: schedules --------------------------------------------------------------------


def test_a_single_rate_holds_all_week() -> None:
    schedule = parse_schedule("10M")
    for when in (at("mon", 0, 0), at("wed", 12, 34), at("sun", 23, 59, 59.9)):
        assert schedule.rate_at(when) == 10 * MiB
        assert schedule.minutes_to_next_change(when) == MINUTES_PER_WEEK
    assert schedule.constant
    assert parse_schedule("off").rate_at(at("tue", 9, 0)) is None
    assert parse_schedule("512").rate_at(at("tue", 9, 0)) == 512 * KiB


@pytest.mark.parametrize(("when", "expected"), [
    (at("mon", 7, 59), None),  # before the first slot: the last slot of the day before (Sunday)
    (at("tue", 7, 59), None),
    (at("mon", 8, 0), 10 * MiB),
    (at("mon", 12, 0), 10 * MiB),
    (at("mon", 18, 59, 59.9), 10 * MiB),
    (at("mon", 19, 0), None),
    (at("mon", 23, 59), None),
    (at("sun", 12, 0), 10 * MiB),  # a slot without a day holds every day
])
def test_a_timetable_gives_the_rate_of_the_slot_begun_last(when: datetime,
                                                          expected: int | None) -> None:
    schedule = parse_schedule("08:00,10M 19:00,off")
    assert schedule.rate_at(when) == expected
    assert not schedule.constant


def test_before_the_first_slot_of_a_day_the_previous_days_last_slot_holds() -> None:
    schedule = parse_schedule("08:00,off 19:00,1M")  # the wrap gives a rate, not a default off
    assert schedule.rate_at(at("mon", 7, 59)) == MiB  # Sunday 19:00, across the week's end
    assert schedule.rate_at(at("thu", 0, 0)) == MiB
    assert schedule.rate_at(at("thu", 8, 0)) is None


@pytest.mark.parametrize(("when", "expected"), [
    (at("mon", 7, 59), None),  # still Saturday's slot, across the week's end
    (at("mon", 8, 0), MiB),
    (at("tue", 12, 0), MiB),
    (at("fri", 23, 59), MiB),
    (at("sat", 0, 0), None),
    (at("sun", 12, 0), None),
    (at("sun", 23, 59, 59.9), None),
])
def test_weekday_slots_hold_until_the_next_slot_of_the_week(when: datetime,
                                                           expected: int | None) -> None:
    schedule = parse_schedule("Mon-08:00,1M Sat-00:00,off")
    assert schedule.rate_at(when) == expected


def test_weekday_names_ignore_case_and_slots_may_be_apart_by_several_spaces() -> None:
    schedule = parse_schedule("mon-08:00,1M   SAT-00:00,off")
    assert schedule.rate_at(at("wed", 3, 0)) == MiB
    assert schedule.rate_at(at("sat", 3, 0)) is None


def test_a_rate_pair_gives_upload_then_download() -> None:
    pair = parse_schedule("10M:1M", side=0), parse_schedule("10M:1M", side=1)
    assert [s.rate_at(at("mon", 12, 0)) for s in pair] == [10 * MiB, MiB]
    half_off = parse_schedule("10M:off", side=1)
    assert half_off.rate_at(at("mon", 12, 0)) is None
    both = parse_schedule("10M", side=1)  # one value: both directions
    assert both.rate_at(at("mon", 12, 0)) == 10 * MiB
    timetable = "08:00,10M:off 19:00,off:512k"
    up, down = parse_schedule(timetable, side=0), parse_schedule(timetable, side=1)
    assert (up.rate_at(at("mon", 12, 0)), down.rate_at(at("mon", 12, 0))) == (10 * MiB, None)
    assert (up.rate_at(at("mon", 20, 0)), down.rate_at(at("mon", 20, 0))) == (None, 512 * KiB)


@pytest.mark.parametrize("text", [
    "",
    "   ",
    "25:00,1M",  # no such hour
    "08:60,1M",  # no such minute
    "8h,1M",
    "08:00 19:00,off",  # a slot without its rate
    "08:00,",
    ",1M",
    "08:00,10X",  # an unknown unit
    "08:00,-1M",
    "08:00,1M 19:00,10X",  # one bad slot spoils the timetable
    "Mon-08:00",
    "Xyz-08:00,1M",
    "08:00,1M,2M",
    "10M:1M:2M",
    "08:00,1M:2M:3M",
    "10X",
])
def test_schedules_that_do_not_parse_are_refused(text: str) -> None:
    with pytest.raises(BadValue):
        parse_schedule(text)


@pytest.mark.parametrize(("when", "minutes"), [
    (at("mon", 7, 59, 30), 0.5),
    (at("mon", 8, 0), 11 * 60),  # at the boundary: the next one
    (at("mon", 18, 59), 1),
    (at("wed", 19, 0), 13 * 60),
    (at("sun", 19, 0), 13 * 60),  # across the week's end, to Monday 08:00
    (at("sun", 23, 59, 15), 8 * 60 + 0.75),
])
def test_minutes_to_the_next_change_of_a_daily_timetable(when: datetime,
                                                        minutes: float) -> None:
    schedule = parse_schedule("08:00,10M 19:00,off")
    assert schedule.minutes_to_next_change(when) == pytest.approx(minutes)


@pytest.mark.parametrize(("when", "minutes"), [
    (at("fri", 23, 59), 1),
    (at("sat", 0, 0), 2 * 24 * 60 + 8 * 60),  # Saturday 00:00 -> Monday 08:00
    (at("sun", 12, 0), 20 * 60),
    (at("mon", 7, 0), 60),
    (at("mon", 8, 0), 4 * 24 * 60 + 16 * 60),  # Monday 08:00 -> Saturday 00:00
])
def test_minutes_to_the_next_change_of_weekday_slots(when: datetime, minutes: float) -> None:
    schedule = parse_schedule("Mon-08:00,1M Sat-00:00,off")
    assert schedule.minutes_to_next_change(when) == pytest.approx(minutes)


# --- config.py: the keeper of the limits in force --------------------------------------------


def good_raw() -> RawLimits:
    return RawLimits(
        quota={DEST: {"traefik1": "10G", "*": "1G"}},
        bwlimit={"upload": "10M", "module/traefik1/download": "08:00,1M 19:00,off"},
        concurrency={"module": "4", "node": "2"},
    )


def test_no_limits_keys_give_the_defaults() -> None:
    limits = LimitsKeeper().update(RawLimits())
    assert DEFAULT_MODULE_CAP == 8
    assert (limits.module_cap, limits.node_cap) == (8, None)
    assert (limits.cap(is_node=False), limits.cap(is_node=True)) == (8, None)
    assert limits.bandwidth == {} and limits.quota(DEST, "traefik1") is None
    assert Limits().cap(is_node=False) == DEFAULT_MODULE_CAP


def test_the_keeper_parses_each_key() -> None:
    limits = LimitsKeeper().update(good_raw())
    assert limits.quota(DEST, "traefik1") == 10 * GiB
    assert limits.bandwidth["upload"].rate_at(at("mon", 3, 0)) == 10 * MiB
    download = limits.bandwidth["module/traefik1/download"]
    assert [download.rate_at(at("mon", h, 0)) for h in (7, 8, 19)] == [None, MiB, None]
    assert (limits.module_cap, limits.node_cap) == (4, 2)
    assert (limits.cap(is_node=False), limits.cap(is_node=True)) == (4, 2)


def test_a_bad_value_keeps_the_last_good_value_of_that_field() -> None:
    keeper = LimitsKeeper()
    keeper.update(good_raw())
    limits = keeper.update(RawLimits(
        quota={DEST: {"traefik1": "lots", "*": "2G"}},  # the other field still changes
        bwlimit={"upload": "10X", "module/traefik1/download": "25:00,1M"},
        concurrency={"module": "many", "node": "0"},
    ))
    assert limits.quota(DEST, "traefik1") == 10 * GiB
    assert limits.quota(DEST, "someone") == 2 * GiB
    assert limits.bandwidth["upload"].text == "10M"
    assert limits.bandwidth["module/traefik1/download"].text == "08:00,1M 19:00,off"
    assert (limits.module_cap, limits.node_cap) == (4, 2)
    assert keeper.current is limits
    fixed = keeper.update(RawLimits(bwlimit={"upload": "20M"}))  # a good value again applies
    assert fixed.bandwidth["upload"].rate_at(at("mon", 0, 0)) == 20 * MiB


def test_a_bad_value_without_a_good_one_before_is_ignored() -> None:
    limits = LimitsKeeper().update(RawLimits(
        quota={DEST: {"traefik1": "-5G", "*": "1G"}},
        bwlimit={"upload": "fast"},
        concurrency={"module": "0", "node": "two"},
    ))
    assert limits.quota(DEST, "traefik1") == GiB  # the `*` default, its own value ignored
    assert limits.bandwidth == {}
    assert (limits.module_cap, limits.node_cap) == (DEFAULT_MODULE_CAP, None)


def test_a_bad_value_is_logged_once_until_it_changes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    keeper = LimitsKeeper()
    keeper.update(RawLimits(bwlimit={"upload": "10X"}))
    assert len(warnings_of(caplog)) == 1
    assert "rclone-gateway/bwlimit field 'upload'" in warnings_of(caplog)[0]
    assert "ignored" in warnings_of(caplog)[0]
    for _ in range(3):
        keeper.update(RawLimits(bwlimit={"upload": "10X"}))
    assert len(warnings_of(caplog)) == 1
    keeper.update(RawLimits(bwlimit={"upload": "10Y"}))  # another bad value: told
    assert len(warnings_of(caplog)) == 2
    keeper.update(RawLimits(bwlimit={"upload": "10M"}))
    keeper.update(RawLimits(bwlimit={"upload": "10Y"}))  # bad again after a good one: told
    assert len(warnings_of(caplog)) == 3
    assert "keeping the last good value" in warnings_of(caplog)[2]
    keeper.update(RawLimits(bwlimit={"upload": "10Y"}))
    assert len(warnings_of(caplog)) == 3


def test_each_bad_field_is_logged_with_its_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    LimitsKeeper().update(RawLimits(
        quota={DEST: {"traefik1": "lots"}},
        concurrency={"module": "many"},
    ))
    told = warnings_of(caplog)
    assert len(told) == 2
    assert any(f"rclone-gateway/quota/{DEST} field 'traefik1'" in line for line in told)
    assert any("rclone-gateway/concurrency field 'module'" in line for line in told)


def test_a_removed_field_is_gone_and_does_not_come_back_with_a_bad_value(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    keeper = LimitsKeeper()
    keeper.update(good_raw())
    limits = keeper.update(RawLimits())
    assert limits.quota(DEST, "traefik1") is None
    assert limits.bandwidth == {}
    assert (limits.module_cap, limits.node_cap) == (DEFAULT_MODULE_CAP, None)
    limits = keeper.update(RawLimits(  # bad values now: nothing good to keep
        quota={DEST: {"traefik1": "lots"}},
        bwlimit={"upload": "10X"},
        concurrency={"module": "many", "node": "0"},
    ))
    assert limits.quota(DEST, "traefik1") is None
    assert limits.bandwidth == {}
    assert (limits.module_cap, limits.node_cap) == (DEFAULT_MODULE_CAP, None)
    assert all("ignored" in line for line in warnings_of(caplog))


def test_off_removes_a_concurrency_cap_and_is_kept_as_a_good_value() -> None:
    keeper = LimitsKeeper()
    limits = keeper.update(RawLimits(concurrency={"module": "off", "node": "3"}))
    assert (limits.module_cap, limits.node_cap) == (None, 3)
    limits = keeper.update(RawLimits(concurrency={"module": "lots", "node": "off"}))
    assert (limits.module_cap, limits.node_cap) == (None, None)
    limits = keeper.update(RawLimits(concurrency={"module": "2"}))
    assert (limits.module_cap, limits.node_cap) == (2, None)


def test_unknown_concurrency_fields_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    limits = LimitsKeeper().update(RawLimits(concurrency={"modules": "3", "nodes": "1"}))
    assert (limits.module_cap, limits.node_cap) == (DEFAULT_MODULE_CAP, None)
    assert len(warnings_of(caplog)) == 2


def test_a_modules_own_quota_wins_over_the_star_default() -> None:
    limits = LimitsKeeper().update(RawLimits(quota={
        DEST: {"*": "1G", "traefik1": "5G", "nextcloud1": "512M"},
        OTHER_DEST: {"traefik1": "1T"},
    }))
    assert limits.quota(DEST, "traefik1") == 5 * GiB
    assert limits.quota(DEST, "nextcloud1") == 512 * MiB
    assert limits.quota(DEST, "loki1") == GiB
    assert limits.quota(OTHER_DEST, "traefik1") == TiB
    assert limits.quota(OTHER_DEST, "loki1") is None  # no `*` there: no quota
    assert limits.quota("dddd0000-0000-4000-8000-00000000ffff", "traefik1") is None


def test_bwlimit_field_names_are_checked_and_give_the_side_of_a_pair(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    good = ("upload", "download", "module/traefik1/upload", "module/traefik1/download")
    bad = ("uploads", "Upload", "module//upload", "module/traefik1/sideways",
           "module/traefik1", "module/a/b/upload", "node/1/upload", "traefik1/upload")
    limits = LimitsKeeper().update(RawLimits(bwlimit={
        name: "10M:1M" for name in good + bad}))
    assert sorted(limits.bandwidth) == sorted(good)
    noon = at("mon", 12, 0)
    assert {name: limits.bandwidth[name].rate_at(noon) for name in good} == {
        "upload": 10 * MiB, "download": MiB,
        "module/traefik1/upload": 10 * MiB, "module/traefik1/download": MiB}
    assert len(warnings_of(caplog)) == len(bad)


# --- quota.py: the book of stored bytes --------------------------------------------------------


@pytest.mark.parametrize("field,bad", [
    ("concurrency", "\u00b2"),  # a digit to str.isdigit, not to int()
    ("concurrency", "1" * 5000),
    ("quota", "1" * 400),  # a float overflow
    ("bwlimit", "9" * 300 + "P"),
])
def test_values_beyond_any_number_are_bad_values_not_errors(field: str, bad: str) -> None:
    good = {"concurrency": "3", "quota": "5", "bwlimit": "1M"}

    def raw(values: dict[str, str]) -> RawLimits:
        return RawLimits(concurrency={"module": values["concurrency"]},
                         quota={"d": {"*": values["quota"]}},
                         bwlimit={"upload": values["bwlimit"]})

    keeper = LimitsKeeper()
    keeper.update(raw(good))
    limits = keeper.update(raw({**good, field: bad}))  # raises nothing: the last good stays
    assert limits.module_cap == 3 and limits.quota("d", "x") == 5
    assert limits.bandwidth["upload"].rates == (MiB,)


def test_off_exempts_a_module_from_the_star_quota() -> None:
    limits = LimitsKeeper().update(RawLimits(quota={"d": {"*": "1G", "big1": "off"}}))
    assert limits.quota("d", "big1") is None and limits.quota("d", "other1") == 1 << 30


def test_used_is_unknown_before_any_listing_and_zero_after_a_scan_that_missed_it() -> None:
    book = UsageBook()
    assert book.used(KEY) is None
    book.added(KEY, 100)  # counted, but the base is still unknown
    assert book.used(KEY) is None
    assert book.check(KEY, 10 * GiB, quota=GiB) is None  # unknown: let in (and reserved)
    book.full_scan_ended(found={OTHER_KEY}, listed={DEST})
    assert book.used(KEY) == 100  # not found: held nothing but what the gateway passed
    assert book.used(RepositoryKey(DEST, "loki", UUID)) == 0  # never seen at all: empty
    assert book.used(RepositoryKey("elsewhere", "loki", UUID)) is None  # not listed


def test_a_destination_whose_listing_failed_keeps_its_count() -> None:
    """A reload removes the configuration a scan runs with, or a remote does not answer:
    the repositories of that destination are not found, and not empty either."""
    book = UsageBook()
    book.listing_started(KEY)
    book.listed(KEY, 5000)
    book.added(KEY, 300)
    book.full_scan_ended(found=set(), listed=set())
    assert book.used(KEY) == 5300
    assert book.check(KEY, 1000, quota=6000) is not None  # still over


def test_listed_bytes_plus_uploads_minus_deletes() -> None:
    book = UsageBook()
    book.listing_started(KEY)
    book.listed(KEY, 1000)
    assert book.used(KEY) == 1000
    assert book.used(OTHER_KEY) is None  # one listing says nothing of the others
    book.added(KEY, 500)
    book.removed(KEY, 200)
    assert book.used(KEY) == 1300
    book.removed(KEY, 5000)  # a delete of something the listing did not count
    assert book.used(KEY) == 0
    book.listing_started(KEY)
    book.listed(KEY, 700)  # a new listing is the new base
    assert book.used(KEY) == 700


def test_an_upload_during_a_listing_stays_counted_after_it() -> None:
    book = UsageBook()
    book.listing_started(KEY)
    book.listed(KEY, 1000)
    book.listing_started(KEY)
    book.added(KEY, 300)  # the listing may not have seen it
    book.listed(KEY, 1000)
    assert book.used(KEY) == 1300
    book.listing_started(KEY)
    book.listed(KEY, 1300)  # the next listing saw it: counted once again
    assert book.used(KEY) == 1300


def test_a_delete_during_a_listing_is_not_taken_away_twice() -> None:
    book = UsageBook()
    book.listing_started(KEY)
    assert book.listed(KEY, 1000) is False  # nothing passed meanwhile
    book.listing_started(KEY)
    book.removed(KEY, 300)  # the listing may not see the object any more
    assert book.listed(KEY, 700) is True  # worth listing again once quiet
    assert book.used(KEY) == 700  # over rather than under: never 400
    book.listing_started(KEY)
    assert book.listed(KEY, 700) is False and book.used(KEY) == 700


def test_an_upload_before_a_listing_is_not_counted_twice() -> None:
    book = UsageBook()
    book.listing_started(KEY)
    book.listed(KEY, 1000)
    book.added(KEY, 300)
    book.listing_started(KEY)
    book.added(KEY, 50)
    book.listed(KEY, 1300)  # saw the 300, maybe not the 50
    assert book.used(KEY) == 1350


def test_a_full_scan_does_not_zero_a_repository_being_listed() -> None:
    book = UsageBook()
    book.listing_started(KEY)
    book.listed(KEY, 1000)
    book.listing_started(KEY)
    book.full_scan_ended(found=set(), listed={DEST})
    assert book.used(KEY) == 1000


def test_check_reserves_and_refuses_what_would_go_over_the_quota() -> None:
    book = UsageBook()
    book.listing_started(KEY)
    book.listed(KEY, 600)
    assert book.check(KEY, 300, quota=1000) is None
    assert book.repositories[KEY].reserved == 300
    assert book.check(KEY, 100, quota=1000) is None  # exactly the quota: fits
    refusal = book.check(KEY, 1, quota=1000)  # 600 held + 400 reserved + 1
    assert refusal is not None and refusal.status == 507
    assert refusal.reason == "over quota" and "quota exceeded" in refusal.text
    assert book.repositories[KEY].reserved == 400  # a refusal reserves nothing
    book.release(KEY, 300)
    assert book.check(KEY, 300, quota=1000) is None
    assert book.check(KEY, 1, quota=1000) is not None
    assert book.check(KEY, 100 * GiB, quota=None) is None  # no quota: anything goes
    assert book.repositories[KEY].reserved == 400
    book.release(KEY, 10_000)
    assert book.repositories[KEY].reserved == 0
    assert book.check(KEY, 401, quota=1000) is not None  # used alone: 600 + 401 > 1000
    assert book.check(KEY, 400, quota=1000) is None


def test_note_level_tells_and_counts_the_crossings_of_80_and_100_percent(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    book = UsageBook()

    def note(change: int) -> list[str]:
        before = len(caplog.records)
        if change >= 0:
            book.added(KEY, change)
        else:
            book.removed(KEY, -change)
        book.note_level(KEY, 1000, "traefik1")
        return [r.getMessage() for r in caplog.records[before:] if r.name == LOGGER]

    book.listing_started(KEY)
    book.listed(KEY, 0)
    assert note(799) == []
    told = note(1)  # 800 of 1000
    assert len(told) == 1 and "traefik1" in told[0] and "80 %" in told[0]
    assert caplog.records[-1].levelno == logging.WARNING
    assert (book.repositories[KEY].level, book.crossings) == (80, {80: 1, 100: 0})
    assert note(100) == []  # 900: still over 80 only
    told = note(100)  # 1000
    assert len(told) == 1 and "100 %" in told[0]
    assert (book.repositories[KEY].level, book.crossings) == (100, {80: 1, 100: 1})
    assert note(0) == []  # no crossing, nothing told
    told = note(-300)  # 700: back under
    assert len(told) == 1 and "back under" in told[0]
    assert caplog.records[-1].levelno == logging.INFO
    assert (book.repositories[KEY].level, book.crossings) == (0, {80: 1, 100: 1})
    assert len(note(100)) == 1  # 800 again: a second crossing of 80 %
    assert book.crossings == {80: 2, 100: 1}
    assert book.repositories[KEY].crossings == 3


def test_note_level_is_silent_while_the_use_is_unknown(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    book = UsageBook()
    book.added(KEY, 5000)
    book.note_level(KEY, 1000, "traefik1")
    book.note_level(OTHER_KEY, 1000, "traefik2")
    assert [r for r in caplog.records if r.name == LOGGER] == []
    assert book.crossings == {80: 0, 100: 0}


# --- shaping.py: buckets and the shaper --------------------------------------------------------


def test_a_bucket_passes_bytes_no_faster_than_its_rate() -> None:
    rate, total = MiB, 512 * KiB  # half a second of the rate

    async def scenario() -> float:
        bucket = TokenBucket(rate)
        started = time.monotonic()
        for _ in range(total // SLICE):
            await bucket.take(SLICE)
        return time.monotonic() - started

    elapsed = run(scenario())
    assert isinstance(elapsed, float) and elapsed >= 0.85 * total / rate


def test_an_idle_bucket_gathers_no_more_than_its_burst() -> None:
    rate, total, idle = MiB, 384 * KiB, 0.3
    # the credit an idle bucket gathers is capped at its burst
    burst = max(rate * BURST_SECONDS, MIN_BURST)
    assert burst < rate * idle

    async def scenario() -> float:
        bucket = TokenBucket(rate)
        await asyncio.sleep(idle)  # credit for `idle` seconds, were it not capped
        started = time.monotonic()
        for _ in range(total // SLICE):
            await bucket.take(SLICE)
        return time.monotonic() - started

    elapsed = run(scenario())
    assert isinstance(elapsed, float) and elapsed >= 0.85 * (total - burst) / rate


def test_one_piece_bigger_than_the_burst_waits_after_an_idle_time() -> None:
    rate, piece, idle = MiB, 600 * KiB, 0.5
    burst = max(rate * BURST_SECONDS, MIN_BURST)

    async def scenario() -> float:
        bucket = TokenBucket(rate)
        await asyncio.sleep(idle)  # 512 KiB of credit, were it not capped at the burst
        started = time.monotonic()
        await bucket.take(piece)
        return time.monotonic() - started

    elapsed = run(scenario())
    assert isinstance(elapsed, float) and elapsed >= 0.85 * (piece - burst) / rate


def test_a_bucket_without_a_rate_does_not_wait() -> None:
    async def scenario() -> TokenBucket:
        bucket = TokenBucket(None)
        await asyncio.wait_for(bucket.take(TiB), DEADLINE)
        return bucket

    bucket = run(scenario())
    assert isinstance(bucket, TokenBucket) and bucket.waited == 0


def test_two_takers_of_a_bucket_take_turns() -> None:
    """Each taker lets the other run between its pieces: `take` returns without waiting
    while the bucket holds credit, and after a late wake-up of the event loop a taker
    that never yields takes the whole burst in a row, whatever its ticket."""
    pieces = 16  # each; 32 pieces of 64 KiB at 4 MiB/s: half a second

    async def scenario() -> dict[str, int]:
        bucket = TokenBucket(4 * MiB)
        got = {"a": 0, "b": 0}
        at_first_end: dict[str, int] = {}

        async def taker(name: str) -> None:
            for _ in range(pieces):
                await bucket.take(SLICE)
                got[name] += 1
                await asyncio.sleep(0)  # as a stream writing its piece (see the docstring)
            if not at_first_end:
                at_first_end.update(got)

        await asyncio.gather(taker("a"), taker("b"))
        return at_first_end

    counts = run(scenario())
    assert isinstance(counts, dict)
    passed = sum(counts.values())
    assert all(0.4 <= count / passed <= 0.6 for count in counts.values()), counts


def test_two_streams_through_the_shaper_take_turns_within_big_chunks() -> None:
    chunk, chunks = 4 * SLICE, 2  # 512 KiB a stream, 1 MiB in all at 2 MiB/s

    async def scenario() -> dict[str, int]:
        shaper = Shaper()
        shaper.configure({"upload": parse_schedule("2M")})
        passed = {"a": 0, "b": 0}
        at_first_end: dict[str, int] = {}

        async def body():
            for _ in range(chunks):
                yield bytes(chunk)

        async def stream(name: str) -> None:
            async for piece in shaper.transform("upload", None)(body()):
                assert len(piece) <= SLICE
                passed[name] += len(piece)
                await asyncio.sleep(0)  # as a stream writing its piece
            if not at_first_end:
                at_first_end.update(passed)

        await asyncio.gather(stream("a"), stream("b"))
        assert passed == {"a": chunk * chunks, "b": chunk * chunks}
        return at_first_end

    counts = run(scenario())
    assert isinstance(counts, dict)
    total = sum(counts.values())
    assert all(0.4 <= count / total <= 0.6 for count in counts.values()), counts


def test_lifting_the_limit_wakes_a_waiting_taker_at_once() -> None:
    async def scenario() -> None:
        bucket = TokenBucket(KiB)  # 64 KiB at 1 KiB/s: a minute
        taker = asyncio.create_task(bucket.take(SLICE))
        await asyncio.sleep(0.05)
        assert not taker.done()
        bucket.set_rate(None)
        await asyncio.wait_for(taker, DEADLINE)

    run(scenario())


def test_raising_the_rate_wakes_a_waiting_taker_to_wait_less() -> None:
    async def scenario() -> None:
        bucket = TokenBucket(KiB)
        taker = asyncio.create_task(bucket.take(SLICE))
        await asyncio.sleep(0.05)
        assert not taker.done()
        bucket.set_rate(100 * MiB)
        await asyncio.wait_for(taker, DEADLINE)

    run(scenario())


def test_the_shaper_applies_the_slot_in_force_by_its_clock() -> None:
    now = [at("mon", 7, 59)]

    async def scenario() -> None:
        shaper = Shaper(clock=lambda: now[0])
        schedules = {"upload": parse_schedule("08:00,10M 19:00,off"),
                     "module/traefik1/download": parse_schedule("512k")}
        shaper.configure(schedules)
        assert shaper.rate("upload") is None
        assert shaper.rate("module/traefik1/download") == 512 * KiB
        assert shaper.buckets_for("upload", "traefik1") == [shaper.buckets["upload"]]
        assert shaper.buckets_for("download", "traefik1") == [
            shaper.buckets["module/traefik1/download"]]
        assert shaper.buckets_for("download", None) == []
        assert shaper.buckets_for("download", "loki1") == []
        now[0] = at("mon", 8, 0)
        shaper.configure(schedules)  # the next read of Redis
        assert shaper.rate("upload") == 10 * MiB
        now[0] = at("sat", 19, 0)
        shaper.configure(schedules)
        assert shaper.rate("upload") is None
        now[0] = at("sat", 12, 0)
        shaper.configure(schedules)
        assert shaper.rate("upload") == 10 * MiB
        shaper.configure({"module/traefik1/download": parse_schedule("off")})
        assert shaper.rate("upload") is None  # removed: its bucket no longer limits
        assert shaper.buckets_for("upload", "traefik1") == []
        assert shaper.rate("module/traefik1/download") is None

    run(scenario())


def test_the_shaper_follows_its_clock_across_a_slot_boundary() -> None:
    now = [at("mon", 7, 59, 59.9)]

    async def scenario() -> None:
        shaper = Shaper(clock=lambda: now[0])
        shaper.configure({"upload": parse_schedule("08:00,10M 19:00,off")})
        shaper.start()
        try:
            await asyncio.sleep(0.25)  # the follower woke (its clock still before 08:00)
            assert shaper.rate("upload") is None
            now[0] = at("mon", 8, 0, 0.5)
            await wait_until(lambda: shaper.rate("upload") == 10 * MiB,
                             "the 08:00 rate in force", DEADLINE)
        finally:
            await shaper.close()

    run(scenario())


def test_a_new_schedule_wakes_the_follower_to_its_next_boundary() -> None:
    now = [at("mon", 7, 59, 59.9)]

    async def scenario() -> None:
        shaper = Shaper(clock=lambda: now[0])
        shaper.configure({"upload": parse_schedule("10M")})
        shaper.start()
        try:
            await asyncio.sleep(0.05)  # the follower waits: nothing changes for an hour
            shaper.configure({"upload": parse_schedule("08:00,10M 19:00,off")})
            assert shaper.rate("upload") is None
            now[0] = at("mon", 8, 0, 0.5)
            await wait_until(lambda: shaper.rate("upload") == 10 * MiB,
                             "the 08:00 rate in force", DEADLINE)
        finally:
            await shaper.close()

    run(scenario())


# --- concurrency.py: requests in flight -------------------------------------------------------


def test_in_flight_counts_each_user_under_its_cap() -> None:
    inflight = InFlight()
    assert inflight.enter("module/traefik1", 2, "modules")
    assert inflight.enter("module/traefik1", 2, "modules")
    assert not inflight.enter("module/traefik1", 2, "modules")
    assert not inflight.enter("module/traefik1", 2, "modules")
    assert inflight.enter("module/loki1", 2, "modules")  # another user: its own count
    assert dict(inflight.counts) == {"module/traefik1": 2, "module/loki1": 1}
    assert dict(inflight.refused) == {"modules": 2}
    inflight.leave("module/traefik1")
    assert inflight.counts["module/traefik1"] == 1
    assert inflight.enter("module/traefik1", 2, "modules")
    for _ in range(2):
        inflight.leave("module/traefik1")
    inflight.leave("module/loki1")
    assert dict(inflight.counts) == {}  # nobody in flight: nothing kept


def test_in_flight_without_a_cap_admits_everything() -> None:
    inflight = InFlight()
    assert all(inflight.enter("node/1", None, "nodes") for _ in range(100))
    assert inflight.counts["node/1"] == 100
    assert not inflight.enter("module/traefik1", 0, "modules")  # a cap of 0 (never parsed)
    assert dict(inflight.refused) == {"modules": 1}


def test_a_lock_uploaded_here_is_taken_away_by_its_size_when_removed() -> None:
    book = UsageBook()
    book.listing_started(KEY)
    book.listed(KEY, 1000)
    book.added(KEY, 200)
    book.lock_added(KEY, "cd" * 32, 200)
    size = book.lock_size(KEY, "cd" * 32)
    assert size == 200
    book.removed(KEY, size)
    assert book.used(KEY) == 1000
    assert book.lock_size(KEY, "cd" * 32) is None  # asked once: forgotten


def test_locks_never_deleted_here_do_not_stop_the_book_learning_new_ones() -> None:
    """Locks deleted elsewhere (over WebDAV, on another node) are never asked for: past
    MAX_LOCKS of them, the oldest make room, and a new lock's size is still known."""
    book = UsageBook()
    for n in range(MAX_LOCKS + 10):
        book.lock_added(KEY, f"{n:064x}", 100 + n)
    newest = MAX_LOCKS + 9
    assert book.lock_size(KEY, f"{newest:064x}") == 100 + newest
    assert book.lock_size(KEY, f"{0:064x}") is None  # the oldest made room
    assert len(book.repositories[KEY].lock_sizes) == MAX_LOCKS - 1


def listed_book(sizes: dict[RepositoryKey, int]) -> UsageBook:
    book = UsageBook()
    for key, size in sizes.items():
        book.listing_started(key)
        book.listed(key, size)
    return book


def test_a_directory_removed_whole_takes_the_count_of_every_repository_in_it() -> None:
    """Issue "Real links and real storage", 8: a node's WebDAV DELETE of a repository, of
    its app directory or of its destination."""
    loki = RepositoryKey(DEST, "loki", UUID)
    elsewhere = RepositoryKey("elsewhere", KEY.app, KEY.uuid)
    book = listed_book({KEY: 1000, OTHER_KEY: 2000, loki: 3000, elsewhere: 4000})
    book.lock_added(KEY, "l" * 64, 100)
    assert book.gone((KEY.destination, KEY.app, KEY.uuid)) == [KEY]
    assert book.used(KEY) == 0 and book.lock_size(KEY, "l" * 64) is None
    assert book.check(KEY, 900, quota=1000) is None  # fits again at once
    assert book.gone((DEST, KEY.app, KEY.uuid, "data")) == []  # inside: the listing says
    assert book.gone((DEST, "loki")) == [loki]
    assert sorted(book.gone((DEST,))) == sorted([KEY, OTHER_KEY, loki])
    assert [book.used(k) for k in (OTHER_KEY, loki, elsewhere)] == [0, 0, 4000]


def test_a_listing_under_way_when_its_repository_went_says_nothing() -> None:
    book = listed_book({KEY: 1000})
    book.listing_started(KEY)
    book.gone((KEY.destination, KEY.app, KEY.uuid))
    book.added(KEY, 50)  # the new repository's first upload
    assert book.listed(KEY, 1000) is True  # the old content: list again once quiet
    assert book.used(KEY) == 50
    book.listing_started(KEY)
    assert book.listed(KEY, 50) is False and book.used(KEY) == 50


def test_a_repository_copied_or_moved_is_counted_where_it_landed() -> None:
    moved = RepositoryKey(DEST, KEY.app, KEY.uuid + "-kept")
    book = listed_book({KEY: 1000, OTHER_KEY: 2000})
    source = (KEY.destination, KEY.app, KEY.uuid)
    assert book.copied(source, (*source[:2], moved.uuid)) == [moved]
    assert (book.used(moved), book.used(KEY)) == (1000, 1000)
    # back over the repository, replacing it
    book.added(KEY, 10)
    assert book.copied((DEST, KEY.app, moved.uuid), source) == [KEY]
    assert book.used(KEY) == 1000
    # an app directory, to another app: each repository in it
    assert book.copied((DEST, KEY.app), (DEST, "copied")) == sorted(
        RepositoryKey(DEST, "copied", k.uuid) for k in (KEY, OTHER_KEY, moved))
    assert book.used(RepositoryKey(DEST, "copied", OTHER_KEY.uuid)) == 2000
    # into another repository: added to its count
    assert book.copied(source, (DEST, OTHER_KEY.app, OTHER_KEY.uuid, "x")) == [OTHER_KEY]
    assert book.used(OTHER_KEY) == 3000


def test_a_nodes_metadata_file_beside_a_repository_is_no_repository() -> None:
    # A node's PUT of <uuid>.json was taken for a write into a repository named so, which
    # the storage scan then listed and /status showed as a stale repository.
    limiter = Limiter(lambda: None)
    dest, app, uuid = "d" * 8, "traefik", TRAEFIK_UUID
    gone, written = limiter.webdav_written("PUT", (dest, app, f"{uuid}.json"), None)
    assert (gone, written) == ([], [])
    _, written = limiter.webdav_written("PUT", (dest, app, uuid, "data", "ab", "x"), None)
    assert written == [RepositoryKey(dest, app, uuid)]
