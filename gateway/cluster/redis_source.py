"""Reads the cluster configuration from Redis and follows its change events (spec section 2)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from backends.destinations import Destination
from backends.tasks import cancel_and_wait
from gateway.access.credentials import parse_acls
from gateway.cluster.keys import (
    BWLIMIT_KEY,
    CONCURRENCY_KEY,
    DESTINATION_PREFIX,
    EVENT_PATTERN,
    QUOTA_PREFIX,
    RCLONE_CONF_KEY,
)
from gateway.cluster.state import ClusterState, RawLimits, parse_network

log = logging.getLogger("rclone_gateway.redis")



def redis_url_from_env(env: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """REDIS_URL, else the cluster agent environment (REDIS_REPLICA_ADDRESS, REDIS_USER, ...)."""
    if env.get("REDIS_URL"):
        return env["REDIS_URL"]
    address = env.get("REDIS_REPLICA_ADDRESS") or "127.0.0.1:6379"
    return f"redis://{address}/0"


def connect(
    url: str,
    env: dict[str, str] | os._Environ[str] = os.environ,
    *,
    socket_timeout: float | None = 10,
) -> aioredis.Redis:
    kwargs: dict[str, object] = {}
    if env.get("REDIS_USER") and "@" not in url:
        kwargs["username"] = env["REDIS_USER"]
        kwargs["password"] = env.get("REDIS_PASSWORD", "")
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=5,
        socket_timeout=socket_timeout,
        health_check_interval=30,
        **kwargs,  # type: ignore[arg-type]
    )


async def _scan(client: aioredis.Redis, pattern: str) -> list[str]:
    return [key async for key in client.scan_iter(match=pattern, count=500)]


@dataclass(frozen=True, slots=True)
class Read:
    """One command of a full read: `HGET key field` when `field` is given."""

    command: str  # smembers, hgetall, hget, get
    key: str
    field: str | None = None


# What each command gives for an absent key, and the Redis type it needs.
ABSENT: dict[str, object] = {"smembers": frozenset(), "hgetall": {}, "hget": None, "get": None}
EXPECTED_TYPE = {"smembers": "set", "hgetall": "hash", "hget": "hash", "get": "string"}


def is_wrong_type(result: object) -> bool:
    return isinstance(result, ResponseError) and str(result).startswith("WRONGTYPE")


class LastGood:
    """What each key gave at its last good read, for a key then found of the wrong Redis type
    (spec section 2): such a key reads as its last good value (as absent if it never had
    one), with one warning until it changes; the other keys are read as usual. A cluster
    key too: a bad `cluster/acls` must not take every user away."""

    def __init__(self) -> None:
        self.values: dict[Read, object] = {}
        self.wrong: dict[str, str] = {}  # key -> the Redis type it was found holding

    def settle(self, reads: list[Read], results: list[object],
               found_types: Mapping[str, str]) -> list[object]:
        """The values of `reads` from `results` (each a command's result or its error);
        `found_types`: the type of each key that answered WRONGTYPE. Raises any other error."""
        settled: list[object] = []
        values: dict[Read, object] = {}
        wrong: dict[str, str] = {}
        for read, result in zip(reads, results, strict=True):
            if isinstance(result, Exception) and not is_wrong_type(result):
                raise result
            if is_wrong_type(result):
                found = wrong[read.key] = found_types.get(read.key, "value of another type")
                if self.wrong.get(read.key) != found:
                    log.warning("Redis key %s holds a %s, not a %s: ignored, %s", read.key,
                                found, EXPECTED_TYPE[read.command],
                                "its last good value stays" if read in self.values
                                else "read as absent")
                    self.wrong[read.key] = found  # a key read twice is told once
                result = self.values.get(read, ABSENT[read.command])
            elif read.key in self.wrong and read.key not in wrong:
                log.info("Redis key %s is of the right type again", read.key)
            values[read] = result
            settled.append(result)
        self.values, self.wrong = values, wrong
        return settled


async def read_state(client: aioredis.Redis, last_good: LastGood | None = None) -> ClusterState:
    """A full read of the keys of spec section 2. `last_good`: what the earlier reads of the
    same source found, the value of a key of the wrong type."""
    dest_keys = await _scan(client, DESTINATION_PREFIX + "*")
    vpn_keys = await _scan(client, "node/*/vpn")
    quota_keys = await _scan(client, QUOTA_PREFIX + "*")
    reads = [
        Read("smembers", "cluster/acls"),
        Read("hgetall", "cluster/module_uuid"),
        Read("hgetall", "private/nodes/restore_uuid"),
        Read("hgetall", RCLONE_CONF_KEY),
        Read("get", "cluster/network"),
        Read("hgetall", "cluster/environment"),
        *(Read("hgetall", key) for key in dest_keys),
        *(Read("hget", key, "ip_address") for key in vpn_keys),
        Read("hgetall", BWLIMIT_KEY),
        Read("hgetall", CONCURRENCY_KEY),
        *(Read("hgetall", key) for key in quota_keys),
    ]
    async with client.pipeline(transaction=False) as pipe:
        for read in reads:
            if read.field is None:
                getattr(pipe, read.command)(read.key)
            else:
                pipe.hget(read.key, read.field)
        # one key of the wrong type must not fail the whole read
        results = await pipe.execute(raise_on_error=False)
    wrong_keys = sorted({read.key for read, result in zip(reads, results, strict=True)
                         if is_wrong_type(result)})
    found_types: dict[str, str] = {}
    if wrong_keys:  # for the warning: what the key holds instead
        async with client.pipeline(transaction=False) as pipe:
            for key in wrong_keys:
                pipe.type(key)
            found_types = dict(zip(wrong_keys, await pipe.execute(), strict=True))
    values = (last_good or LastGood()).settle(reads, results, found_types)
    return build_state(values, dest_keys, vpn_keys, quota_keys)


def build_state(values: list[Any], dest_keys: list[str], vpn_keys: list[str],
                quota_keys: list[str]) -> ClusterState:
    """The cluster state from the values of read_state's reads, in their order."""
    acls, module_uuids, restore, confs, network, environment = values[:6]
    rest = values[6:]
    dest_attrs, rest = rest[: len(dest_keys)], rest[len(dest_keys) :]
    vpn_ips, rest = rest[: len(vpn_keys)], rest[len(vpn_keys) :]
    bwlimit, concurrency, quotas = rest[0], rest[1], rest[2:]
    destinations = {}
    for key, attrs in zip(dest_keys, dest_attrs, strict=True):
        uuid = key.removeprefix(DESTINATION_PREFIX)
        if "/" in uuid or not attrs:
            continue
        destinations[uuid] = Destination(
            uuid=uuid,
            provider=attrs.get("provider", ""),
            url=attrs.get("url", ""),
            name=attrs.get("name", ""),
            basepath_attr=attrs.get("basepath", ""),
            rclone_section=confs.get(uuid),
        )
    node_vpn = {
        key.split("/")[1]: ip for key, ip in zip(vpn_keys, vpn_ips, strict=True) if ip
    }
    return ClusterState(
        users=parse_acls(acls),
        module_uuids=dict(module_uuids),
        restore_grants=dict(restore),
        destinations=destinations,
        networks=parse_network(network),
        node_vpn=node_vpn,
        leader=environment.get("NODE_ID"),
        limits=RawLimits(
            quota={key.removeprefix(QUOTA_PREFIX): dict(hashed)
                   for key, hashed in zip(quota_keys, quotas, strict=True) if hashed},
            bwlimit=dict(bwlimit),
            concurrency=dict(concurrency),
        ),
    )


@dataclass
class SourceStatus:
    connected: bool = False
    last_sync: float | None = None  # wall clock of the last full read
    last_error: str | None = None
    down_since: float | None = None  # wall clock of the first failure of the current outage


StateListener = Callable[[ClusterState], Awaitable[None]]
REDIS_ERRORS = (RedisError, OSError, TimeoutError)


class RedisSource:
    """Keeps a current `ClusterState`: a full read at start, on every event and periodically.

    A short PING every `probe_interval` notices a Redis that stopped answering
    (gone, or stopped without closing its sockets) within a few seconds. While
    Redis is away the last good state stays in force and reads are retried
    with backoff; when it answers again everything is read again and the event
    subscription is renewed, since events may have been missed.
    """

    def __init__(
        self,
        url: str,
        *,
        resync_interval: float = 60.0,
        probe_interval: float = 1.0,
        probe_timeout: float = 2.0,
        read_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.resync_interval = resync_interval
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.read_timeout = read_timeout
        self.state: ClusterState | None = None
        self.status = SourceStatus()
        self._listeners: list[StateListener] = []
        self._client = connect(url)
        self._last_good = LastGood()
        self._events_client = connect(url, socket_timeout=None)
        self._wake = asyncio.Event()
        self._renew_subscription = asyncio.Event()
        self._notify_next = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    def on_change(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    async def load(self) -> ClusterState:
        """The first full read; raises when Redis cannot be read."""
        await self._sync_once()
        assert self.state is not None
        return self.state

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._resync_loop(), name="redis-resync"),
            asyncio.create_task(self._event_loop(), name="redis-events"),
            asyncio.create_task(self._probe_loop(), name="redis-probe"),
        ]

    def request_resync(self, *, notify: bool = False) -> None:
        """Read everything again soon; `notify`: tell the listeners even if nothing changed."""
        if notify:
            self._notify_next = True
        self._wake.set()

    async def close(self) -> None:
        # redis-py shields a command in progress from cancellation, so a cancelled loop
        # can go on for one more turn: it also stops at its next look at _closing.
        self._closing = True
        self._wake.set()
        await cancel_and_wait(*self._tasks)
        for client in (self._client, self._events_client):
            with contextlib.suppress(*REDIS_ERRORS):
                await asyncio.wait_for(client.aclose(), 2.0)

    def _mark_down(self, exc: BaseException) -> None:
        if self.status.connected or self.status.down_since is None:
            log.warning("Redis unavailable (%s); serving the last good configuration",
                        type(exc).__name__)
            self.status.down_since = time.time()
        self.status.connected = False
        self.status.last_error = type(exc).__name__

    async def _apply(self, state: ClusterState) -> None:
        if not self.status.connected and self.status.down_since is not None:
            log.info("Redis available again")
        self.status.connected = True
        self.status.last_sync = time.time()
        self.status.last_error = None
        self.status.down_since = None
        notify, self._notify_next = self._notify_next, False
        if state == self.state and not notify:
            return
        self.state = state
        for listener in self._listeners:
            try:
                await listener(state)
            except Exception:
                log.exception("applying the new cluster configuration failed")

    async def _sync_once(self) -> None:
        try:
            state = await asyncio.wait_for(read_state(self._client, self._last_good),
                                           self.read_timeout)
        except REDIS_ERRORS as exc:
            self._mark_down(exc)
            raise
        if not self._closing:
            await self._apply(state)

    async def _wait_wake(self, timeout: float) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation that
        # arrives as the event is set, and close() then waits a whole resync interval.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        self._wake.clear()

    async def _resync_loop(self) -> None:
        backoff = 0.5
        while not self._closing:
            await self._wait_wake(self.resync_interval)
            while not self._closing:
                try:
                    await self._sync_once()
                    backoff = 0.5
                    break
                except REDIS_ERRORS:
                    await self._wait_wake(backoff)  # the probe wakes us when Redis is back
                    backoff = min(backoff * 2, 10.0)

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                await asyncio.wait_for(self._client.ping(), self.probe_timeout)
            except REDIS_ERRORS as exc:
                self._mark_down(exc)
                continue
            if not self.status.connected:
                self._renew_subscription.set()
                self.request_resync()

    async def _event_loop(self) -> None:
        backoff = 0.5
        while not self._closing:
            pubsub = self._events_client.pubsub()
            self._renew_subscription.clear()
            try:
                await asyncio.wait_for(pubsub.psubscribe(EVENT_PATTERN), self.read_timeout)
                # A (re)subscription may have missed events: read everything again.
                self.request_resync()
                backoff = 0.5
                while not self._closing and not self._renew_subscription.is_set():
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=1.0)
                    if message is None or message.get("type") != "pmessage":
                        continue
                    log.info("event %s", message.get("channel"))
                    self.request_resync()
            except REDIS_ERRORS:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await asyncio.wait_for(pubsub.aclose(), 2.0)
