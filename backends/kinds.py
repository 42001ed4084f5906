"""The kinds of `rclone serve` child the gateway runs, one per way a module reaches its data."""

from __future__ import annotations

from enum import StrEnum


class Backend(StrEnum):
    RESTIC = "restic"
    RESTIC_APPEND_ONLY = "restic-append-only"
    WEBDAV = "webdav"
