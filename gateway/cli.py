"""Command line: `rclone-gateway serve ...` (spec section 9), `explain`, `config show`,
`status` (gateway/insight/command.py) and `limits` (gateway/limits/command.py).

Exit codes of `explain`: 0 the request would be allowed, 1 refused (by the access policy,
or by a quota or a cap as the gateway's figures stand now), 2 usage error,
3 the configuration could not be read from Redis. `config show`: 0, 2 or 3 likewise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from gateway import logs
from gateway.cluster import ClusterState
from gateway.insight import command as insight_command
from gateway.limits import command as limits_command
from gateway.node_client import DEFAULT_URL, CannotAsk, ask_status
from gateway.operator_commands import (
    explain,
    explain_limits,
    format_explanation,
    masked_rendered_config,
    read_live_state,
)
from gateway.redis_source import redis_url_from_env

if TYPE_CHECKING:
    from gateway.settings import Settings


def default_rclone() -> str:
    beside = Path(sys.executable).parent / "rclone"
    if beside.exists():
        return str(beside)
    return shutil.which("rclone") or "rclone"


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number of seconds") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return seconds


def positive_count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError("expected a whole number of at least 1")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rclone-gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--listen", type=parse_listen, default=("0.0.0.0", 4694),
                       metavar="HOST:PORT", help="address to listen on (default 0.0.0.0:4694)")
    serve.add_argument("--redis-url",
                       help="Redis URL (default: REDIS_URL or the agent environment)")
    serve.add_argument("--node-id", help="this node's id (default: NODE_ID)")
    serve.add_argument("--local-repo", type=Path, default=Path("/srv/repo"),
                       help="directory of this node's local repository (default /srv/repo)")
    serve.add_argument("--runtime-dir", type=Path,
                       help="private directory for sockets and the rclone configuration")
    serve.add_argument("--rclone", default=None, help="rclone executable")
    serve.add_argument("--max-connections", type=int, default=2048)
    serve.add_argument("--shutdown-grace", type=float, default=30.0,
                       help="seconds in-flight requests get to finish on SIGTERM")
    serve.add_argument("--drain-grace", type=float, default=600.0,
                       help="seconds an old backend generation gets to finish its requests")
    serve.add_argument("--resync-interval", type=float, default=60.0,
                       help="seconds between full re-reads of Redis")
    serve.add_argument("--probe-interval", type=float, default=2.0,
                       help="seconds between probes of the peer gateways")
    serve.add_argument("--remote-probe-interval", type=positive_seconds, default=60.0,
                       help="seconds between checks that this node reaches a healthy remote "
                            "destination (each lists the destination's root: one request "
                            "to the storage; default 60)")
    serve.add_argument("--remote-probe-fast-interval", type=positive_seconds, default=3.0,
                       help="seconds between checks of a remote destination found "
                            "unreachable (default 3)")
    serve.add_argument("--probe-timeout", type=float, default=4.0,
                       help="seconds a probe of a peer gateway may take before it counts "
                            "as failed")
    serve.add_argument("--remote-probe-timeout", type=positive_seconds, default=6.0,
                       help="seconds a check of a remote destination may take before it "
                            "counts as failed (default 6)")
    serve.add_argument("--remote-check-timeout", type=float, default=15.0,
                       help="seconds a remote destination gets to answer its start check")
    serve.add_argument("--backend-timeout", type=positive_seconds, default=300.0,
                       help="seconds an rclone child may take to answer once the whole "
                            "request is sent, or to take more of a request body, before "
                            "504 (default 300, as restic waits; peer gateways get 5 s more)")
    serve.add_argument("--liveness-interval", type=positive_seconds, default=2.0,
                       help="seconds between checks that each rclone child still answers")
    serve.add_argument("--liveness-timeout", type=positive_seconds, default=5.0,
                       help="seconds a child has to answer a liveness check")
    serve.add_argument("--liveness-misses", type=positive_count, default=3,
                       help="checks missed in a row before a child is replaced")
    serve.add_argument("--scan-interval", type=positive_seconds, default=3600.0,
                       help="seconds between two listings of the storage for /status and "
                            "/metrics (default 3600; SIGUSR1 lists it at once)")
    serve.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))

    why = commands.add_parser(
        "explain", help="show the decision for a request against the live configuration",
        description="Prints the decision (allow or deny), the rule that decided and its reason. "
        "Exit code: 0 allow, 1 deny, 2 usage error, 3 Redis could not be read.",
    )
    why.add_argument("--user", required=True, help="node/<id> or module/<id>")
    why.add_argument("--method", required=True, help="HTTP method, e.g. GET, POST, DELETE")
    why.add_argument("--path", required=True,
                     help="request target as sent, e.g. /<destination>/<app>/<uuid>/config")
    why.add_argument("--rest", action="store_true",
                     help="a Restic REST request (default: WebDAV unless ?create=true)")
    why.add_argument("--depth", help="WebDAV Depth header of a PROPFIND")
    why.add_argument("--redis-url", help="Redis URL (default: REDIS_URL or the agent environment)")
    why.add_argument("--size", type=int, metavar="BYTES",
                     help="the body's length: whether an upload fits its repository's quota")
    why.add_argument("--url", default=DEFAULT_URL,
                     help="the gateway asked for the repository's use of its quota and the "
                     "requests in flight (node credentials as for `status`; skipped when "
                     f"it cannot be asked; default {DEFAULT_URL})")

    insight_command.add_parser(commands)
    limits_command.add_parser(commands)

    config = commands.add_parser("config", help="inspect the configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser(
        "show", help="print the rendered rclone configuration, secret values masked")
    show.add_argument("--redis-url", help="Redis URL (default: REDIS_URL or the agent environment)")
    show.add_argument("--node-id", help="render for this node (default: NODE_ID)")
    show.add_argument("--local-repo", default="/srv/repo",
                      help="directory of this node's local repository (default /srv/repo)")
    return parser


def load_state(redis_url: str | None) -> ClusterState:
    try:
        return asyncio.run(read_live_state(redis_url or redis_url_from_env()))
    except (RedisError, OSError) as exc:
        print(f"rclone-gateway: cannot read the configuration from Redis: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(3) from None


def run_explain(args: argparse.Namespace) -> int:
    state = load_state(args.redis_url)
    result = explain(state, args.user, args.method, args.path, rest=args.rest, depth=args.depth)
    used, in_flight = _gateway_figures(args.url, args.user, result.path)
    limits = explain_limits(state, args.user, args.method, result, size=args.size, used=used,
                            in_flight=in_flight)
    sys.stdout.write(format_explanation(result, args.user, args.method, limits))
    return 1 if limits.status is not None else result.exit_code


def _gateway_figures(url: str, user: str, path: str) -> tuple[int | None, int | None]:
    """The repository's use and the user's requests in flight, from the gateway's /status;
    (None, None) when it cannot be asked."""
    try:
        document = ask_status(url, None, timeout=5)
    except CannotAsk:
        return None, None
    limits = document.get("limits") or {}
    segments = path.split("?", 1)[0].strip("/").split("/")
    repository = "/" + "/".join(segments[:3])
    used = next((q.get("used_bytes") for q in limits.get("quotas") or []
                 if q.get("repository") == repository), None)
    in_flight = (limits.get("concurrency") or {}).get("in_flight", {}).get(user, 0)
    return used, in_flight


def run_config_show(args: argparse.Namespace) -> int:
    node_id = args.node_id or os.environ.get("NODE_ID")
    if not node_id:
        print("rclone-gateway: --node-id or NODE_ID is required", file=sys.stderr)
        return 2
    state = load_state(args.redis_url)
    sys.stdout.write(masked_rendered_config(state, str(node_id), args.local_repo))
    return 0


def settings_from_args(args: argparse.Namespace) -> Settings:
    # The server (aiohttp and all) is imported only to serve: the operator commands start faster.
    from backends.liveness import LivenessSettings
    from gateway.server import prepare_runtime_dir
    from gateway.settings import Settings

    node_id = args.node_id or os.environ.get("NODE_ID")
    if not node_id:
        raise SystemExit("rclone-gateway: --node-id or NODE_ID is required")
    runtime = args.runtime_dir or (
        Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
        if os.environ.get("RUNTIME_DIRECTORY")
        else Path(tempfile.mkdtemp(prefix="rclone-gateway-"))
    )
    host, port = args.listen
    return Settings(
        listen_host=host,
        listen_port=port,
        redis_url=args.redis_url or redis_url_from_env(),
        node_id=str(node_id),
        local_repo=args.local_repo.resolve(),
        runtime_dir=prepare_runtime_dir(runtime.resolve()),
        rclone=args.rclone or default_rclone(),
        max_connections=args.max_connections,
        shutdown_grace=args.shutdown_grace,
        drain_grace=args.drain_grace,
        resync_interval=args.resync_interval,
        probe_interval=args.probe_interval,
        probe_timeout=args.probe_timeout,
        remote_probe_interval=args.remote_probe_interval,
        remote_probe_fast_interval=args.remote_probe_fast_interval,
        remote_probe_timeout=args.remote_probe_timeout,
        remote_check_timeout=args.remote_check_timeout,
        backend_timeout=args.backend_timeout,
        liveness=LivenessSettings(args.liveness_interval, args.liveness_timeout,
                                  args.liveness_misses),
        scan_interval=args.scan_interval,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "explain":
        return run_explain(args)
    if args.command == "status":
        return insight_command.run(args)
    if args.command == "limits":
        return limits_command.run(args)
    if args.command == "config":
        return run_config_show(args)
    if args.command == "serve":
        logs.configure(args.log_level)
        settings = settings_from_args(args)
        from gateway.server import Gateway

        try:
            import uvloop
        except ImportError:  # pragma: no cover
            return asyncio.run(Gateway(settings).run())
        return uvloop.run(Gateway(settings).run())
    return 2
