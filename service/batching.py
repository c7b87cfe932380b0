"""Micro-batching: concurrent requests to one model share one onnxruntime call.

Requests are queued with a deadline; one loop per model takes what is queued (all of it
at once when a queue built up during the last batch; when it was idle and requests come
in parallel, after waiting at most `max_wait` for more), runs it in the model's own worker
thread, so the event loop never blocks, and hands each request its rows.

The bounds that keep a bad day from becoming an outage live here, in one place for
every protocol:
- `max_batch` is a hard cap on images per onnxruntime call: a request that does not fit
  waits for the next call; one larger than the cap runs alone, in slices.
- `max_queue` bounds the images waiting; beyond it `submit` sheds at once (Overloaded).
- A request whose deadline passed, or whose client went away, is dropped before it is
  computed, and counted.
- A batch that fails is retried request by request, so one bad request cannot fail the
  others; an error escaping the loop itself fails what is pending (503) and the loop
  restarts.
"""

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.errors import DeadlineExceeded, NotReady, Overloaded

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]  # output name -> array with one row per image
# The model: images and the names of the outputs wanted (their union over the batch, so
# nothing is copied back that no request of the batch returns).
Predict = Callable[[np.ndarray, Sequence[str]], Outputs]


@dataclass(frozen=True)
class Result:
    outputs: Outputs
    queue_seconds: float  # from submit until its batch started
    inference_seconds: float  # the onnxruntime call(s) of its batch


@dataclass(eq=False)
class _Request:
    images: np.ndarray
    future: asyncio.Future
    deadline: float  # on the event loop's clock
    queued_at: float
    outputs: frozenset[str]  # the names this request returns
    taken: bool = False  # moved into a batch


