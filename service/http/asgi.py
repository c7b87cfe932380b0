"""Reading a request and noticing its client leave, in plain ASGI: what the routes
(through service/http/deps.py) and the hot path that bypasses them (service/routes/v2.py)
both need, written once."""

from starlette.types import Receive

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
