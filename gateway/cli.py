"""Command line: `rclone-gateway serve ...` (spec section 9), `explain`, `config show`,
`status` (gateway/commands/status.py) and `limits` (gateway/commands/limits.py).

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
from dataclasses import fields
from pathlib import Path

from redis.exceptions import RedisError

from gateway.cluster.redis_source import redis_url_from_env
from gateway.cluster.state import ClusterState
from gateway.commands import limits as limits_command
from gateway.commands import status as insight_command
from gateway.commands.explain import (
    explain,
    explain_limits,
    format_explanation,
    masked_rendered_config,
    read_live_state,
)
from gateway.commands.node_client import DEFAULT_URL, CannotAsk, ask_status
from gateway.edge import logs
from gateway.settings import Settings

DEFAULTS = Settings()


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
    serve.add_argument("--listen", type=parse_listen,
                       default=(DEFAULTS.listen_host, DEFAULTS.listen_port), metavar="HOST:PORT",
                       help=f"address to listen on (default {DEFAULTS.listen_host}:"
                            f"{DEFAULTS.listen_port})")
    serve.add_argument("--redis-url",
                       help="Redis URL (default: REDIS_URL or the agent environment)")
    serve.add_argument("--node-id", help="this node's id (default: NODE_ID)")
    serve.add_argument("--local-repo", type=Path, default=DEFAULTS.local_repo,
                       help="directory of this node's local repository (default %(default)s)")
    serve.add_argument("--runtime-dir", type=Path,
                       help="private directory for sockets and the rclone configuration "
                            "(default: RUNTIME_DIRECTORY, or a new temporary directory)")
    serve.add_argument("--rclone", default=None,
                       help="rclone executable (default: the one installed beside the gateway)")
    for setting in fields(Settings):
        if "help" in setting.metadata:
            serve.add_argument(
                "--" + setting.name.replace("_", "-"), dest=setting.name,
                type=positive_count if setting.type == "int" else positive_seconds,
                metavar="N" if setting.type == "int" else "SECONDS",
                default=setting.default, help=setting.metadata["help"] + " (default %(default)s)")
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
    show.add_argument("--local-repo", type=Path, default=DEFAULTS.local_repo,
                      help="directory of this node's local repository (default %(default)s)")
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
    from gateway.app import prepare_runtime_dir

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
        **{setting.name: getattr(args, setting.name)
           for setting in fields(Settings) if "help" in setting.metadata},
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
        from gateway.app import Gateway

        try:
            import uvloop
        except ImportError:  # pragma: no cover
            return asyncio.run(Gateway(settings).run())
        return uvloop.run(Gateway(settings).run())
    return 2
