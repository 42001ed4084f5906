"""Where this node serves destinations from, and whether it reaches their storage.

The placement comes with each configuration the backends serve (`Reloader`); whether a
remote destination's storage is reached, from the probes of `Reachability`, which
requests on it bring forward. A destination served here goes to this node's backend
children; any other, to a peer (gateway.forwarding.peers).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from backends.manager import BackendManager
from backends.rclone_conf import Placement, section_body
from backends.remote_check import check_remote
from gateway.cluster.reachability import Reachability
from gateway.cluster.state import ClusterState


class Serving:
    def __init__(self, backends: BackendManager, reachability: Reachability,
                 state: Callable[[], ClusterState | None], *, rclone: str,
                 probe_dir: Path) -> None:
        self._backends = backends
        self._reachability = reachability
        self._state = state
        self._rclone = rclone
        self._probe_dir = probe_dir
        self.placement = Placement()  # of the configuration the backends serve

    def start(self) -> None:
        """Probes the remote storage served here, on the cadence of `Reachability`."""
        self._reachability.start(self.remote_served_here, self.probe)

    async def close(self) -> None:
        await self._reachability.close()

    # --- this node -------------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether this node serves at all: a generation of children, every one healthy."""
        generation = self._backends.current
        return generation is not None and generation.healthy

    # --- where each destination is served ---------------------------------------------------

    def served_here(self, uuid: str) -> bool:
        """Whether this node serves `uuid` now; requests for any other go to a peer.

        One child restarting does not move a destination away: the requests for that
        child wait for it (`pipeline.dispatch`), the others go on.
        """
        return (uuid in self.placement.local and self._backends.current is not None
                and self._reachability.reachable(uuid))

    def healthy_here(self, uuid: str) -> bool:
        """Served here with every backend answering: what peers ask with the probe."""
        return uuid in self.placement.local and self.ready()

    def all_served_here(self) -> set[str]:
        """The destinations this node serves now."""
        return {uuid for uuid in self.placement.local if self.served_here(uuid)}

    # --- whether their storage is reached ---------------------------------------------------

    def remote_served_here(self) -> list[str]:
        """Destinations served here whose storage is not this node's own disk: those the
        reachability probes."""
        return [uuid for uuid in self.placement.local if self.is_remote(uuid)]

    def is_remote(self, uuid: str) -> bool:
        """Served here from storage that is not this node's own disk."""
        state = self._state() or ClusterState()
        dest = state.destinations.get(uuid)
        return uuid in self.placement.local and dest is not None and dest.provider != "cluster"

    def observe(self, uuid: str | None, status: int) -> None:
        """A backend's answer (or failure) for `uuid`: whether its remote storage is reached."""
        if uuid is not None and self.is_remote(uuid):
            self._reachability.observe(uuid, status)

    def unreachable_reason(self, uuid: str) -> str | None:
        """Why the storage of `uuid` is not reached from here; None when it is."""
        return self._reachability.reason(uuid)

    def probe_soon(self, uuid: str) -> None:
        """Brings the next probe of `uuid`'s storage forward."""
        self._reachability.probe_soon(uuid)

    async def went_down(self, uuid: str) -> None:
        """Returns once a probe has found the storage of `uuid` unreachable."""
        await self._reachability.went_down(uuid)

    async def confirm_reached(self, uuid: str) -> bool:
        """Whether the storage of `uuid` is reached, by a probe brought forward (what is
        known already if none ends in time)."""
        reachability = self._reachability
        return await reachability.confirm(uuid, reachability.confirm_timeout())

    async def probe(self, uuid: str) -> str | None:
        """One listing of a remote destination's root, alone (a reachability probe): None
        when its storage answered, else why not (no secrets)."""
        state = self._state() or ClusterState()
        dest = state.destinations.get(uuid)
        if dest is None:
            return None
        return await check_remote(
            self._rclone, uuid, section_body(dest.rclone_section or ""), dest.basepath,
            workdir=self._probe_dir, env=self._backends.child_env(),
            timeout=self._reachability.probe_timeout)
