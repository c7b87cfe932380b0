"""API keys over HTTP (service/auth.py checks them).

The API key is checked by a pure ASGI middleware, before anything reads the body: a route
dependency runs only after FastAPI has parsed the request's form, so an unknown client
could make the server parse (and spool to disk) a full upload before hearing 401.
"""

from collections.abc import Sequence

from fastapi import Request
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import check, known_keys
from service.errors import Unauthorized
from service.http.door import context_of
from service.http.errors import error_response


class ApiKeyMiddleware:
    """401 on the `protected` routes (any method) unless the request carries a known key."""

    def __init__(self, app: ASGIApp, keys: frozenset[bytes], protected: Sequence[BaseRoute]):
        self.app, self.keys, self.protected = app, keys, protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(
            route.matches(scope)[0] != Match.NONE for route in self.protected
        ):
            context = context_of(scope)
            context.credentials = Headers(scope=scope).get("authorization", "")
            try:
                check(context.credentials, self.keys, "an API key")
            except Unauthorized as err:
                headers = {**err.headers, "Connection": "close"}  # the body stays unread
                response = error_response(context.operation, err.status_code, err.message,
                                          headers)  # fmt: skip
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def metrics_token(request: Request) -> None:
    settings = request.app.state.plane.settings
    if settings.metrics_token:
        what = "the metrics token"
        check(request.headers.get("authorization", ""), known_keys(settings.metrics_token, None),
              what)  # fmt: skip
