"""Network namespaces for multi-node tests: several "nodes" on one machine.

Each node is a network namespace with one veth link into a bridge that lives in
a namespace of its own, so nothing is configured in (or routed out of) the
machine's own network namespace. Names carry the test run's pid: concurrent runs
do not meet, and namespaces left by a run that died are removed by the next.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

PREFIX = "rgwt"
_STALE = re.compile(rf"{PREFIX}(\d+)-")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "multi-node tests need root (network namespaces)"
    if shutil.which("ip") is None:
        return "multi-node tests need the `ip` command (iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    result = ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` does not work here: {result.stderr.strip()}"
    ip("netns", "delete", probe, check=False)
    return None


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def inside(namespace: str | None) -> Iterator[None]:
    """Run the block with the calling thread in `namespace` (None: where it is).

    Sockets opened in the block stay in that namespace after it ends.
    """
    if namespace is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(f"/run/netns/{namespace}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "could not return to the own network namespace")
    finally:
        os.close(own)


def netns_exec(namespace: str) -> list[str]:
    """The argv prefix that runs a command inside `namespace`."""
    return ["ip", "netns", "exec", namespace]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_members(namespace: str) -> None:
    """SIGKILL what still runs in one of our namespaces (only our own test processes)."""
    result = ip("netns", "pids", namespace, check=False)
    for pid in result.stdout.split():
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _delete(namespace: str) -> None:
    _kill_members(namespace)
    for _attempt in range(20):
        if ip("netns", "delete", namespace, check=False).returncode == 0:
            return
        time.sleep(0.05)


def remove_stale() -> None:
    """Namespaces of earlier runs whose process is gone."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _STALE.match(name)
        if match and (int(match.group(1)) == os.getpid() or not _pid_alive(int(match.group(1)))):
            _delete(name)


class Topology:
    """Namespaces joined by one bridge, with addresses `<subnet>.<host>/24`."""

    def __init__(self, subnet: str = "10.254.94") -> None:
        self.subnet = subnet
        self.prefix = f"{PREFIX}{os.getpid()}"
        self.bridge_ns = self.name("br")
        self.members: list[str] = []

    def name(self, member: str) -> str:
        return f"{self.prefix}-{member}"

    def address(self, host: int) -> str:
        return f"{self.subnet}.{host}"

    @property
    def cidr(self) -> str:
        return f"{self.subnet}.0/24"

    def create_bridge(self) -> None:
        remove_stale()
        ip("netns", "add", self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge_ns, "link", "set", "br0", "up")

    def add_member(self, member: str, *hosts: int) -> str:
        """A namespace on the bridge with the given host addresses; returns its name."""
        namespace = self.name(member)
        port = f"p{len(self.members)}"
        ip("netns", "add", namespace)
        self.members.append(namespace)
        ip("link", "add", "eth0", "netns", namespace, "type", "veth",
           "peer", "name", port, "netns", self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        for host in hosts:
            ip("-n", namespace, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        return namespace

    def blackhole(self, member: str, host: int, on: bool = True) -> None:
        """In `member`, make one address unreachable (or reachable again)."""
        verb = "add" if on else "del"
        ip("-n", self.name(member), "route", verb, "blackhole", f"{self.address(host)}/32",
           check=on)

    def destroy(self) -> None:
        for namespace in [*self.members, self.bridge_ns]:
            _delete(namespace)
        self.members = []
