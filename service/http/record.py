"""Per HTTP request (pure ASGI: no per-request task or body copy): its request id returned
on every response, errors too; its metrics and one JSON access line (service/metrics.py),
labelled with the matched route's template."""

import time

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.door import REQUEST_ID, context_of
from service.metrics import Metrics


class RecordMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        context = context_of(scope)
        request_id = context.request_id.encode()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID, request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.finish(context, route_template(scope), scope["method"], str(status),
                                seconds)  # fmt: skip


def route_template(scope: Scope) -> str:
    """The matched route's template (/models/{model_id}), never the raw path: a label per
    URL ever asked for would grow without bound. Unknown paths share one bucket."""
    route = scope.get("route")  # set by FastAPI's own routes
    if route is None:  # /openapi.json, /docs and mounts are plain Starlette routes
        for candidate in scope["app"].router.routes:
            if candidate.matches(scope)[0] == Match.FULL:
                route = candidate
                break
    return getattr(route, "path", None) or "unmatched"
