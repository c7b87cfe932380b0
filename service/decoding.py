"""A bound on expensive decoding: requests decoding images larger than 32x32 at once.

Each can cost a CPU for a while and tens of MB, so beyond MAX_LARGE_DECODES they are shed
(503 / RESOURCE_EXHAUSTED) instead of queueing CPU work. Whatever the transport, large
decodes go through the data plane's one `DecodeSlots`.
"""

import asyncio
from collections.abc import Callable
from typing import TypeVar

from contract.images import release_memory
from service.errors import Overloaded

T = TypeVar("T")


class DecodeSlots:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.busy = 0

    async def run(self, decode: Callable[[], T]) -> T:
        if self.busy >= self.slots:
            raise Overloaded(
                f"{self.slots} requests are already decoding large images; retry shortly"
            )
        self.busy += 1  # the event loop is single-threaded: no lock needed
        try:
            return await asyncio.to_thread(self._decode_then_trim, decode)
        finally:
            self.busy -= 1

    def _decode_then_trim(self, decode: Callable[[], T]) -> T:
        try:
            return decode()
        finally:
            if self.busy == 1:  # the last one out hands the burst's memory back
                release_memory()
