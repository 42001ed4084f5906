"""Command line: `rclone-gateway serve ...` (spec section 9)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from gateway.redis_source import redis_url_from_env
from gateway.server import Gateway, Settings, prepare_runtime_dir


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
    serve.add_argument("--remote-check-timeout", type=float, default=15.0,
                       help="seconds a remote destination gets to answer its start check")
    serve.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
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
        remote_check_timeout=args.remote_check_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        settings = settings_from_args(args)
        try:
            import uvloop
        except ImportError:  # pragma: no cover
            return asyncio.run(Gateway(settings).run())
        return uvloop.run(Gateway(settings).run())
    return 2
