"""The gateway's settings, from the command line and the agent environment (spec section 9)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from backends.liveness import LivenessSettings
from gateway.insight.scan import SCAN_INTERVAL
from gateway.proxy import BACKEND_TIMEOUT


@dataclass
class Settings:
    listen_host: str = "0.0.0.0"
    listen_port: int = 4694
    redis_url: str = "redis://127.0.0.1:6379/0"
    node_id: str = "1"
    local_repo: Path = Path("/srv/repo")
    runtime_dir: Path = Path("/run/rclone-gateway")
    rclone: str = "rclone"
    max_connections: int = 2048
    header_timeout: float = 5.0
    shutdown_grace: float = 30.0
    drain_grace: float = 600.0
    resync_interval: float = 60.0
    probe_interval: float = 2.0  # peer gateways
    probe_timeout: float = 4.0
    # Remote storage served here, one listing a probe: while healthy, and while failing.
    remote_probe_interval: float = 60.0
    remote_probe_fast_interval: float = 3.0
    # rclone connects and waits for data up to the children's 5 s within it: a slow link or
    # an uplink full with a backup still answers one LIST in time, and a dark one is found
    # down within 10 s of the first failing request (2 s of waiting, then this).
    remote_probe_timeout: float = 6.0
    remote_check_timeout: float = 15.0
    backend_timeout: float = BACKEND_TIMEOUT  # the backend's next move, at most, before 504
    liveness: LivenessSettings = field(default_factory=LivenessSettings)
    scan_interval: float = SCAN_INTERVAL  # seconds between full listings of the storage
