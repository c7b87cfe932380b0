"""Shadowing: a candidate version answers copies of live requests, after the fact, and
its answers are compared with the serving version's.

The data plane offers each answered request that named no version (`Shadows.offer`,
after the live answer is computed, before it is sent); a share of them (the plan's, see
service/rollout.py) is queued for one worker task. Shadow work is the lowest priority
there is: the caller never waits for it and never sees it fail. A copy is dropped
(counted, by reason) rather than queued when the queue holds SHADOW_QUEUE_IMAGES images
already, or when the door is refusing live requests (service/admission.py); the worker
asks the door again before it hands a copy over. One copy is computed at a time, on the
candidate's own batcher, which in shadow mode takes no live request: shadow work never
holds a place ahead of a live one.

Per image it records both versions' top class, whether they agree, each one's
familiarity and each one's time (Prometheus: service/metrics.py, `shadow_*`), and, with
the payload log on, one row per sampled image carrying both answers.
"""

import asyncio
import contextlib
import logging
import random
import time
from typing import NamedTuple

import numpy as np

from contract.errors import ContractError
from contract.modelcard import FAMILIARITY_NAME, OUTPUT_NAME
from service.admission import Admission
from service.batching import Outputs
from service.catalog import Catalog, Served
from service.config import Settings
from service.context import RequestContext
from service.metrics import Metrics, ShadowMetrics
from service.payloads import CandidateAnswer, PayloadLog
from service.rollout import Plan, Rollouts

log = logging.getLogger(__name__)
LOG_EVERY_SECONDS = 10.0  # at most one warning this often about a failing candidate


class Copy(NamedTuple):
    """One shadowed request: what the serving version was given and answered."""

    context: RequestContext
    served: Served
    plan: Plan
    images: np.ndarray
    outputs: Outputs
    latency_ms: float
    metrics: ShadowMetrics


class Shadows:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        catalog: Catalog,
        rollouts: Rollouts,
        admission: Admission,
        payloads: PayloadLog | None,
    ) -> None:
        self.settings, self.metrics, self.catalog = settings, metrics, catalog
        self.rollouts, self.admission, self.payloads = rollouts, admission, payloads
        self.max_images = settings.shadow_queue_images
        self.queued = 0  # images on the queue or being computed
        self._queue: asyncio.Queue[Copy] = asyncio.Queue()
        self._random = random.Random()
        self._task: asyncio.Task | None = None
        self._warned_at = 0.0

    # --- the request path: decide, never wait -------------------------------------------

    def offer(
        self,
        context: RequestContext,
        served: Served,
        images: np.ndarray,
        outputs: Outputs,
        latency_ms: float,
    ) -> bool:
        """Queue a copy of this answered request for the candidate shadowing `served`, if
        any, for the plan's share; True when queued (the worker then logs its payload)."""
        plan = self.rollouts.shadowing(served)
        if plan is None or plan.candidate is None or self._random.random() >= plan.share:
            return False
        bound = self.metrics.for_shadow(served.model_id, served.version, plan.candidate)
        count = len(images)
        if self.queued + count > self.max_images:
            bound.shed["queue_full"].inc(count)
            return False
        if self.admission.admit() is not None:  # live requests are being refused now
            bound.shed["busy"].inc(count)
            return False
        self.queued += count
        copy = Copy(context, served, plan, images, outputs, latency_ms, bound)
        self._queue.put_nowait(copy)
        return True

    # --- the worker ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="shadow-worker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            copy = await self._queue.get()
            try:
                await self._compare(copy)
            except Exception:  # one copy must not end shadowing
                log.exception("shadow comparison failed")
            finally:
                self.queued -= len(copy.images)

    async def _compare(self, copy: Copy) -> None:
        count, bound, candidate_version = len(copy.images), copy.metrics, copy.plan.candidate
        if self.admission.admit() is not None:  # still the lowest priority when its turn came
            bound.shed["busy"].inc(count)
            self._log_payload(copy, None)
            return
        loop = asyncio.get_running_loop()
        start, started = loop.time(), time.perf_counter()  # (uvloop's clock ticks in ms)
        try:
            candidate = self.catalog.get(copy.served.model_id, candidate_version)
            fetch = [OUTPUT_NAME]
            if FAMILIARITY_NAME in candidate.model.output_widths:
                fetch.append(FAMILIARITY_NAME)
            deadline = start + self.settings.request_timeout_seconds
            result = await candidate.batcher.predict(copy.images, deadline, sorted(fetch))
        except Exception as err:  # unloaded, shed by its own queue, its deadline, failed
            bound.errors.inc(count)
            self._warn(copy, err.message if isinstance(err, ContractError) else repr(err))
            self._log_payload(copy, None)
            return
        seconds = time.perf_counter() - started
        bound.candidate_seconds.observe(seconds)
        live, theirs = copy.outputs, result.outputs
        agreed = live[OUTPUT_NAME].argmax(axis=1) == theirs[OUTPUT_NAME].argmax(axis=1)
        bound.compared.inc(count)
        bound.agreed.inc(int(agreed.sum()))
        familiarity = theirs[FAMILIARITY_NAME][:, 0] if FAMILIARITY_NAME in theirs else None
        if familiarity is not None and FAMILIARITY_NAME in live:
            for shift in (familiarity - live[FAMILIARITY_NAME][:, 0]).tolist():
                bound.familiarity_shift.observe(shift)
        answer = CandidateAnswer(candidate_version or "", theirs[OUTPUT_NAME], familiarity,
                                 round(seconds * 1000, 3))  # fmt: skip
        self._log_payload(copy, answer)

    def _log_payload(self, copy: Copy, answer: CandidateAnswer | None) -> None:
        # The data plane left a shadowed request's payload to us: log it either way.
        if self.payloads is not None:
            self.payloads.offer(copy.context, copy.served, copy.images, copy.outputs,
                                copy.latency_ms, answer)  # fmt: skip

    def _warn(self, copy: Copy, reason: str) -> None:
        if (now := time.monotonic()) - self._warned_at >= LOG_EVERY_SECONDS:
            self._warned_at = now
            log.warning("shadow candidate failed", extra={
                "model": copy.served.model_id, "version": copy.served.version,
                "candidate": copy.plan.candidate, "reason": reason,
            })  # fmt: skip
