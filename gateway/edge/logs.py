"""Log output: JSON access lines, and sd-daemon priority prefixes when stderr is the journal.

systemd sets JOURNAL_STREAM to "<device>:<inode>" of the stream it connects to
stdout/stderr; a process whose stderr is that very stream may start each line
with `<N>` (syslog priority) and journald stores the line with that priority.
The match of device and inode (rather than the mere presence of the variable)
keeps the prefixes out of a log file or a terminal that inherited the variable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import Any, TextIO

from gateway.access.refusals import Refused

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


_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps(ensure_ascii=False) builds one per call
_second_cache: tuple[int, str] = (-1, "")


def _stamp(now: float) -> str:
    """RFC 3339 in UTC with milliseconds; the part up to the second is made once a second."""
    global _second_cache
    second = int(now)
    if _second_cache[0] != second:
        _second_cache = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_second_cache[1]}.{int((now - second) * 1000):03d}Z"


def access_line(fields: dict[str, Any], now: float) -> str:
    """One access log line: a JSON object whose first member is the time (RFC 3339, UTC)."""
    return _JSON.encode({"time": _stamp(now), **fields})


def log_reject(source: str | None, refused: Refused) -> None:
    """The access line of a request refused before it could be read: its source, status
    and a fixed reason, never a byte of what was sent."""
    status = refused.status
    logging.getLogger(ACCESS_LOGGER).log(access_level(status, "reject"), access_line(
        {"source": source, "status": status, "decision": "reject", "reason": refused.reason},
        time.time()))


class AccessLog:
    """Access lines written straight to the access logger's stream, one write per loop turn.

    Going through `Logger.log` for every request cost about as much CPU as all of the
    gateway's checks of it, and each line was a write of its own. Here the lines of the requests
    that finished in one turn of the event loop go out together at the end of that turn.
    The logger's level still decides which lines are written.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger(ACCESS_LOGGER)
        self._pending: list[tuple[int, str]] = []

    def enabled(self, level: int) -> bool:
        return self._logger.isEnabledFor(level)

    def write(self, level: int, line: str) -> None:
        if not self._pending:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop: write now
                self._logger.log(level, line)
                return
        self._pending.append((level, line))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        handler = next((h for h in self._logger.handlers
                        if isinstance(h, logging.StreamHandler)), None)
        if handler is None:
            for level, line in pending:
                self._logger.log(level, line)
            return
        if isinstance(handler.formatter, _JournalFormatter):
            text = "".join(f"<{priority(level)}>{line}\n" for level, line in pending)
        else:
            text = "".join(line + "\n" for _, line in pending)
        try:
            handler.stream.write(text)
            handler.stream.flush()
        except (OSError, ValueError):
            handler.handleError(logging.makeLogRecord({"msg": "access log write failed"}))


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
