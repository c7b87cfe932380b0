"""Access control, off by default: bearer tokens for the prediction and model routes
(HTTP and gRPC alike), and a token of its own for /metrics. Health stays open for probes.

Each transport checks the key before it reads the body (service/http/keys.py, and the
gRPC servicer from its metadata); the check itself is here.

Tokens are compared as SHA-256 digests with `hmac.compare_digest`, against every known
key each time, so neither a token's length nor how much of it matched shows in the
timing. API_KEYS_FILE holds digests only (one hex SHA-256 per line, `#` comments), so
the file never holds a usable token: `printf %s "$TOKEN" | sha256sum`.
"""

import functools
import hashlib
import hmac
from pathlib import Path

from service.config import Settings
from service.errors import Unauthorized


def check(authorization: str, keys: frozenset[bytes], what: str) -> None:
    """Unauthorized unless `authorization` (the header's or metadata's value) is
    `Bearer <token>` with a known token."""
    scheme, _, token = authorization.partition(" ")
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
