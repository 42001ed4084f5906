"""What the limits show to others: plain typed views, no state behind them.

Readers above the limits (insight's report, `/status`) take these and import nothing
else of `gateway.limits`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.access.repository import RepositoryKey


@dataclass(frozen=True, slots=True)
class QuotaView:
    key: RepositoryKey
    module: str | None
    quota: int | None
    used: int | None  # None: the storage was not listed yet
    reserved: int
    level: int  # 0, 80 or 100: the highest share of the quota crossed

    def document(self) -> dict[str, object]:
        return {
            "destination": self.key.destination,
            "repository": self.key.path,
            "module": self.module,
            "quota_bytes": self.quota,
            "used_bytes": self.used,
            "reserved_bytes": self.reserved,
            "level_percent": self.level,
        }
