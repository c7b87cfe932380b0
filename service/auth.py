"""Access control, off by default: bearer tokens for the prediction and model routes, and
a token of its own for /metrics. Health stays open for probes.

The API key is checked by a pure ASGI middleware, before anything reads the body: a route
dependency runs only after FastAPI has parsed the request's form, so an unknown client
could make the server parse (and spool to disk) a full upload before hearing 401.

Tokens are compared as SHA-256 digests with `hmac.compare_digest`, against every known
key each time, so neither a token's length nor how much of it matched shows in the
timing. API_KEYS_FILE holds digests only (one hex SHA-256 per line, `#` comments), so
the file never holds a usable token: `printf %s "$TOKEN" | sha256sum`.
"""

import functools
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from pathlib import Path

from fastapi import Request
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from service.config import Settings, get_settings
from service.errors import Unauthorized, error_response


class ApiKeyMiddleware:
    """401 on the `protected` routes (any method) unless the request carries a known key."""

    def __init__(self, app: ASGIApp, keys: frozenset[bytes], protected: Sequence[BaseRoute]):
        self.app, self.keys, self.protected = app, keys, protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(
            route.matches(scope)[0] != Match.NONE for route in self.protected
        ):
            try:
                check(Headers(scope=scope), self.keys, "an API key")
            except Unauthorized as err:
                headers = {**err.headers, "Connection": "close"}  # the body stays unread
                response = error_response(scope["path"], err.status_code, err.message, headers)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def metrics_token(request: Request) -> None:
    settings = get_settings()
    if settings.metrics_token:
        check(request.headers, known_keys(settings.metrics_token, None), "the metrics token")


def check(headers: Mapping[str, str], keys: frozenset[bytes], what: str) -> None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(f"send {what} as `Authorization: Bearer <token>`")
    digest = hashlib.sha256(token.strip().encode()).digest()
    # No early exit: every key is compared, each in constant time.
    matches = [hmac.compare_digest(digest, key) for key in keys]
    if not any(matches):
        raise Unauthorized(f"{what} was not accepted")


@functools.cache
def known_keys(tokens: str, digests_file: Path | None) -> frozenset[bytes]:
    keys = {hashlib.sha256(t.strip().encode()).digest() for t in tokens.split(",") if t.strip()}
    if digests_file is not None:
        for line in Path(digests_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.add(bytes.fromhex(line))
    return frozenset(keys)


def validate(settings: Settings) -> frozenset[bytes]:
    """At startup, the keys to require (empty: open). A malformed keys file, or a key
    setting that holds no key at all (`API_KEYS=","`, a file of comments), stops the
    server: it was meant to be closed, and starting open would say nothing."""
    try:
        keys = known_keys(settings.api_keys, settings.api_keys_file)
    except (OSError, ValueError) as err:
        raise ValueError(f"API_KEYS_FILE {settings.api_keys_file}: {err}") from None
    if any(len(key) != 32 for key in keys):
        raise ValueError(f"API_KEYS_FILE {settings.api_keys_file}: one SHA-256 (64 hex) a line")
    configured = bool(settings.api_keys.strip()) or settings.api_keys_file is not None
    if configured and not keys:
        raise ValueError(
            "API_KEYS or API_KEYS_FILE is set but holds no key; unset both to run without "
            "keys, or give at least one"
        )
    return keys
