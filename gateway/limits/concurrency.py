"""Requests in flight per user: a module's under its cap, a node's under its own.

Over the cap the answer is an immediate 503 with `Retry-After` (restic retries it;
`Refusal.TOO_MANY_IN_FLIGHT`); nothing waits in a queue. Node users are counted apart
from modules, so however many requests the modules send, the node agent's retention
and metadata uploads get in.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class InFlight:
    counts: Counter[str] = field(default_factory=Counter)  # user -> requests in flight
    refused: Counter[str] = field(default_factory=Counter)  # caller group -> 503s

    def enter(self, user: str, cap: int | None, group: str) -> bool:
        """Counts a request in, unless `user` has `cap` in flight already."""
        if cap is not None and self.counts[user] >= cap:
            self.refused[group] += 1
            return False
        self.counts[user] += 1
        return True

    def leave(self, user: str) -> None:
        left = self.counts[user] - 1
        if left > 0:
            self.counts[user] = left
        else:
            del self.counts[user]
