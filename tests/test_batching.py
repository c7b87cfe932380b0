"""The micro-batcher on its own: batching, order, bounds, deadlines, and failures that
never leave a request hanging."""

import asyncio
import threading

import numpy as np
import pytest

from service.batching import MicroBatcher
from service.errors import DeadlineExceeded, NotReady, Overloaded, status_of

POISON = 13
BOTH = ("probabilities", "features")


def fake_model(calls: list[int], asked: list[list[str]] | None = None):
    """Probability row = the image's first pixel, as one-hot; fails on a poisoned image.
    Returns only the outputs asked for, and notes them in `asked`."""
    asked = [] if asked is None else asked

    def predict(images: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        calls.append(len(images))
        asked.append(list(names))
        if (images[:, 0, 0, 0] == POISON).any():
            raise ValueError("poisoned image")
        out = np.zeros((len(images), 100), np.float32)
        out[np.arange(len(images)), images[:, 0, 0, 0]] = 1
        every = {"probabilities": out, "features": images[:, 0, 0, :].astype(np.float32)}
        return {name: every[name] for name in names}

    return predict


def image(value: int, n: int = 1) -> np.ndarray:
    return np.full((n, 32, 32, 3), value, np.uint8)


def batcher_of(predict, **options) -> MicroBatcher:
    defaults = {"max_batch": 8, "max_wait": 0.05, "max_queue": 1000}
    return MicroBatcher(predict, **(defaults | options))


async def run_requests(batcher: MicroBatcher, requests: list[np.ndarray], timeout: float = 30):
    batcher.start()
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        return await asyncio.gather(
            *(batcher.predict(r, deadline, BOTH) for r in requests), return_exceptions=True
        )
    finally:
        await batcher.stop()


def test_concurrent_requests_share_calls_and_get_their_own_rows():
    calls, sizes = [], []
    batcher = batcher_of(fake_model(calls), on_batch=lambda size, seconds: sizes.append(size))
    requests = [image(i) for i in range(10)] + [image(50, n=3)]
    results = asyncio.run(run_requests(batcher, requests))
    for request, result in zip(requests, results, strict=True):
        outputs = result.outputs
        assert outputs["probabilities"].shape == (len(request), 100)
        assert (outputs["probabilities"].argmax(axis=1) == request[:, 0, 0, 0]).all()
        assert (outputs["features"][:, 0] == request[:, 0, 0, 0]).all()  # every output split
        assert result.queue_seconds >= 0 and result.inference_seconds > 0
    assert sum(calls) == 13 and len(calls) < 11
    assert sizes == calls


def test_a_batch_fetches_the_outputs_its_requests_want_and_each_gets_only_its_own():
    calls, asked = [], []
    batcher = batcher_of(fake_model(calls, asked))

    async def scenario():
        batcher.start()
        deadline = asyncio.get_running_loop().time() + 30
        try:
            return await asyncio.gather(
                batcher.predict(image(1), deadline, ["probabilities"]),
                batcher.predict(image(2), deadline, ["probabilities"]),
            ), await asyncio.gather(
                batcher.predict(image(3), deadline, ["probabilities"]),
                batcher.predict(image(4), deadline, ["features"]),
            )
        finally:
            await batcher.stop()

    only_probabilities, mixed = asyncio.run(scenario())
    assert asked == [["probabilities"], ["features", "probabilities"]]  # one call each
    assert [set(r.outputs) for r in only_probabilities] == [{"probabilities"}] * 2
    assert [set(r.outputs) for r in mixed] == [{"probabilities"}, {"features"}]
    assert mixed[1].outputs["features"][0, 0] == 4


def test_batch_max_size_is_a_hard_cap_on_every_call():
    """A request that does not fit joins the next call; one above the cap runs in slices."""
    calls = []
    batcher = batcher_of(fake_model(calls), max_batch=8)
    requests = [image(1, n=5), image(2, n=5), image(3, n=3), image(4, n=20), image(5, n=8)]
    results = asyncio.run(run_requests(batcher, requests))
    assert max(calls) == 8  # exactly the cap, never above it
    assert sum(calls) == 41
    for request, result in zip(requests, results, strict=True):
        assert (result.outputs["probabilities"].argmax(axis=1) == request[:, 0, 0, 0]).all()


def test_one_bad_request_does_not_fail_its_batch():
    calls, drops = [], []
    batcher = batcher_of(fake_model(calls), max_batch=16, on_drop=lambda *d: drops.append(d))
    results = asyncio.run(run_requests(batcher, [image(1), image(POISON), image(2)]))
    assert results[0].outputs["probabilities"].argmax() == 1
    assert results[2].outputs["probabilities"].argmax() == 2
    assert isinstance(results[1], ValueError)
    assert calls[0] == 3  # they were batched, then retried one by one
    assert drops == [("failed", 1)]


def test_a_full_queue_sheds_at_once():
    async def scenario():
        drops = []
        batcher = batcher_of(fake_model([]), max_queue=4, on_drop=lambda *d: drops.append(d))
        batcher.start()
        deadline = asyncio.get_running_loop().time() + 30
        accepted = [batcher.submit(image(1, n=2), deadline, BOTH) for _ in range(2)]
        with pytest.raises(Overloaded, match="4 images queued") as shed:
            batcher.submit(image(1), deadline, BOTH)
        assert status_of(shed.value).headers == {"Retry-After": "1"}
        assert [len((await f).outputs["probabilities"]) for f in accepted] == [2, 2]
        assert drops == [("shed", 1)]
        batcher.submit(image(1), deadline, BOTH)  # room again once the queue drained
        await batcher.stop()

    asyncio.run(scenario())


def test_expired_requests_are_answered_504_and_never_computed():
    async def scenario():
        calls, drops = [], []
        batcher = batcher_of(fake_model(calls), on_drop=lambda *d: drops.append(d))
        loop = asyncio.get_running_loop()
        batcher.start()
        # Queued with a deadline already past: dropped before it is computed.
        late = batcher.submit(image(7), loop.time() - 1, BOTH)
        on_time = batcher.submit(image(8), loop.time() + 30, BOTH)
        with pytest.raises(DeadlineExceeded):
            await late
        assert (await on_time).outputs["probabilities"].argmax() == 8
        assert calls == [1] and drops == [("expired", 1)]
        # Waiting past the deadline: predict gives up with 504 at the deadline.
        with pytest.raises(DeadlineExceeded):
            await batcher.predict(image(9), loop.time(), BOTH)
        await batcher.stop()

    asyncio.run(scenario())


def test_abandoned_requests_are_skipped_and_counted():
    async def scenario():
        calls, drops = [], []
        batcher = batcher_of(fake_model(calls), max_wait=0, on_drop=lambda *d: drops.append(d))
        loop = asyncio.get_running_loop()
        batcher.start()
        gone = batcher.submit(image(3), loop.time() + 30, BOTH)
        gone.cancel()  # what the route does when its client disconnects
        kept = batcher.submit(image(4), loop.time() + 30, BOTH)
        assert (await kept).outputs["probabilities"].argmax() == 4
        assert calls == [1] and drops == [("abandoned", 1)]
        await batcher.stop()

    asyncio.run(scenario())


def test_a_crashed_loop_fails_pending_requests_and_restarts():
    """An error escaping the loop (here: the batch-size callback) must not leave requests
    waiting forever: they get 503, the loop restarts, and later requests are served."""

    async def scenario():
        crashes = [1]

        def on_batch(size, seconds):
            if crashes:
                crashes.pop()
                raise RuntimeError("metrics backend broke")

        batcher = batcher_of(fake_model([]), max_wait=0, on_batch=on_batch)
        loop = asyncio.get_running_loop()
        batcher.start()
        with pytest.raises(NotReady, match="failed"):
            await batcher.predict(image(1), loop.time() + 30, BOTH)
        assert batcher.restarts == 1
        async with asyncio.timeout(10):
            while not batcher.alive:  # restarting after a short backoff
                with pytest.raises(NotReady, match="not running"):
                    batcher.submit(image(1), loop.time() + 30, BOTH)
                await asyncio.sleep(0.01)
        result = await batcher.predict(image(2), loop.time() + 30, BOTH)
        assert result.outputs["probabilities"].argmax() == 2
        await batcher.stop()

    asyncio.run(scenario())


def test_stop_fails_pending_requests_instead_of_hanging():
    async def scenario():
        batcher = batcher_of(fake_model([]), max_wait=0)
        batcher.start()
        pending = batcher.submit(image(1), asyncio.get_running_loop().time() + 30, BOTH)
        await batcher.stop()  # before the loop ever ran
        with pytest.raises(NotReady, match="shutting down"):
            await pending
        with pytest.raises(NotReady, match="shutting down"):
            batcher.submit(image(1), asyncio.get_running_loop().time() + 30, BOTH)

    asyncio.run(scenario())


def test_batching_off_runs_one_request_per_call():
    calls = []
    batcher = batcher_of(fake_model(calls), combine=False)
    asyncio.run(run_requests(batcher, [image(i, n=2) for i in range(5)]))
    assert calls == [2] * 5


async def until(condition, timeout: float = 10) -> None:
    """Yield to the event loop until `condition()` holds (the batcher's own state)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


async def batch_still_gathering(max_wait: float) -> tuple[MicroBatcher, list, asyncio.Future]:
    """A request taken from the queue into a batch that waits `max_wait` for company
    (the loop waits only after a batch of several: concurrent load)."""
    calls = []
    batcher = batcher_of(fake_model(calls), max_wait=max_wait)
    batcher.start()
    deadline = asyncio.get_running_loop().time() + 30
    await asyncio.gather(*(batcher.predict(image(i), deadline, BOTH) for i in (1, 2)))
    assert calls == [2]  # one batch of two: the next one will wait for company
    gathering = asyncio.ensure_future(batcher.predict(image(3), deadline, BOTH))
    # Gathering: out of the queue, held in the batch being formed, and not computed (the
    # batcher has no public view of this; its private state is the condition itself).
    await until(lambda: batcher._running and not batcher._pending)
    assert calls == [2] and not gathering.done()
    return batcher, calls, gathering


def test_drain_answers_a_batch_still_gathering():
    """A drain (a replaced version leaving) that comes while a batch gathers must answer
    it, not cancel the loop and leave its requests waiting for their deadline (the one
    504 once seen in the hot-reload test)."""

    async def scenario():
        batcher, calls, gathering = await batch_still_gathering(max_wait=0.5)
        await batcher.drain(timeout=10)
        result = await asyncio.wait_for(gathering, timeout=1)
        assert result.outputs["probabilities"].argmax() == 3
        assert calls == [2, 1]  # computed by the drain, not failed

    asyncio.run(scenario())


def test_stop_fails_a_batch_still_gathering_instead_of_hanging():
    async def scenario():
        batcher, calls, gathering = await batch_still_gathering(max_wait=0.5)
        await batcher.stop()
        with pytest.raises(NotReady, match="shutting down"):
            await asyncio.wait_for(gathering, timeout=1)
        assert calls == [2]  # never computed

    asyncio.run(scenario())


def test_a_queue_that_built_up_during_a_batch_is_taken_at_once():
    """Under load, the next batch starts with what queued while the last one ran, whole,
    without waiting max_wait for more (a wait of 60 s here would hit the test's timeout);
    it waits only when the model was idle."""
    calls: list[int] = []
    release = threading.Event()
    model = fake_model(calls)

    def slow(images, names):
        release.wait(30)
        return model(images, names)

    async def scenario():
        batcher = batcher_of(slow, max_wait=60)
        batcher.start()
        deadline = asyncio.get_running_loop().time() + 120

        # A first batch of two (concurrent load: the old loop would now wait max_wait).
        def ask(i: int) -> asyncio.Future:
            return asyncio.ensure_future(batcher.predict(image(i), deadline, BOTH))

        first = [ask(1), ask(2)]
        await until(lambda: calls == [] and len(batcher._running) == 2)
        later = [
            asyncio.ensure_future(batcher.predict(image(i), deadline, BOTH)) for i in (3, 4, 5)
        ]
        await until(lambda: len(batcher._pending) == 3)
        release.set()
        await asyncio.wait_for(asyncio.gather(*first, *later), timeout=20)
        assert calls == [2, 3]  # the three queued ones in one call, straight after
        await batcher.stop()

    asyncio.run(scenario())
