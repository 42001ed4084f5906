"""The aiohttp handler: runs each request through the stages, then accounts for it once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from aiohttp import web

from gateway.access.refusals import Refusal, record
from gateway.edge.logs import access_level, access_line
from gateway.edge.shutdown import close_after_response
from gateway.insight import record as insight
from gateway.pipeline.exchange import Exchange, Services
from gateway.pipeline.stages import STAGES, Stage


class Pipeline:
    def __init__(self, services: Services, stages: Sequence[Stage] = STAGES) -> None:
        self.services = services
        self.stages = stages
        self.inflight = 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        x = Exchange(request, self.services)
        response: web.StreamResponse | None = None
        self.inflight += 1
        try:
            for stage in self.stages:
                response = await stage(x)
                if response is not None:
                    return response
            raise RuntimeError("no stage answered")  # the last one, dispatch, always does
        except asyncio.CancelledError:  # aiohttp cancels the handler of a client that left
            record(x.outcome, x.cut().given())
            raise
        except ConnectionResetError:
            # The client left while its answer went out (aiohttp's write raises this, and a
            # spliced answer's too): a cut request like the one above, not an internal error.
            # aiohttp finds the connection gone when it sends this, and sends nothing.
            response = x.refuse(x.cut())
            return response
        finally:
            self.inflight -= 1
            self._account(x, response, started)

    def _account(self, x: Exchange, response: web.StreamResponse | None, started: float) -> None:
        """Metrics, insight and the access log: what became of the request."""
        services, outcome, method = self.services, x.outcome, x.request.method
        status = response.status if response is not None else Refusal.CLIENT_CLOSED.status
        for ended in x.at_end:
            ended(status)
        services.metrics.observe(
            caller=outcome.caller, protocol=outcome.protocol, method=method,
            decision=outcome.decision, status=status, duration=time.monotonic() - started,
            bytes_in=outcome.transfer.bytes_in, bytes_out=outcome.transfer.bytes_out,
            refusal=outcome.refusal,
        )
        if outcome.target is not None:
            self._record(x, status)
        if services.stopping:
            close_after_response(x.request)
        self._log(x, response, status, started)

    def _record(self, x: Exchange, status: int) -> None:
        """Insight: what this exchange did to a repository. A request sent on to a peer is
        recorded there, by the node that serves it; a refusal, here."""
        outcome = x.outcome
        assert outcome.target is not None
        allowed = outcome.decision == "allow"
        if allowed and not outcome.served_here:
            return
        self.services.insight.record(insight.FinishedRequest(
            outcome.target, x.request.method, status, allowed, outcome.reason, outcome.is_node,
            outcome.transfer.bytes_in, outcome.transfer.bytes_out, time.time()))

    def _log(self, x: Exchange, response: web.StreamResponse | None, status: int,
             started: float) -> None:
        access_log, outcome = self.services.access_log, x.outcome
        level = access_level(status, outcome.decision)
        if not access_log.enabled(level):
            return
        access_log.write(
            level,
            access_line(
                {
                    "source": outcome.source,
                    "user": outcome.user,
                    "method": x.request.method,
                    "path": outcome.path,
                    "protocol": outcome.protocol,
                    "decision": outcome.decision,
                    "rule": outcome.rule,
                    "reason": outcome.reason,
                    "status": status,
                    "bytes_in": outcome.transfer.bytes_in,
                    "bytes_out": outcome.transfer.bytes_out,
                    "duration_ms": round((time.monotonic() - started) * 1000, 2),
                    "backend": outcome.backend,
                    # whose answer the status is: a backend's (or a peer's) passed on, or the
                    # gateway's own (a refusal, or a backend that failed to answer)
                    "answered_by": "backend" if response is not None
                    and "X-Gateway-Backend" in response.headers else "gateway",
                },
                time.time(),
            ),
        )
