"""Checks that each remote destination starts, alone, before it joins the served tree.

The same check, one listing of the destination's root (one LIST on S3), is the
reachability probe of `gateway.cluster.reachability`.

A remote that cannot start (unreachable host, bad credentials, unknown type)
would make the whole `combine` tree fail, or fail every request under it. So
each remote destination is listed once on its own (`rclone lsjson`, short
timeouts) whenever its configuration is new or changed; one that fails is left
out of the tree and checked again with backoff while the others are served.

`RemoteHealth` holds the verdicts and decides what to check when (pure);
`check_remote` runs one check (I/O).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from backends.process import die_with_parent

# rclone exit codes meaning "the remote answered": 0 ok, 3 directory not found, 4 file not
# found (the base path does not exist yet; rclone creates it on the first write).
REACHABLE_EXIT_CODES = frozenset({0, 3, 4})
ERROR_LIMIT = 300
# The children's connect timeout (spec section 6: they fail fast against dark storage).
CHILD_CONNECT_TIMEOUT = 5
_LOG_PREFIX = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?P<level>[A-Z]+)\s*:\s*")
_SECRET_MIN_LEN = 4
_SECRET_KEYS = ("pass", "secret", "token", "key", "credential", "sas", "cookie", "pem")
_USERINFO = re.compile(r"://[^/@\s\"']+@")


def fingerprint(section_lines: list[str], basepath: str) -> str:
    """Identifies what was checked: a changed section or base path needs a new check."""
    digest = hashlib.sha256()
    digest.update("\n".join(section_lines).encode())
    digest.update(b"\0" + basepath.encode())
    return digest.hexdigest()


def section_secrets(section_lines: list[str]) -> list[str]:
    """The values of a section's secret-looking keys (passwords, keys, tokens ...)."""
    values = []
    for line in section_lines:
        key, sep, value = line.partition("=")
        key, value = key.strip().lower(), value.strip()
        if sep and len(value) >= _SECRET_MIN_LEN and any(m in key for m in _SECRET_KEYS):
            values.append(value)
    return values


def redact(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return _USERINFO.sub("://***@", text)


def error_summary(stderr: str, secrets: list[str]) -> str:
    """The most telling line of rclone's stderr, without timestamps or configuration values."""
    chosen = ""
    for raw in stderr.splitlines():
        match = _LOG_PREFIX.match(raw)
        level = match.group("level") if match else ""
        line = raw[match.end():] if match else raw.strip()
        if not line:
            continue
        if level in ("CRITICAL", "ERROR"):
            chosen = line
            break
        if level != "NOTICE" or not chosen:
            chosen = line
    chosen = redact(chosen or "remote failed to start", secrets)
    if len(chosen) > ERROR_LIMIT:
        chosen = chosen[: ERROR_LIMIT - 3] + "..."
    return chosen


async def check_remote(
    rclone: str,
    name: str,
    section_lines: list[str],
    basepath: str,
    *,
    workdir: Path,
    env: dict[str, str],
    timeout: float,
) -> str | None:
    """None when the remote answers, else a short error (no secrets)."""
    secrets = section_secrets(section_lines)
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, conf = tempfile.mkstemp(prefix="check-", suffix=".conf", dir=workdir)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join([f"[{name}]", *section_lines, ""]))
        # The children's fail-fast connect and idle timeouts (spec section 6), or less when
        # the whole check must end sooner.
        io_timeout = min(CHILD_CONNECT_TIMEOUT, max(1, int(timeout) - 1))
        argv = [
            rclone, "lsjson", "--max-depth", "1", "--config", conf,
            "--contimeout", f"{io_timeout}s", "--timeout", f"{io_timeout}s",
            "--low-level-retries", "1", "--retries", "1", "--ask-password=false",
            "--cache-dir", str(workdir / "cache"),
            f"{name}:{basepath}",
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            preexec_fn=die_with_parent,
        )
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            return f"remote did not answer within {timeout:g} s"
        finally:
            # Timed out, or the probe cancelled (a reload, the gateway stopping): the
            # listing is ended and reaped here, never left running.
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.shield(proc.wait())
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(conf)
    if proc.returncode in REACHABLE_EXIT_CODES:
        return None
    return error_summary(stderr.decode(errors="replace"), secrets)


@dataclass
class RemoteVerdict:
    fingerprint: str
    error: str | None  # None: the remote started
    attempts: int = 0  # consecutive failed checks
    retry_at: float | None = None  # monotonic time of the next check of a failed remote


class RemoteHealth:
    """What is known about each remote destination, and when to check it again."""

    def __init__(self, min_backoff: float = 2.0, max_backoff: float = 300.0) -> None:
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.verdicts: dict[str, RemoteVerdict] = {}

    def to_check(self, remotes: dict[str, str], now: float) -> list[str]:
        """Remotes (uuid -> fingerprint) that are new, changed, or failed and due again."""
        due = []
        for uuid, print_ in remotes.items():
            verdict = self.verdicts.get(uuid)
            if verdict is None or verdict.fingerprint != print_:
                due.append(uuid)  # new or changed
            elif verdict.error is not None and (verdict.retry_at or 0) <= now:
                due.append(uuid)  # failed, and due for another try
        return due

    def record(self, uuid: str, print_: str, error: str | None, now: float) -> None:
        if error is None:
            self.verdicts[uuid] = RemoteVerdict(print_, None)
            return
        previous = self.verdicts.get(uuid)
        attempts = previous.attempts + 1 if previous and previous.fingerprint == print_ else 1
        delay = min(self.min_backoff * 2 ** (attempts - 1), self.max_backoff)
        self.verdicts[uuid] = RemoteVerdict(print_, error, attempts, now + delay)

    def keep_only(self, uuids: set[str]) -> None:
        for uuid in set(self.verdicts) - uuids:
            del self.verdicts[uuid]

    def failing(self) -> frozenset[str]:
        return frozenset(u for u, v in self.verdicts.items() if v.error is not None)

    def next_retry(self) -> float | None:
        times = [v.retry_at for v in self.verdicts.values() if v.retry_at is not None]
        return min(times) if times else None

    def retry_now(self) -> None:
        """Failed remotes are checked again at the next reload."""
        for verdict in self.verdicts.values():
            if verdict.error is not None:
                verdict.retry_at = 0.0

    def forget_passed(self) -> None:
        """Remotes that passed are checked again (the tree they were in failed to start)."""
        for uuid in [u for u, v in self.verdicts.items() if v.error is None]:
            del self.verdicts[uuid]
