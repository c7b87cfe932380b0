"""The micro-batcher on its own: batching, order, and one failure not failing the rest."""

import asyncio

import numpy as np
import pytest

from service.batching import MicroBatcher

POISON = 13


def fake_model(calls: list[int]):
    """Probability row = the image's first pixel, as one-hot; fails on a poisoned image."""

    def predict(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        if (images[:, 0, 0, 0] == POISON).any():
            raise ValueError("poisoned image")
        out = np.zeros((len(images), 100), np.float32)
        out[np.arange(len(images)), images[:, 0, 0, 0]] = 1
        return out

    return predict


def image(value: int, n: int = 1) -> np.ndarray:
    return np.full((n, 32, 32, 3), value, np.uint8)


async def run_requests(batcher: MicroBatcher, requests: list[np.ndarray]):
    batcher.start()
    try:
        return await asyncio.gather(*(batcher.predict(r) for r in requests), return_exceptions=True)
    finally:
        await batcher.stop()


def test_concurrent_requests_share_calls_and_get_their_own_rows():
    calls, sizes = [], []
    batcher = MicroBatcher(fake_model(calls), max_batch=8, max_wait=0.05, on_batch=sizes.append)
    requests = [image(i) for i in range(10)] + [image(50, n=3)]
    results = asyncio.run(run_requests(batcher, requests))
    for request, result in zip(requests, results, strict=True):
        assert result.shape == (len(request), 100)
        assert (result.argmax(axis=1) == request[:, 0, 0, 0]).all()
    assert sum(calls) == 13 and len(calls) < 11
    assert max(calls) <= 8 + 3  # a request's images stay together
    assert sizes == calls


def test_one_bad_request_does_not_fail_its_batch():
    calls = []
    batcher = MicroBatcher(fake_model(calls), max_batch=16, max_wait=0.05)
    results = asyncio.run(run_requests(batcher, [image(1), image(POISON), image(2)]))
    assert results[0].argmax() == 1 and results[2].argmax() == 2
    assert isinstance(results[1], ValueError)
    assert calls[0] == 3  # they were batched, then retried one by one


def test_stop_fails_pending_requests_instead_of_hanging():
    async def scenario():
        batcher = MicroBatcher(fake_model([]), max_batch=4, max_wait=0)
        pending = asyncio.ensure_future(batcher.predict(image(1)))  # never started
        await asyncio.sleep(0)
        await batcher.stop()
        with pytest.raises(RuntimeError, match="shutting down"):
            await pending

    asyncio.run(scenario())
