"""What each HTTP request is recorded under: its metrics and access line (service/metrics.py,
written by service/http/middleware.py) are labelled with the matched route's template."""

from starlette.routing import Match
from starlette.types import Scope


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
