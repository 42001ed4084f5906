"""The request path: every request goes through `STAGES` in order (spec section 4).

A stage takes the exchange and returns the answer, or None to let the next stage
look; the first answer is the response. A stage may note what it found on the
exchange for the stages after it. The list is at the end of this file, in order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.access.credentials import parse_basic, password_digest, verify_digest
from gateway.access.paths import PathError, canonicalise
from gateway.access.policy import (
    Request,
    WireProtocol,
    decide,
    detect_protocol,
    is_probe,
    module_caller,
    node_caller,
    size_limit,
)
from gateway.access.refusals import Refusal
from gateway.access.throttle import credential_key
from gateway.access.webdav_headers import RULE as REFERENCES_RULE
from gateway.access.webdav_headers import HeaderRefused, references_of
from gateway.cluster.state import is_trusted_source
from gateway.edge.server import head_too_large
from gateway.forwarding.proxy import paced, plain
from gateway.insight.page import html_page
from gateway.limits.accounting import (
    object_size,
    recount_after_webdav,
    when_stored,
    written_by_webdav,
)
from gateway.pipeline.dispatch import dispatch
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.upload import Upload, at_most
from gateway.status.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

Answer = web.StreamResponse | None
Stage = Callable[[Exchange], Awaitable[Answer]]

READ_ONLY = frozenset({"GET", "HEAD"})


async def source_address(x: Exchange) -> Answer:
    """Local clients and the cluster network only: 403 before anything else is read."""
    transport = x.request.transport
    peer = transport.get_extra_info("peername") if transport else None
    x.outcome.source = peer[0] if peer else None
    if not is_trusted_source(x.source, x.state.networks):
        return x.refuse(Refusal.SOURCE_NOT_ALLOWED)
    return None


async def head_size(x: Exchange) -> Answer:
    if head_too_large(x.request):
        return x.refuse(Refusal.HEAD_TOO_LARGE)
    return None


async def operations(x: Exchange) -> Answer:
    """`/health` and `/metrics`: no credentials from trusted sources (spec section 8)."""
    raw = x.request.raw_path
    if raw not in ("/health", "/health/", "/metrics", "/metrics/"):
        return None
    x.outcome.path = raw
    if x.request.method not in READ_ONLY:
        return x.refuse(Refusal.METHOD_NOT_ALLOWED)
    if raw.startswith("/health"):
        status = x.services.node_status()
        return web.json_response(status.document(), status=200 if status.serving else 503)
    return web.Response(body=x.services.metrics.exposition(),
                        headers={"Content-Type": METRICS_CONTENT_TYPE})


async def canonical_target(x: Exchange) -> Answer:
    """The raw target canonicalised once: what the policy decides on and the backend gets."""
    try:
        x.target = canonicalise(x.request.raw_path)
    except PathError as exc:
        return x.refuse(Refusal.BAD_TARGET, exc)
    return None


async def health_probe(x: Exchange) -> Answer:
    """A peer asks whether a destination is served and healthy here: no credentials."""
    if not is_probe(x.request.method, x.target):
        return None
    x.outcome.rule = "probe"
    uuid = x.target.segments[0]
    if x.services.serving.served_here(uuid) and x.services.serving.healthy_here(uuid):
        return plain(404, "not found")
    return x.refuse(Refusal.PROBE_NOT_SERVED)


async def credentials(x: Exchange) -> Answer:
    """HTTP Basic against `cluster/acls`; repeated failures slowed, then refused (429)."""
    parsed = parse_basic(x.request.headers.get("Authorization"))
    if parsed is None:
        return x.refuse(Refusal.NO_CREDENTIALS)
    user, password = parsed
    state, throttle, source = x.state, x.services.throttle, x.source or ""
    x.outcome.user = user if user in state.users else "unknown"
    now = time.monotonic()
    digest = password_digest(password)
    credential = credential_key(user, digest)
    verdict = throttle.check(source, user, now, credential)
    if not verdict.allowed:
        return x.refuse(Refusal.TOO_MANY_FAILED_LOGINS, retry_after=verdict.retry_after)
    if not verify_digest(state.users, user, digest):
        delay = throttle.failed(source, user, now, credential)
        if delay:
            await asyncio.sleep(delay)
        return x.refuse(Refusal.BAD_CREDENTIALS)
    throttle.succeeded(credential)
    x.caller = (node_caller(user) if user.startswith("node/")
                else module_caller(user, state.module_uuids, state.restore_grants))
    return None


async def node_status(x: Exchange) -> Answer:
    """`/status`: what the gateway knows of the repositories it serves, for nodes only."""
    if x.request.raw_path not in ("/status", "/status/"):
        return None
    if not x.caller.is_node:
        return x.refuse(Refusal.NOT_FOR_MODULES)
    if x.request.method == "POST":  # `rclone-gateway status --rescan`
        x.services.insight.scan_all_soon()
        return plain(202, "listing the storage")
    if x.request.method not in READ_ONLY:
        return x.refuse(Refusal.STATUS_METHOD_NOT_ALLOWED)
    report = x.services.insight.report()
    if "text/html" in x.request.headers.get("Accept", ""):
        return web.Response(text=html_page(report), content_type="text/html")
    return web.json_response({**report.document(), "limits": x.services.limits.document()})


async def policy(x: Exchange) -> Answer:
    """The protocol (Restic REST or WebDAV), then the access table's decision."""
    headers = x.request.headers
    protocol = detect_protocol(headers.get("Accept", ""), x.target.query)
    described = Request(x.caller, protocol, x.request.method, x.target, headers.get("Depth"))
    decision = decide(described)
    x.decided(described, decision)
    if not decision.allowed:
        return x.refuse(Refusal.FORBIDDEN, decision.reason)
    return None


