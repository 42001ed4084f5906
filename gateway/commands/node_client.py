"""The operator commands' way to ask this node's gateway: with node credentials, as the
node agent does (`--user`, else REDIS_USER, else node/$NODE_ID; REDIS_PASSWORD)."""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:4694"


class CannotAsk(Exception):
    """The gateway was not asked, or did not answer: why, and the command's exit code
    (2: no credentials to ask with, 3: the gateway refused or did not answer)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def report(self) -> int:
        print(f"rclone-gateway: {self}", file=sys.stderr)
        return self.exit_code


def node_headers(user: str | None) -> dict[str, str]:
    user = user or os.environ.get("REDIS_USER") or (
        f"node/{os.environ['NODE_ID']}" if os.environ.get("NODE_ID") else None)
    password = os.environ.get("REDIS_PASSWORD")
    if not user or password is None:
        raise CannotAsk("node credentials needed: --user (or REDIS_USER or NODE_ID) and "
                        "REDIS_PASSWORD", 2)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}", "Accept": "application/json"}


def ask_status(url: str, user: str | None, method: str = "GET",
               timeout: float = 30) -> dict:  # type: ignore[type-arg]
    """The gateway's `/status` document (`{}` for a POST, which asks for a listing)."""
    request = urllib.request.Request(url.rstrip("/") + "/status", headers=node_headers(user),
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response) if method == "GET" else {}
    except urllib.error.HTTPError as exc:
        raise CannotAsk(f"the gateway answered {exc.code} {exc.reason}", 3) from None
    except (OSError, ValueError) as exc:
        raise CannotAsk(f"cannot ask the gateway at {url}: {exc}", 3) from None
