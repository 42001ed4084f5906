"""Real network storage on this machine for the gateway's remote destinations.

`S3Storage` is an `rclone serve s3` of a local directory (access keys required);
`SftpStorage` an `rclone serve sftp` of one (user and password). Each listens on a
loopback port (or on an address of a test network namespace) and is reached through a
`FaultProxy` of its own, so a test can slow, cut or blackhole the link and count the
requests the storage sees. `destination()` registers it in Redis the way the cluster
does (spec sections 2 and 3): the public attributes, and an rclone.conf section holding
the secrets, pointed at the proxy.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from faultproxy import FaultProxy
from harness import REPO_ROOT, Cluster, _register, _stop_popen, free_port, wait_listening
from netns import netns_exec

RCLONE = str(REPO_ROOT / ".venv" / "bin" / "rclone")
START_TIMEOUT = 20.0


def obscure(password: str) -> str:
    """The password as an rclone.conf holds it (`rclone obscure`)."""
    return subprocess.run([RCLONE, "obscure", password], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


@dataclass
class Storage:
    """One `rclone serve` of `directory`, and the fault proxies in front of it."""

    directory: Path
    workdir: Path
    host: str = "127.0.0.1"
    netns: str | None = None  # where the server runs (None: the test's own namespace)
    port: int = 0
    proc: subprocess.Popen | None = None
    proxies: list[FaultProxy] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{type(self).__name__.lower()}.log"

    def serve_argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        argv = [*(netns_exec(self.netns) if self.netns else []), *self.serve_argv(),
                "--addr", f"{self.host}:{self.port}", "--cache-dir", str(self.workdir / "cache")]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, process_group=0)
        _register(self.proc)
        wait_listening(self.host, self.port, self.proc, netns=self.netns, log=self.log_path,
                       timeout=START_TIMEOUT)

    def proxy(self, *, listen_host: str = "127.0.0.1", port: int = 0,
              netns: str | None = None) -> FaultProxy:
        """A new fault proxy in front of this storage (one per node that reaches it)."""
        proxy = FaultProxy((self.host, self.port), listen_host=listen_host, port=port,
                           netns=netns, count_http=self.http)
        self.proxies.append(proxy)
        return proxy

    http = True

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.close()
        self.proxies.clear()
        if self.proc is not None:
            _stop_popen(self.proc, signal.SIGTERM, 10)
            self.proc = None


@dataclass
class S3Storage(Storage):
    bucket: str = "backups"
    access_key: str = field(default_factory=lambda: "KEY" + secrets.token_hex(6).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))

    def serve_argv(self) -> list[str]:
        (self.directory / self.bucket).mkdir(parents=True, exist_ok=True)
        return [RCLONE, "serve", "s3", str(self.directory),
                "--auth-key", f"{self.access_key},{self.secret_key}"]

    @property
    def bucket_dir(self) -> Path:
        return self.directory / self.bucket

    def section(self, uuid: str, endpoint: str) -> str:
        return (f"[{uuid}]\ntype = s3\nprovider = Other\nendpoint = {endpoint}\n"
                f"access_key_id = {self.access_key}\nsecret_access_key = {self.secret_key}\n"
                f"force_path_style = true\n")

    def destination(self, cluster: Cluster, uuid: str, proxy: FaultProxy, *,
                    name: str = "s3 storage", path: str = "") -> Path:
        """Registers `uuid` as an S3 destination reached through `proxy` (provider `aws`,
        url `s3:<endpoint>/<bucket/path>`); returns the directory its tree is stored in."""
        endpoint = f"{proxy.host}:{proxy.port}"
        where = f"{self.bucket}/{path}".rstrip("/")
        cluster.add_destination(uuid, provider="aws", url=f"s3:{endpoint}/{where}", name=name,
                                rclone_conf=self.section(uuid, f"http://{endpoint}"))
        return self.directory / where


@dataclass
class SftpStorage(Storage):
    user: str = "backup"
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    http = False

    def serve_argv(self) -> list[str]:
        return [RCLONE, "serve", "sftp", str(self.directory),
                "--user", self.user, "--pass", self.password]

    def destination(self, cluster: Cluster, uuid: str, proxy: FaultProxy, *,
                    name: str = "sftp storage", basepath: str = "backups") -> Path:
        """Registers `uuid` as an rclone destination of type sftp reached through `proxy`
        (provider `rclone`, `basepath`); returns the directory its tree is stored in."""
        section = (f"[{uuid}]\ntype = sftp\nhost = {proxy.host}\nport = {proxy.port}\n"
                   f"user = {self.user}\npass = {obscure(self.password)}\n"
                   f"shell_type = none\n")
        cluster.add_destination(uuid, provider="rclone", url="rclone:sftp", name=name,
                                basepath=basepath, rclone_conf=section)
        return self.directory / basepath
