"""Reading a request and noticing its client leave, in plain ASGI: what the routes
(through service/http/deps.py) and the hot paths that bypass them (service/routes/v2.py,
service/routes/predict.py) both need, written once; and the route those hot paths are."""

from typing import Any, NoReturn

from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service.context import RequestContext
from service.errors import ClientGone


async def read_body(receive: Receive) -> bytes:
    """The whole body, as the server hands it over (the middleware bounds it as it comes).
    A client that leaves before the end gets no answer; its request is logged as 499."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("the client closed the connection before sending the whole body")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def watch_disconnect(context: RequestContext, receive: Receive) -> None:
    """Tell the context how to notice its client leaving: once the body has been read, the
    next message the server gives is the disconnect."""

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    context.gone = gone


DIRECT = "direct"  # app.state key: each DirectRoute's endpoint -> the ASGI app answering it


class DirectRoute(APIRoute):
    """An API route answered by a bare ASGI app, not by FastAPI's request and response
    machinery: its endpoint's signature is what OpenAPI documents; the app that answers
    is the one the FastAPI app holds for that endpoint (`app.state.direct`, set where
    the app is made: routers are shared by every app built from them), whether the HTTP
    middleware calls it directly (its fast path, service/http/middleware.py) or the
    router reaches it. One entry point, documented."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in self.methods:
            return await super().handle(scope, receive, send)  # its 405
        return await answer_of(scope, self)(scope, receive, send)


def answer_of(scope: Scope, route: DirectRoute) -> ASGIApp:
    return getattr(scope["app"].state, DIRECT)[route.endpoint]


def documented_only(*args: Any, **kwargs: Any) -> NoReturn:
    """The body of a DirectRoute's endpoint: never called (its app answers)."""
    raise AssertionError("a DirectRoute is answered by its ASGI app")
