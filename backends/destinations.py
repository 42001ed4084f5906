"""A destination: where its tree is stored, as the cluster describes it (spec section 3).

The rclone configuration is rendered from these; the gateway reads them from Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class Destination:
    uuid: str
    provider: str
    url: str
    name: str = ""
    basepath_attr: str = ""
    rclone_section: str | None = field(default=None, repr=False)  # holds secrets

    @property
    def basepath(self) -> str:
        """Where the destination's tree is rooted inside its remote (spec section 3)."""
        if self.provider == "rclone":
            return self.basepath_attr
        scheme, _, rest = self.url.partition(":")
        if scheme == "s3":
            _endpoint, _, path = rest.partition("/")
            return path
        if scheme == "webdav":
            return urlsplit(rest).path
        return rest

    @property
    def cluster_host(self) -> str | None:
        """The VPN address of the node hosting a `cluster` destination."""
        if self.provider != "cluster" or not self.url.startswith("webdav:"):
            return None
        return urlsplit(self.url.removeprefix("webdav:")).hostname
