"""systemd readiness notification (sd_notify protocol) without a library.

Under `Type=notify` (and `podman run --sdnotify=container`) systemd passes
NOTIFY_SOCKET; the service sends `READY=1` once it serves (what `GET /health`
answering 200 means) and `STOPPING=1` when it stops. Without the variable every
call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("rclone_gateway")


def notify(message: str, env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Send one notification; True when it was sent."""
    address = env.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("sd_notify failed: %s", type(exc).__name__)
        return False
    return True


class Notifier:
    """Tells systemd once that the gateway serves, and that it is stopping."""

    def __init__(self) -> None:
        self.ready = False

    def serving(self) -> None:
        if not self.ready:
            self.ready = notify("READY=1\nSTATUS=serving")

    def stopping(self) -> None:
        notify("STOPPING=1")
