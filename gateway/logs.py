"""Log output: JSON access lines, and sd-daemon priority prefixes when stderr is the journal.

systemd sets JOURNAL_STREAM to "<device>:<inode>" of the stream it connects to
stdout/stderr; a process whose stderr is that very stream may start each line
with `<N>` (syslog priority) and journald stores the line with that priority.
The match of device and inode (rather than the mere presence of the variable)
keeps the prefixes out of a log file or a terminal that inherited the variable.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

ACCESS_LOGGER = "rclone_gateway.access"

# logging level -> sd-daemon priority (syslog severity)
_PRIORITIES = ((logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7

# Refusals worth an operator's eye; 404 and friends are ordinary restic traffic.
_WARNING_STATUSES = frozenset({400, 401, 403, 405, 429, 431})


def priority(levelno: int) -> int:
    for level, prio in _PRIORITIES:
        if levelno >= level:
            return prio
    return _DEBUG_PRIORITY


def access_level(status: int, decision: str) -> int:
    """Level of one access line: errors for 5xx, warnings for refusals, info otherwise."""
    if status >= 500:
        return logging.ERROR
    if decision == "deny" or status in _WARNING_STATUSES:
        return logging.WARNING
    return logging.INFO


def access_line(fields: dict[str, Any], now: float) -> str:
    """One access log line: a JSON object whose first member is the time (RFC 3339, UTC)."""
    stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
    return json.dumps({"time": stamp.replace("+00:00", "Z"), **fields}, ensure_ascii=False)


def journal_stream(stream: TextIO, env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """True when `stream` is the journal stream systemd announced in JOURNAL_STREAM."""
    announced = env.get("JOURNAL_STREAM", "")
    device, sep, inode = announced.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


class _JournalFormatter(logging.Formatter):
    """`<N>` before every line of a record (a traceback included), no time: journald adds it."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def configure(level: str, stream: TextIO | None = None) -> bool:
    """Set up the root logger; returns True when writing to the journal."""
    stream = stream or sys.stderr
    journal = journal_stream(stream)
    text_format = "%(name)s: %(message)s" if journal else (
        "%(asctime)s %(levelname)s %(name)s %(message)s")
    formatter_class = _JournalFormatter if journal else logging.Formatter

    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter_class(text_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

    # Access lines are JSON documents, alone on their line (with the priority prefix).
    access_handler = logging.StreamHandler(stream)
    access_handler.setFormatter(formatter_class("%(message)s"))
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers[:] = [access_handler]
    access.propagate = False
    return journal
