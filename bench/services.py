"""The baselines the gateway is measured against, as child processes.

"rclone alone": `rclone serve restic` and `rclone serve webdav` on TCP over the
same storage directory the gateway serves, with the flags the gateway gives its
own children. "HAProxy": where `haproxy` is installed, an HAProxy with a Basic-auth
userlist in front of those two, routing like the frontend the gateway replaces.
"""

from __future__ import annotations

import atexit
import http.client
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

_live: dict[int, subprocess.Popen] = {}


@atexit.register
def _kill_left_over() -> None:
    for proc in list(_live.values()):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Service:
    """One child process answering HTTP on 127.0.0.1:port."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                process_group=0,
            )
        _live[self.proc.pid] = self.proc
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            try:
                conn.request("OPTIONS", "/")
                conn.getresponse().read()
                return
            except OSError:
                time.sleep(0.05)
            finally:
                conn.close()
        raise RuntimeError(f"{self.name} did not answer on port {self.port}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        _live.pop(self.proc.pid, None)


def rclone_restic(rclone: str, root: Path, port: int, workdir: Path) -> Service:
    argv = [rclone, "serve", "restic", str(root), "--addr", f"127.0.0.1:{port}",
            "--log-level", "NOTICE", "--cache-dir", str(workdir / "rclone-cache"),
            "--cache-objects=false", "--config", "/dev/null"]
    return Service("rclone serve restic", argv, port, workdir / "rclone-restic.log")


def rclone_webdav(rclone: str, root: Path, port: int, workdir: Path) -> Service:
    argv = [rclone, "serve", "webdav", str(root), "--addr", f"127.0.0.1:{port}",
            "--log-level", "NOTICE", "--cache-dir", str(workdir / "rclone-cache"),
            "--dir-cache-time", "0s", "--config", "/dev/null"]
    return Service("rclone serve webdav", argv, port, workdir / "rclone-webdav.log")


def bare_proxy(socket_path: Path, port: int, workdir: Path) -> Service:
    """bench/bare_proxy.py in front of the gateway's own restic socket."""
    argv = [sys.executable, str(Path(__file__).with_name("bare_proxy.py")), str(port),
            str(socket_path)]
    return Service("bare proxy", argv, port, workdir / "bare-proxy.log")


def haproxy_config(port: int, restic_port: int, webdav_port: int, destination: str,
                   users: dict[str, str]) -> str:
    """Basic auth against a userlist, destination prefix stripped, REST or WebDAV backend."""
    userlist = "\n".join(f"    user {name} insecure-password {password}"
                         for name, password in users.items())
    return f"""\
global
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive

userlist cluster
{userlist}

frontend gateway
    bind 127.0.0.1:{port}
    http-request auth realm ns8-rclone-gateway unless {{ http_auth(cluster) }}
    http-request del-header Authorization
    http-request replace-path ^/{destination}(/.*) \\1
    acl restic req.hdr(Accept) -m sub application/vnd.x.restic.rest.v2
    acl create query -m str create=true
    use_backend restic if restic or create
    default_backend webdav

backend restic
    server restic 127.0.0.1:{restic_port}

backend webdav
    server webdav 127.0.0.1:{webdav_port}
"""


def haproxy(config: str, port: int, workdir: Path) -> Service | None:
    exe = shutil.which("haproxy")
    if exe is None:
        return None
    path = workdir / "haproxy.cfg"
    path.write_text(config)
    path.chmod(0o600)
    return Service("haproxy", [exe, "-db", "-f", str(path)], port, workdir / "haproxy.log")
