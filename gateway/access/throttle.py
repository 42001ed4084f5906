"""Slows and then refuses password guessing, per (source, user) and per source.

Pure bookkeeping: no I/O, the caller passes the time. Every failure adds 1 to a
score that halves every `half_life` seconds; a score counts as its nearest
whole number of failures. A (source, user) pair at `refuse_at` failures is
refused (429) without checking its password, until the score has decayed
below that; between `slow_after` and `refuse_at` its 401s are delayed.
A source whose failures, all users together, reach `hot_at` is "hot": its pairs
are then refused from `hot_refuse_at` on. A pair with no recent failure is
never refused, so one user failing (or many invented names failing) from
127.0.0.1 does not lock out the modules and the node agent that share it.

Throttling stops guessing; it never locks out the holder of the right password.
Credentials (a user and the SHA-256 of its password) that once succeeded are
"proven": they are checked whatever others sent under the same name from the
same source, so a local process failing as `node/1` cannot stop the node
agent's backups. A success does not wipe the pair's failures either: the
guesser goes on being refused while the agent is served.

Memory is bounded: at most `capacity` pairs and `capacity` sources are tracked,
the least recently touched forgotten first, and a key is a number (Python's
per-process salted string hash, so that collisions cannot be chosen) whatever
the length of the name sent; no name is kept.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ThrottleRules:
    slow_after: float = 5  # failures answered 401 at once
    refuse_at: float = 10  # failures of one user from one source before 429
    hot_at: float = 50  # failures from one source, all users, that make it hot
    hot_refuse_at: float = 3  # failures of one user before 429 while its source is hot
    half_life: float = 300.0  # seconds for a score to halve
    max_delay: float = 1.0  # longest delay of a 401
    delay_step: float = 0.2  # added delay per failure past slow_after
    capacity: int = 4096  # tracked pairs, and tracked sources


@dataclass(frozen=True, slots=True)
class LoginVerdict:
    allowed: bool
    retry_after: int = 0  # whole seconds, for the Retry-After header


_Key = int


ALLOWED = LoginVerdict(True)


def _key(*parts: str) -> _Key:
    return hash(parts)


def credential_key(user: str, password_digest: bytes) -> _Key:
    """What the throttle remembers of credentials that succeeded: a salted 64-bit hash."""
    return hash((user, password_digest))


class _Scores:
    """Decaying scores in an LRU of fixed capacity."""

    __slots__ = ("_capacity", "_half_life", "_items")

    def __init__(self, capacity: int, half_life: float) -> None:
        self._capacity = capacity
        self._half_life = half_life
        self._items: OrderedDict[_Key, tuple[float, float]] = OrderedDict()

    def get(self, key: _Key, now: float) -> float:
        item = self._items.get(key)
        if item is None:
            return 0.0
        score, at = item
        return score * 0.5 ** (max(0.0, now - at) / self._half_life)

    def add(self, key: _Key, now: float) -> float:
        score = self.get(key, now) + 1.0
        self._items[key] = (score, now)
        self._items.move_to_end(key)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)
        return score

    def forget(self, key: _Key) -> None:
        self._items.pop(key, None)

    def seconds_until_below(self, score: float, limit: float) -> float:
        if score < limit:
            return 0.0
        return self._half_life * math.log2(score / limit)

    def __len__(self) -> int:
        return len(self._items)


class LoginThrottle:
    def __init__(self, limits: ThrottleRules | None = None) -> None:
        self.limits = limits or ThrottleRules()
        self._pairs = _Scores(self.limits.capacity, self.limits.half_life)
        self._sources = _Scores(self.limits.capacity, self.limits.half_life)
        self._proven: OrderedDict[_Key, None] = OrderedDict()

    def check(self, source: str, user: str, now: float, credential: _Key | None = None
              ) -> LoginVerdict:
        """Whether the password of `user` from `source` may be checked at all.

        `credential` (see credential_key) is always allowed when it succeeded before.
        """
        pairs, sources = self._pairs, self._sources
        if not len(pairs):
            return ALLOWED  # no failed login on record anywhere
        limits = self.limits
        # a score stands for its nearest whole number of failures
        refuse_at, hot_at, hot_refuse_at = (
            limits.refuse_at - 0.5, limits.hot_at - 0.5, limits.hot_refuse_at - 0.5)
        score = pairs.get(_key(source, user), now)
        source_score = sources.get(_key(source), now)
        hot = source_score >= hot_at
        limit = hot_refuse_at if hot else refuse_at
        if score < limit or (credential is not None and credential in self._proven):
            return ALLOWED
        wait = pairs.seconds_until_below(score, limit)
        if hot:  # or until the source cools down, if that comes first
            wait = min(wait, max(sources.seconds_until_below(source_score, hot_at),
                                 pairs.seconds_until_below(score, refuse_at)))
        return LoginVerdict(False, max(1, math.ceil(wait)))

    def failed(self, source: str, user: str, now: float, credential: _Key | None = None
               ) -> float:
        """Records a failed login; returns the seconds to wait before answering 401."""
        limits = self.limits
        if credential is not None:
            self._proven.pop(credential, None)  # a password since changed or revoked
        score = self._pairs.add(_key(source, user), now)
        self._sources.add(_key(source), now)
        excess = score - limits.slow_after
        if excess < 0.5:
            return 0.0
        return min(limits.max_delay, limits.delay_step * round(excess))

    def succeeded(self, credential: _Key) -> None:
        proven = self._proven
        if credential in proven:
            proven.move_to_end(credential)
            return
        proven[credential] = None
        if len(proven) > self.limits.capacity:
            proven.popitem(last=False)

    @property
    def tracked(self) -> int:
        """Entries held: pairs, sources and proven credentials (bounded by 3 * capacity)."""
        return len(self._pairs) + len(self._sources) + len(self._proven)
