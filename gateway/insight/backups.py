"""What this node knows of the backups it serves: what requests did to each repository
(`record.Recorder`), what the storage holds (`scan.Scanner`), and the report of both that
`/status`, `/metrics` and `rclone-gateway status` show (`report.build_report`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from gateway.access.repository import RepositoryKey
from gateway.cluster.serving import Serving
from gateway.cluster.state import ClusterState
from gateway.insight.record import FinishedRequest, Recorder
from gateway.insight.report import Report, build_report
from gateway.insight.scan import Scanner, StoredFigures
from gateway.limits.views import QuotaView
from gateway.status.model import DestinationHealth


class BackupInsight:
    def __init__(self, node_id: str, recorder: Recorder, scanner: Scanner, *,
                 serving: Serving, state: Callable[[], ClusterState | None],
                 destinations: Callable[[], Iterable[DestinationHealth]],
                 quotas: Callable[[], Iterable[QuotaView]],
                 count_listed: Callable[[RepositoryKey, int], bool]) -> None:
        """`count_listed(key, stored_bytes)`: the quota count takes a listing's figure; True
        when the repository was written to while it was listed (gateway.limits)."""
        self.node_id = node_id
        self.recorder = recorder
        self.scanner = scanner
        self._serving = serving
        self._state = state
        self._destinations = destinations
        self._quotas = quotas
        self._count_listed = count_listed

    def record(self, exchange: FinishedRequest) -> None:
        """One request's outcome; a backup that ended has its repository listed soon."""
        ended = self.recorder.record(exchange)
        if ended is not None:
            self.scanner.scan_soon(ended)

    def listed(self, key: RepositoryKey, figures: StoredFigures) -> None:
        """A listing of `key` ended: the record and the quota count take it in. Written to
        while it was listed, the repository is listed again once quiet (the count may be
        off)."""
        self.recorder.listed(key)
        if self._count_listed(key, figures.stored_bytes):
            self.scanner.scan_soon(key)

    # --- the storage listings (what the quota count asks: gateway.limits.accounting) -------

    def scan_all_soon(self) -> None:
        """Every destination served here listed again, soon."""
        self.scanner.scan_all_soon()

    def scan_soon(self, key: RepositoryKey) -> None:
        self.scanner.scan_soon(key)

    def forget(self, keys: Iterable[RepositoryKey]) -> None:
        self.scanner.forget(keys)

    # --- the report ------------------------------------------------------------------------

    def report(self) -> Report:
        state = self._state() or ClusterState()
        scanner = self.scanner
        return build_report(
            node_id=self.node_id, now=time.time(),
            served_here=self._serving.all_served_here(),
            activity=self.recorder.repositories, stored=scanner.stored,
            spaces=scanner.spaces,
            module_ids={uuid: module for module, uuid in state.module_uuids.items()},
            destinations=self._destinations(),
            last_scan_at=scanner.last_full_scan,
            quotas={view.key: view for view in self._quotas()},
        )
