"""`rclone-gateway status`: the node's backup report in a terminal, from its `/status`.

Exit codes: 0 done (and, with `--stale`, every repository has a recent snapshot), 1 some
repository has no snapshot within `--stale`, 2 usage error, 3 the gateway could not be
asked (not running, refused the credentials).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from gateway.commands.node_client import DEFAULT_URL, CannotAsk, ask_status
from gateway.insight.page import age, text_table
from gateway.insight.report import Report

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
RESCAN_WAIT = 600.0  # seconds `--rescan` waits for the listing to end


def duration(value: str) -> float:
    """`26h`, `90m`, `2d`, `3600` -> seconds."""
    match = _DURATION.match(value.strip())
    if match is None:
        raise argparse.ArgumentTypeError("expected a duration such as 26h, 90m, 2d or 3600")
    return float(match.group(1)) * _UNITS[match.group(2)]


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    status = commands.add_parser(
        "status", help="show the backups of the repositories this node serves",
        description="Asks the local gateway's /status with node credentials and prints a table "
        "of repositories (last snapshot, stored size, lock age, last restore) and destinations. "
        "Exit code: 0 ok, 1 a repository has no snapshot within --stale, 2 usage error, "
        "3 the gateway could not be asked.")
    status.add_argument("--url", default=DEFAULT_URL, help=f"the gateway (default {DEFAULT_URL})")
    status.add_argument("--user", default=None,
                        help="node user (default: REDIS_USER, else node/$NODE_ID)")
    status.add_argument("--json", action="store_true", help="print the JSON document")
    status.add_argument("--stale", type=duration, metavar="DURATION",
                        help="exit 1 when a repository has no snapshot this recent (e.g. 26h)")
    status.add_argument("--rescan", action="store_true",
                        help="have the gateway list the storage first, and wait for it")


def run(args: argparse.Namespace) -> int:
    try:
        if args.rescan:
            asked_at = ask_status(args.url, args.user)["generated_at"]
            ask_status(args.url, args.user, method="POST")
            deadline = time.monotonic() + RESCAN_WAIT
            while True:  # until a listing that started after the question has ended
                document = ask_status(args.url, args.user)
                listed = document.get("last_scan_at")
                if (listed is not None and listed >= asked_at) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        else:
            document = ask_status(args.url, args.user)
    except CannotAsk as exc:
        return exc.report()
    report = Report.from_document(document)
    if args.json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text_table(report))
    if args.stale is not None:
        stale = report.stale(args.stale)
        for repo in stale:
            last = "never" if repo.last_snapshot_at is None else (
                age(report.generated_at - repo.last_snapshot_at) + " ago")
            print(f"stale: {repo.label} on {repo.destination}: last snapshot {last}",
                  file=sys.stderr)
        return 1 if stale else 0
    return 0