async def webdav_references(x: Exchange) -> Answer:
    """The other paths a WebDAV request names (Destination of COPY and MOVE, If)."""
    try:
        x.references = references_of(x.described, x.request.headers)
    except HeaderRefused as exc:
        x.outcome.decision, x.outcome.rule = "deny", REFERENCES_RULE
        return x.refuse(exc.refusal, exc.reason)
    return None


async def small_objects(x: Exchange) -> Answer:
    """A module's config, key or lock larger than restic ever writes: 413 before its body
    is let in (spec section 4, "Sizes"); a body of unknown length is cut past the limit."""
    if (limit := size_limit(x.described)) is None:
        return None
    if (x.request.content_length or 0) > limit:
        return x.refuse(Refusal.TOO_LARGE, limit)
    x.transform_body(at_most(limit), None)
    return None


async def upload_precheck(x: Exchange) -> Answer:
    """A POST of a restic object: a module's is checked before its body is let in, and its
    body must then hash to the object's name, wherever it is sent."""
    upload = x.upload = Upload.of(x.described, x.backend)
    if upload is None:
        return None
    if (refusal := upload.precheck(x.request.content_length, x.outcome)) is not None:
        return refusal
    if upload.verified:
        x.transform_body(upload.verify, upload.splicing())
    return None


async def concurrency_cap(x: Exchange) -> Answer:
    """At most so many requests in flight per module, and per node user apart: over it,
    503 at once (restic retries it), never a queue."""
    caller, limits = x.caller, x.services.limits
    if not limits.enter(caller.user, caller.is_node, caller.group):
        return x.refuse(Refusal.TOO_MANY_IN_FLIGHT)
    x.at_end.append(lambda _status: limits.leave(caller.user))
    return None


async def storage_quota(x: Exchange) -> Answer:
    """A module's upload that would take its repository over its quota: 507, before the
    body is let in. Where the repository is stored: a peer's destination is its matter.
    Also keeps the count of stored bytes up to date with every upload and delete."""
    if x.goes_to_peer:
        return None
    limits, listings, method = x.services.limits, x.services.insight, x.request.method
    if x.described.protocol is not WireProtocol.REST:
        if written_by_webdav(method):  # a node's: a repository may go or come whole
            moved_to = x.references.destination if x.references is not None else None
            x.at_end.append(when_stored(
                recount_after_webdav(limits, listings, method, x.target, moved_to)))
        return None
    if (where := x.target.address) is None:
        return None
    key, is_lock = where.key, where.object_type == "locks"
    if method == "POST" and (where.object_id is not None or where.is_config):
        size = x.request.content_length or 0
        module = x.caller.module_id
        # locks come and go with every run, and retention must always run: never refused
        quota = None if module is None or is_lock else limits.quota_of(key, module)
        if (refused := limits.check_upload(key, size, quota)) is not None:
            return x.refuse(refused)
        reserved = size if quota is not None else 0
        transfer = x.outcome.transfer
        lock = where.object_id if is_lock else None
        x.at_end.append(lambda status: limits.upload_ended(
            key, module, reserved, transfer.bytes_in if 200 <= status < 300 else None, lock))
    elif method == "DELETE" and where.object_id is not None:
        size = limits.lock_size(key, where.object_id) if is_lock else None
        if size is None and limits.has_quotas(key.destination):
            size = await object_size(x.services.backends.current, x.backend, x.target)
        if size is not None:
            x.at_end.append(when_stored(lambda: limits.deleted(key, size)))
        elif not is_lock:  # a prune's delete: the storage says what is left
            x.at_end.append(when_stored(lambda: listings.scan_soon(key)))
    return None


async def bandwidth(x: Exchange) -> Answer:
    """Both bodies held to the bandwidth limits, where the request is served: a request
    sent on to a peer is limited there, once."""
    if x.goes_to_peer:
        return None
    limits = x.services.limits
    module = x.caller.module_id
    if x.request.body_exists:
        x.upload_shaping = limits.shaping("upload", module)
        x.transform_body(x.upload_shaping, paced(limits.pace("upload", module)))
        x.body_held = lambda: limits.holds("upload", module)
    x.response_transform = limits.shaping("download", module)
    x.response_splicing = paced(limits.pace("download", module))
    return None


STAGES: tuple[Stage, ...] = (
    source_address,     # 403
    head_size,          # 431
    operations,         # /health, /metrics
    canonical_target,   # 400
    health_probe,       # 404 or 503, no credentials
    credentials,        # 401, 429
    node_status,        # /status
    policy,             # 403
    webdav_references,  # 400, 403
    concurrency_cap,    # 503
    small_objects,      # 413
    upload_precheck,    # 411, 400
    storage_quota,      # 507
    bandwidth,          # shapes both bodies
    dispatch,           # to a backend of this node, or to a peer gateway
)
