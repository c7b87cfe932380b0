"""Micro-batching: concurrent requests to one model share one onnxruntime call.

Requests put their images on a queue and await a future. One loop per model takes
what is queued (under concurrent load, waiting at most `max_wait` for more), runs the
batch in the model's own worker thread, so the event loop never blocks, and hands each
request its rows. A batch that fails is retried request by request, so one bad request
cannot fail the others.
"""

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]


class MicroBatcher:
    def __init__(
        self,
        predict: Predict,
        max_batch: int,
        max_wait: float,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self._predict = predict
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._on_batch = on_batch
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))
        self._worker.shutdown(wait=True)

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for `images` (uint8 [N, 32, 32, 3]), computed in some batch."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((images, future))
        return await future

    async def _serve(self) -> None:
        concurrent = False  # did the last batch hold more than one request?
        while True:
            batch = [await self._queue.get()]
            self._take_queued(batch)
            # Waiting only pays when requests come in parallel; a lone client would just
            # be slowed down by max_wait on every request.
            if concurrent and self._size(batch) < self._max_batch and self._max_wait > 0:
                await asyncio.sleep(self._max_wait)  # let concurrent requests catch up
                self._take_queued(batch)
            concurrent = len(batch) > 1
            await self._run(batch)

    def _take_queued(self, batch: list) -> None:
        while self._size(batch) < self._max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    @staticmethod
    def _size(batch: list) -> int:
        return sum(len(images) for images, _ in batch)

    async def _run(self, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        batch = [(images, future) for images, future in batch if not future.done()]
        if not batch:
            return  # every client here went away
        loop = asyncio.get_running_loop()
        try:
            stacked = np.concatenate([images for images, _ in batch])
            probabilities = await loop.run_in_executor(self._worker, self._predict, stacked)
        except Exception as err:
            if len(batch) == 1:
                if not batch[0][1].done():
                    batch[0][1].set_exception(err)
            else:  # find the request that broke the batch; serve the others
                for item in batch:
                    await self._run([item])
            return
        self._on_batch(len(stacked))
        start = 0
        for images, future in batch:
            if not future.done():
                future.set_result(probabilities[start : start + len(images)])
            start += len(images)
