"""`make run`: a one-node cluster on this machine, with the gateway in front of it.

Starts a private redis-server, seeds it the way the cluster does (one node, one
module, one local destination), starts the gateway on 127.0.0.1:4694 and prints
commands to paste into another shell. Ctrl-C stops everything.

Only the standard library and the sync `redis` client are used here, so the demo
does not depend on the rest of the package.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "var" / "demo"
LISTEN_HOST = "127.0.0.1"
LISTEN_PORT = 4694
NODE_ID = "1"
NODE_VPN_IP = "10.5.4.1"
NETWORK = "10.5.4.0/24"
MODULE_ID = "traefik1"
APP_TYPE = "traefik"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0

_stop_signal: int | None = None


def _on_signal(signum: int, _frame: object) -> None:
    global _stop_signal
    _stop_signal = signum


def _say(text: str = "") -> None:
    print(text, flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _start_redis(workdir: Path) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("demo: redis-server not found in PATH (run scripts/bootstrap.sh)")
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "redis.log", "ab")  # noqa: SIM115 - closed with the process
    for _attempt in range(5):
        port = _free_port()
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, process_group=0,
        )
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.ping():
                    client.close()
                    log.close()
                    return proc, port
            except redis.RedisError:
                time.sleep(0.05)
        client.close()
        _stop_process(proc, 5)
    log.close()
    raise SystemExit(f"demo: redis-server did not start, see {workdir / 'redis.log'}")


def _seed(client: redis.Redis, destination: str, module_uuid: str,
          node_password: str, module_password: str) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.flushdb()
    pipe.sadd(
        "cluster/acls",
        f"user node/{NODE_ID} on sanitize-payload #{_sha256(node_password)} ~* &* +@all",
        f"user module/{MODULE_ID} on #{_sha256(module_password)} ~module/{MODULE_ID}/* +@read",
    )
    pipe.hset("cluster/module_uuid", MODULE_ID, module_uuid)
    pipe.hset("cluster/module_node", MODULE_ID, NODE_ID)
    pipe.hset(f"node/{NODE_ID}/vpn", "ip_address", NODE_VPN_IP)
    pipe.set("cluster/network", NETWORK)
    pipe.hset("cluster/environment", "NODE_ID", NODE_ID)
    pipe.hset(
        f"cluster/backup_repository/{destination}",
        mapping={
            "provider": "cluster",
            "url": f"webdav:http://{NODE_VPN_IP}:{LISTEN_PORT}",
            "name": "Demo local repository",
            "basepath": "",
        },
    )
    pipe.execute()


def _health_ok() -> bool:
    conn = http.client.HTTPConnection(LISTEN_HOST, LISTEN_PORT, timeout=2)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _stop_process(proc: subprocess.Popen, timeout: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                proc.kill()
            proc.wait()
    return proc.returncode


def _describe_status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _print_instructions(destination: str, module_uuid: str,
                        node_password: str, module_password: str) -> None:
    address = f"{LISTEN_HOST}:{LISTEN_PORT}"
    path = f"{destination}/{APP_TYPE}/{module_uuid}/"
    as_module = f"restic -r rest:http://module%2F{MODULE_ID}:{module_password}@{address}/{path}"
    as_node = f"restic -r rest:http://node%2F{NODE_ID}:{node_password}@{address}/{path}"
    sample = ROOT / "gateway"
    _say()
    _say(f"rclone-gateway demo ready on http://{address} (node {NODE_ID})")
    _say(f"destination {destination} 'Demo local repository' -> var/demo/repo")
    _say("paste into another shell:")
    _say()
    _say("export RESTIC_PASSWORD=demo")
    _say(f"# as module/{MODULE_ID}: may add backups to its own repository, never delete")
    _say(f"{as_module} init")
    _say(f"{as_module} backup {sample}")
    _say(f"{as_module} snapshots")
    _say(f"# as node/{NODE_ID}: full access")
    _say(f"{as_node} snapshots")
    _say(f"{as_node} forget --keep-last 1 --prune")
    _say(f"curl -s http://{address}/health")
    _say(f"curl -u 'node/{NODE_ID}:{node_password}' -X PROPFIND -H 'Depth: 1' http://{address}/")
    _say()
    _say("Ctrl-C stops the gateway and redis.")


def main() -> int:
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    if _port_in_use(LISTEN_HOST, LISTEN_PORT):
        _say(f"demo: {LISTEN_HOST}:{LISTEN_PORT} is already in use; stop what listens there")
        return 1

    local_repo = DEMO_DIR / "repo"
    runtime_dir = DEMO_DIR / "run"
    local_repo.mkdir(parents=True, exist_ok=True)
    runtime_dir.mkdir(parents=True, exist_ok=True)
    runtime_dir.chmod(0o700)

    destination = str(uuid.uuid4())
    module_uuid = str(uuid.uuid4())
    node_password = secrets.token_urlsafe(18)
    module_password = secrets.token_urlsafe(18)

    redis_proc, redis_port = _start_redis(DEMO_DIR / "redis")
    gateway: subprocess.Popen | None = None
    status = 0
    try:
        client = redis.Redis(host="127.0.0.1", port=redis_port)
        _seed(client, destination, module_uuid, node_password, module_password)
        client.close()

        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        _say(f"demo: redis-server on {redis_url}, starting the gateway")
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve",
             "--listen", f"{LISTEN_HOST}:{LISTEN_PORT}",
             "--redis-url", redis_url,
             "--node-id", NODE_ID,
             "--local-repo", "var/demo/repo",
             "--runtime-dir", "var/demo/run"],
            cwd=ROOT, stdin=subprocess.DEVNULL, process_group=0,
        )

        deadline = time.monotonic() + READY_TIMEOUT
        ready = False
        while _stop_signal is None:
            code = gateway.poll()
            if code is not None:
                _say(f"demo: the gateway stopped before it was ready ({_describe_status(code)})")
                return 1
            if _health_ok():
                ready = True
                break
            if time.monotonic() > deadline:
                _say(f"demo: the gateway was not ready within {READY_TIMEOUT:.0f} s")
                return 1
            time.sleep(0.2)

        if ready:
            _print_instructions(destination, module_uuid, node_password, module_password)

        while _stop_signal is None:
            code = gateway.poll()
            if code is not None:
                _say(f"demo: the gateway stopped ({_describe_status(code)})")
                status = code if code > 0 else 1
                break
            time.sleep(0.2)
        return status
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if gateway is not None and gateway.poll() is None:
            _say("demo: stopping the gateway")
            code = _stop_process(gateway, STOP_TIMEOUT)
            _say(f"demo: gateway {_describe_status(code)}")
        _stop_process(redis_proc, 5)


if __name__ == "__main__":
    sys.exit(main())
