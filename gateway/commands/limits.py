"""`rclone-gateway limits show` and `rclone-gateway limits set`.

`show` asks the local gateway (node credentials, as `status`): the limits in force,
the bandwidth each schedule gives now, requests in flight, and each repository's use of
its quota. `set` checks a value as the gateway would parse it, writes the Limits key
and announces the change on `cluster/event/backup-limits-changed`; `none` removes it.

Exit codes: 0 done, 2 usage error or a value that does not parse, 3 the gateway could
not be asked (`show`) or Redis could not be written (`set`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from redis.exceptions import RedisError

from gateway.cluster.keys import BWLIMIT_KEY, CONCURRENCY_KEY, LIMITS_CHANGED_CHANNEL, QUOTA_PREFIX
from gateway.cluster.redis_source import connect, redis_url_from_env
from gateway.commands.node_client import DEFAULT_URL, CannotAsk, ask_status
from gateway.limits.config import parse_bandwidth, parse_concurrency
from gateway.limits.values import BadValue, format_rate, format_size, parse_quota

REMOVE = "none"
USAGE = """\
  limits set quota DESTINATION MODULE|'*' BYTES|none     e.g. quota <uuid> traefik1 20G
  limits set bwlimit FIELD SCHEDULE|none                  FIELD: upload, download,
                                                          module/<id>/upload, module/<id>/download
                                                          e.g. bwlimit upload "08:00,10M 19:00,off"
  limits set concurrency module|node COUNT|off|none       e.g. concurrency module 8"""


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    limits = commands.add_parser("limits", help="show or set quotas, bandwidth and caps")
    actions = limits.add_subparsers(dest="limits_command", required=True)
    show = actions.add_parser(
        "show", help="the limits in force and each repository's use of its quota",
        description="Asks the local gateway's /status with node credentials. Exit code: 0 "
        "done, 2 usage error, 3 the gateway could not be asked.")
    show.add_argument("--url", default=DEFAULT_URL, help=f"the gateway (default {DEFAULT_URL})")
    show.add_argument("--user", default=None,
                      help="node user (default: REDIS_USER, else node/$NODE_ID)")
    show.add_argument("--json", action="store_true", help="print the JSON document")
    put = actions.add_parser(
        "set", help="write a Limits key and announce the change",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Writes one field of the Limits keys (spec section 2) after checking it "
        "parses, then publishes cluster/event/backup-limits-changed. Every gateway of the "
        "cluster applies it within a moment.\n\n" + USAGE + "\n\nExit code: 0 done, 2 usage "
        "error or a value that does not parse, 3 Redis could not be written.")
    put.add_argument("kind", choices=("quota", "bwlimit", "concurrency"))
    put.add_argument("words", nargs="+", metavar="ARG")
    put.add_argument("--redis-url",
                     help="a Redis URL allowed to write (default: REDIS_URL or the agent "
                     "environment)")


def run(args: argparse.Namespace) -> int:
    if args.limits_command == "show":
        return _show(args)
    return _set(args)


# --- show -----------------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    try:
        document = ask_status(args.url, args.user)
    except CannotAsk as exc:
        return exc.report()
    limits = document.get("limits") or {}
    if args.json:
        json.dump(limits, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(limits_table(limits))
    return 0


def limits_table(limits: dict[str, Any]) -> str:
    lines = ["QUOTAS"]
    quotas = limits.get("quotas") or []
    rows = [("MODULE", "DESTINATION", "USED", "QUOTA", "SHARE")]
    for entry in quotas:
        quota, used = entry.get("quota_bytes"), entry.get("used_bytes")
        share = "-" if quota is None or used is None else f"{used * 100 // max(quota, 1)} %"
        if entry.get("level_percent"):
            share += f" (over {entry['level_percent']} %)"
        rows.append((entry.get("module") or entry["repository"].rsplit("/", 1)[-1],
                     entry["destination"], format_size(used) if used is not None else "unknown",
                     format_size(quota) if quota is not None else "none", share))
    lines += _columns(rows) if quotas else ["  (no quota, no repository known yet)"]
    lines += ["", "BANDWIDTH"]
    bandwidth = limits.get("bandwidth") or {}
    rows = [("FIELD", "NOW", "SCHEDULE")]
    for name, entry in sorted(bandwidth.items()):
        rows.append((name, format_rate(entry.get("rate_now")), entry.get("schedule", "")))
    lines += _columns(rows) if bandwidth else ["  (no bandwidth limit)"]
    concurrency = limits.get("concurrency") or {}
    lines += ["", "REQUESTS IN FLIGHT"]
    lines.append(f"  cap per module: {_cap(concurrency.get('module_cap'))}; "
                 f"per node user: {_cap(concurrency.get('node_cap'))}")
    refused = concurrency.get("refused") or {}
    lines.append(f"  refused over the cap since start: module {refused.get('module', 0)}, "
                 f"node {refused.get('node', 0)}")
    for user, count in (concurrency.get("in_flight") or {}).items():
        lines.append(f"  {user}: {count} in flight")
    return "\n".join(lines) + "\n"


def _cap(value: int | None) -> str:
    return "none" if value is None else str(value)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


# --- set ------------------------------------------------------------------------------------


def planned_write(kind: str, words: list[str]) -> tuple[str, str, str | None]:
    """(key, field, value) to write, value None to remove; raises BadValue or ValueError."""
    if kind == "quota":
        if len(words) != 3:
            raise ValueError("quota takes DESTINATION MODULE|'*' BYTES|none")
        destination, module, value = words
        if not destination or "/" in destination or not module:
            raise ValueError("quota takes DESTINATION MODULE|'*' BYTES|none")
        key, field = QUOTA_PREFIX + destination, module
        check = parse_quota
    elif kind == "bwlimit":
        if len(words) < 2:
            raise ValueError("bwlimit takes FIELD SCHEDULE|none")
        field, value = words[0], " ".join(words[1:])
        key = BWLIMIT_KEY

        def check(text: str) -> object:
            return parse_bandwidth(field, text)
    else:
        if len(words) != 2:
            raise ValueError("concurrency takes module|node COUNT|off|none")
        field, value = words
        key = CONCURRENCY_KEY

        def check(text: str) -> object:
            return parse_concurrency(field, text)
    if value.strip().lower() == REMOVE:
        return key, field, None
    check(value)
    return key, field, value


def _set(args: argparse.Namespace) -> int:
    try:
        key, field, value = planned_write(args.kind, args.words)
    except (BadValue, ValueError) as exc:
        print(f"rclone-gateway: {exc}\nusage:\n{USAGE}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_write(args.redis_url or redis_url_from_env(), key, field, value))
    except (RedisError, OSError) as exc:
        print(f"rclone-gateway: cannot write to Redis: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 3
    print(f"{key} {field}: {'removed' if value is None else value}")
    return 0


async def _write(url: str, key: str, field: str, value: str | None) -> None:
    client = connect(url)
    try:
        if value is None:
            await client.hdel(key, field)
        else:
            await client.hset(key, field, value)
        await client.publish(LIMITS_CHANGED_CHANNEL, "{}")
    finally:
        await client.aclose()
