"""API keys over HTTP (service/auth.py checks them), the metrics token and admin keys.

The API key is checked in the HTTP middleware (service/http/middleware.py), before
anything reads the body: a route dependency runs only after FastAPI has parsed the
request's form, so an unknown client could make the server parse (and spool to disk) a
full upload before hearing 401.
"""

import hashlib
from collections.abc import Sequence

from fastapi import Request
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from service.auth import check, known_keys
from service.context import RequestContext
from service.errors import Forbidden, Unauthorized, status_of
from service.http.errors import error_response


class ApiKeys:
    """401 on the `protected` routes (any method) unless the request carries a known key."""

    def __init__(self, keys: frozenset[bytes], protected: Sequence[BaseRoute]) -> None:
        self.keys, self.protected = keys, protected

    def refusal(self, scope: Scope, context: RequestContext) -> Response | None:
        """None when the request may go on; else the 401 to answer with."""
        if not any(route.matches(scope)[0] != Match.NONE for route in self.protected):
            return None
        context.credentials = Headers(scope=scope).get("authorization", "")
        try:
            check(context.credentials, self.keys, "an API key")
        except Unauthorized as err:
            status = status_of(err)
            headers = {**(status.headers or {}), "Connection": "close"}  # the body stays unread
            return error_response(context.operation, status.http, err.message, headers)
        return None


async def metrics_token(request: Request) -> None:
    settings = request.app.state.plane.settings
    if settings.metrics_token:
        what = "the metrics token"
        check(request.headers.get("authorization", ""), known_keys(settings.metrics_token, None),
              what)  # fmt: skip


async def admin_key(request: Request) -> str:
    """The admin routes' check: 403 while ADMIN_KEYS is empty (they are off), 401 without
    one of its tokens. Returns who called, for the log: the first 8 hex digits of the
    token's SHA-256 (never the token)."""
    settings = request.app.state.plane.settings
    if not settings.admin_keys.strip():
        raise Forbidden("the admin routes are off on this server: set ADMIN_KEYS to use them")
    authorization = request.headers.get("authorization", "")
    check(authorization, known_keys(settings.admin_keys, None), "an admin key")
    token = authorization.partition(" ")[2].strip()
    return "admin " + hashlib.sha256(token.encode()).hexdigest()[:8]
