"""The operator commands' way to ask this node's gateway: with node credentials, as the
node agent does (`--user`, else REDIS_USER, else node/$NODE_ID; REDIS_PASSWORD)."""

from __future__ import annotations

import base64
import json
import os
import urllib.request

DEFAULT_URL = "http://127.0.0.1:4694"


class NoCredentials(Exception):
    """No node user or password in the arguments or the environment."""


def node_headers(user: str | None) -> dict[str, str]:
    user = user or os.environ.get("REDIS_USER") or (
        f"node/{os.environ['NODE_ID']}" if os.environ.get("NODE_ID") else None)
    password = os.environ.get("REDIS_PASSWORD")
    if not user or password is None:
        raise NoCredentials("node credentials needed: --user (or REDIS_USER or NODE_ID) and "
                            "REDIS_PASSWORD")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}", "Accept": "application/json"}


def ask(url: str, headers: dict[str, str], method: str = "GET",
        timeout: float = 30) -> dict:  # type: ignore[type-arg]
    """The JSON answer of the gateway at `url`; raises urllib's errors (OSError)."""
    request = urllib.request.Request(url, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response) if method == "GET" else {}