class MicroBatcher:
    def __init__(
        self,
        predict: Predict,
        max_batch: int,
        max_wait: float,
        max_queue: int,
        *,
        combine: bool = True,
        on_batch: Callable[[int, float], None] = lambda size, seconds: None,
        on_drop: Callable[[str, int], None] = lambda reason, images: None,
        name: str = "model",
    ) -> None:
        self._predict = predict
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._max_queue = max_queue
        self._combine = combine  # False: one request per call (BATCHING=false)
        self._on_batch = on_batch
        self._on_drop = on_drop  # reason: shed, expired, abandoned, failed
        self._name = name
        self._pending: deque[_Request] = deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._running: list[_Request] = []
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._restarting = False
        self.restarts = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    @property
    def alive(self) -> bool:
        """Is the loop running (not dead, not restarting after a crash)?"""
        return self._task is not None and not self._task.done() and not self._restarting

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_all(NotReady("the server is shutting down"))
        self._worker.shutdown(wait=True)

    async def drain(self, timeout: float) -> None:
        """Answer what is queued or running (for at most `timeout`), then stop: how a
        version that was replaced or removed leaves without failing its requests."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._pending or self._running) and loop.time() < deadline and self.alive:
            await asyncio.sleep(0.01)
        await self.stop()

    def submit(self, images: np.ndarray, deadline: float, outputs: Sequence[str]) -> asyncio.Future:
        """Queue `images` (uint8 [N, 32, 32, 3]); the future gets their rows of `outputs`.

        Raises Overloaded at once when the queue is full: shedding early keeps the wait of
        the requests already accepted bounded."""
        if self._stopping:
            raise NotReady("the server is shutting down")
        if not self.alive:
            raise NotReady(f"the batcher of {self._name} is not running; retry shortly")
        if self._queued_images + len(images) > self._max_queue:
            self._on_drop("shed", len(images))
            raise Overloaded(
                f"{self._name} has {self._queued_images} images queued (the limit is "
                f"{self._max_queue}); retry shortly"
            )
        loop = asyncio.get_running_loop()
        request = _Request(images, loop.create_future(), deadline, loop.time(), frozenset(outputs))
        # A request given up while it waits (deadline, client gone) leaves the queue at
        # once: its images stop counting against the bound, and the drop is counted now.
        request.future.add_done_callback(lambda _, r=request: self._withdraw(r))
        self._pending.append(request)
        self._queued_images += len(images)
        self._wakeup.set()
        return request.future

    async def predict(self, images: np.ndarray, deadline: float, outputs: Sequence[str]) -> Result:
        """Submit and wait until `deadline` (loop clock); DeadlineExceeded after it."""
        future = self.submit(images, deadline, outputs)
        try:
            async with asyncio.timeout_at(deadline):
                return await future  # a timeout cancels the future: it will be skipped
        except TimeoutError:
            raise DeadlineExceeded(
                f"no answer from {self._name} before the request's deadline"
            ) from None

    async def _supervise(self) -> None:
        while True:
            try:
                await self._serve()
            except Exception as err:  # a bug in the loop itself: never leave requests hanging
                self.restarts += 1
                self._restarting = True
                log.exception("batcher crashed; restarting", extra={"model": self._name})
                self._fail_all(NotReady(f"the batcher of {self._name} failed ({err}); retry"))
                await asyncio.sleep(min(1.0, 0.05 * 2 ** min(self.restarts, 5)))
                self._restarting = False

    async def _serve(self) -> None:
        concurrent = False  # did the last batch hold more than one request?
        while True:
            idle = not self._pending
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Taken requests are out of the queue: they count as running from here on, while
            # the batch still gathers, so a drain waits for them and a stop fails them.
            batch = self._running = self._take([])
            # Waiting pays only when the model was idle and requests come in parallel: a
            # lone client would be slowed by max_wait on every request, and a queue that
            # built up while the last batch ran is taken at once, whole.
            if (
                self._combine
                and idle
                and concurrent
                and self._size(batch) < self._max_batch
                and self._max_wait > 0
            ):
                await asyncio.sleep(self._max_wait)  # let concurrent requests catch up
                self._take(batch)
            concurrent = len(batch) > 1
            if batch:
                await self._run(batch)
            self._running = []

    def _take(self, batch: list[_Request]) -> list[_Request]:
        """Move queued requests into `batch` while they fit under the cap."""
        now = asyncio.get_running_loop().time()
        while self._pending:
            request = self._pending[0]
            if request.future.done() or request.deadline <= now:  # given up while queued
                self._pending.popleft()
                self._discard(request, now)
                if not request.future.done():
                    request.future.set_exception(
                        DeadlineExceeded(f"{self._name} could not start it before its deadline")
                    )
                continue
            room = self._max_batch - self._size(batch)
            if batch and (len(request.images) > room or not self._combine):
                break  # the next call takes it
            self._pending.popleft()
            self._queued_images -= len(request.images)
            request.taken = True
            batch.append(request)
        return batch

    def _withdraw(self, request: _Request) -> None:
        """Done-callback of a queued request's future: answered early means given up."""
        if request.taken or self._stopping:
            return
        with contextlib.suppress(ValueError):  # already cleared by _fail_all
            self._pending.remove(request)
            self._discard(request, asyncio.get_running_loop().time())

    def _discard(self, request: _Request, now: float) -> None:
        request.taken = True  # out of the queue, counted once
        self._queued_images -= len(request.images)
        reason = "expired" if request.deadline <= now else "abandoned"
        self._on_drop(reason, len(request.images))

    @staticmethod
    def _size(batch: list[_Request]) -> int:
        return sum(len(request.images) for request in batch)

    async def _run(self, batch: list[_Request]) -> None:
        batch = [request for request in batch if not request.future.done()]
        if not batch:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            stacked = np.concatenate([request.images for request in batch])
            names = sorted(frozenset().union(*(request.outputs for request in batch)))
            outputs, sizes = await loop.run_in_executor(
                self._worker, self._run_capped, stacked, names
            )
        except Exception as err:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(err)
                self._on_drop("failed", len(batch[0].images))
            else:  # find the request that broke the batch; serve the others
                for request in batch:
                    await self._run([request])
            return
        seconds = loop.time() - started
        for size in sizes:
            self._on_batch(size, seconds / len(sizes))
        start = 0
        for request in batch:
            end = start + len(request.images)
            if not request.future.done():
                rows = {k: outputs[k][start:end] for k in request.outputs}
                request.future.set_result(Result(rows, started - request.queued_at, seconds))
            start = end

    def _run_capped(self, images: np.ndarray, names: list[str]) -> tuple[Outputs, list[int]]:
        """Never more than max_batch images per call, even for one large request."""
        chunks = [images[i : i + self._max_batch] for i in range(0, len(images), self._max_batch)]
        parts = [self._predict(chunk, names) for chunk in chunks]
        if len(parts) == 1:
            return parts[0], [len(images)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, list(map(len, chunks))

    def _fail_all(self, error: Exception) -> None:
        for request in [*self._running, *self._pending]:
            if not request.future.done():
                request.future.set_exception(error)
        self._pending.clear()
        self._running = []
        self._queued_images = 0
