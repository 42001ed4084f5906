"""What `serve` runs with (spec section 9): every default here, as a literal.

The command line is built from these fields (`gateway/cli.py`): a field with a `help` in
its metadata is the flag of its name (`remote_probe_timeout`: `--remote-probe-timeout`),
with this default. The few that are read otherwise (the listening address, the Redis URL,
the node id, the directories and the rclone executable) are said in `cli.settings_from_args`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.liveness import LivenessSettings


def flag(default: float, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    listen_host: str = "0.0.0.0"
    listen_port: int = 4694
    redis_url: str = "redis://127.0.0.1:6379/0"
    node_id: str = "1"
    local_repo: Path = Path("/srv/repo")
    runtime_dir: Path = Path("/run/rclone-gateway")
    rclone: str = "rclone"
    max_connections: int = flag(2048, "client connections open at once; one more gets 503")
    header_timeout: float = flag(5.0, "seconds a client has to send its request line and "
                                      "headers before 408")
    shutdown_grace: float = flag(30.0, "seconds in-flight requests get to finish on SIGTERM")
    drain_grace: float = flag(600.0, "seconds an old generation of children gets to finish "
                                     "its requests after a reload")
    resync_interval: float = flag(60.0, "seconds between full re-reads of Redis")
    probe_interval: float = flag(2.0, "seconds between probes of the peer gateways")
    probe_timeout: float = flag(4.0, "seconds a probe of a peer gateway may take before it "
                                     "counts as failed")
    remote_probe_interval: float = flag(
        60.0, "seconds between checks that this node reaches a healthy remote destination "
              "(each lists the destination's root: one request to the storage)")
    remote_probe_fast_interval: float = flag(
        3.0, "seconds between checks of a remote destination found unreachable")
    # rclone connects and waits for data up to the children's 5 s within it: a slow link or
    # an uplink full with a backup still answers one LIST in time, and a dark one is found
    # down within 10 s of the first failing request (2 s of waiting, then this).
    remote_probe_timeout: float = flag(
        6.0, "seconds a check of a remote destination may take before it counts as failed")
    remote_check_timeout: float = flag(
        15.0, "seconds a remote destination gets to answer its start check")
    backend_timeout: float = flag(
        300.0, "seconds an rclone child may take to answer once the whole request is sent, "
               "or to take more of a request body, before 504: as long as restic waits; "
               "peer gateways get 5 s more")
    liveness_interval: float = flag(2.0, "seconds between checks that each rclone child "
                                         "still answers")
    liveness_timeout: float = flag(5.0, "seconds a child has to answer a liveness check")
    liveness_misses: int = flag(3, "checks missed in a row before a child is replaced")
    scan_interval: float = flag(3600.0, "seconds between two listings of the storage for "
                                        "/status and /metrics (SIGUSR1 lists it at once)")

    @property
    def liveness(self) -> LivenessSettings:
        return LivenessSettings(self.liveness_interval, self.liveness_timeout,
                                self.liveness_misses)
