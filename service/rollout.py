"""Changing a model's version safely: a candidate tried beside the serving version, then
promoted or rolled back, all while serving.

Per model there is at most one plan: the version that serves it (pinned in the catalog, so
a newer file dropped into MODELS_DIR does not take over by itself) and, optionally, a
candidate version with a mode and a share:

- shadow: that share of the requests answered by the serving version is copied to the
  candidate after the answer is computed (service/shadow.py compares the two answers);
  the caller only ever sees the serving version's answer;
- canary: that share of the requests is answered by the candidate. Who gets it is decided
  by hashing the caller's `X-Rollout-Key` (else its API key) with the candidate's version,
  so one caller stays on one side for the whole canary; a caller with neither is drawn at
  random per request.

Promote makes the candidate the pinned serving version; roll back drops the candidate and
keeps the serving version pinned. Only a version the catalog loaded can be a candidate: a
file whose self-check or signature failed never is, so it cannot be shadowed, canaried or
promoted (RolloutConflict, 409). A request that names a version is answered by it, plan
or not.

The plans live in one JSON file (ROLLOUT_FILE, default MODELS_DIR/rollout.json), read at
startup and on every reload, so an operator may edit it instead of calling the admin
routes; the routes write it, so every worker (each reloads on MODEL_POLL_SECONDS) and the
next start see the same plans. Every change is one structured log line and an entry in
the model's history.
"""

import hashlib
import json
import logging
import os
import random
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from service.catalog import Catalog, Served
from service.context import RequestContext
from service.errors import BadParameter, RolloutConflict, UnknownModel, quoted

log = logging.getLogger(__name__)
Mode = Literal["shadow", "canary"]
MODES: tuple[str, ...] = ("shadow", "canary")
HISTORY = 50  # changes kept per model for GET .../rollout


@dataclass(frozen=True)
class Plan:
    serving: str  # the version that answers requests naming none (pinned)
    candidate: str | None = None
    mode: Mode | None = None  # set exactly when candidate is
    share: float = 0.0  # of requests shadowed, or answered by the candidate

    def describe(self) -> dict:
        return asdict(self)


class Rollouts:
    """Every model's plan, applied to the catalog, and the file that holds them."""

    def __init__(self, catalog: Catalog, path: Path) -> None:
        self.catalog, self.path = catalog, path
        self.plans: dict[str, Plan] = {}
        self.history: dict[str, deque[dict]] = {}
        self._seen: tuple[int, int] | None = None  # the file's (size, mtime) last read
        self.written: bool | None = None  # whether the last change by a route reached the file
        self._random = random.Random()

    # --- the request path ---------------------------------------------------------------

    def choose(self, model_id: str | None, context: RequestContext) -> str | None:
        """The version a request naming none goes to: the candidate for a canary's share
        of callers, else None (the catalog's default, which the plan pins)."""
        model_id = model_id or self.catalog.default_id or ""
        plan = self.plans.get(model_id)
        if plan is None or plan.mode != "canary" or not plan.share:
            return None
        if plan.candidate not in self.catalog.models.get(model_id, {}):
            return None  # unloaded by a reload that has not yet dropped it from the plan
        key = context.rollout_key or context.credentials
        if key:  # sticky: the same caller lands on the same side for this candidate
            digest = hashlib.sha256(f"{plan.candidate}\0{key}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64
        else:
            point = self._random.random()
        return plan.candidate if point < plan.share else None

    def shadowing(self, served: Served) -> Plan | None:
        """The plan whose candidate shadows this version's answers, if any."""
        plan = self.plans.get(served.model_id)
        if plan is None or plan.mode != "shadow" or plan.serving != served.version:
            return None
        return plan

    # --- changes ------------------------------------------------------------------------

    def describe(self, model_id: str) -> dict:
        versions = self._versions(model_id)
        plan = self.plans.get(model_id)
        return {
            "model_id": model_id,
            "serving": self.catalog.default_version_of(model_id),
            "pinned": plan is not None,
            "candidate": plan.candidate if plan else None,
            "mode": plan.mode if plan else None,
            "share": plan.share if plan else 0.0,
            "versions": sorted(versions),
            "file": str(self.path),
            "written": self.written,
            "history": list(self.history.get(model_id, ())),
        }

    def start(
        self, model_id: str, candidate: str, mode: str, share: float,
        serving: str | None = None, by: str = "api",
    ) -> Plan:  # fmt: skip
        """Try `candidate` beside the serving version (`serving`, else the one answering
        now) in `mode` for `share` of the requests."""
        versions = self._versions(model_id)
        if mode not in MODES:
            raise BadParameter(f"mode must be one of {', '.join(MODES)}, not {quoted(mode)}")
        if not 0 <= share <= 1:
            raise BadParameter(f"share must be from 0 to 1, not {share}")
        self._loaded(model_id, candidate, versions, "a candidate")
        current = self.plans.get(model_id)
        if serving is None:
            serving = current.serving if current else self.catalog.default_version_of(model_id)
        self._loaded(model_id, serving, versions, "the serving version")
        if candidate == serving:
            raise RolloutConflict(
                f"{model_id} {candidate} is the serving version; a candidate must be another "
                "loaded version (name `serving` to keep an older one serving)"
            )
        plan = Plan(serving, candidate, mode, share)  # type: ignore[arg-type]
        return self._apply(model_id, plan, f"{mode} started", by)

    def promote(self, model_id: str, by: str = "api") -> Plan:
        """The candidate becomes the serving version; the old one stays loaded, unpinned."""
        plan = self._tried(model_id, "promote")
        self._loaded(model_id, plan.candidate, self._versions(model_id), "the candidate")
        return self._apply(model_id, Plan(plan.candidate or ""), "promoted", by)

    def rollback(self, model_id: str, by: str = "api") -> Plan:
        """The candidate is dropped; the serving version stays pinned."""
        plan = self._tried(model_id, "roll back")
        return self._apply(model_id, Plan(plan.serving), "rolled back", by)

    # --- the file -------------------------------------------------------------------------

    def reload(self) -> None:
        """Read the file again if it changed (the catalog calls this after every sync),
        and drop what the catalog no longer holds."""
        try:
            st = self.path.stat()
            seen = (st.st_size, st.st_mtime_ns)
        except OSError:
            seen = None
        if seen != self._seen:
            self._seen = seen
            self._read()
        for model_id, plan in list(self.plans.items()):
            versions = self.catalog.models.get(model_id, {})
            if plan.serving not in versions:
                self._apply(model_id, None, "serving version unloaded", "reload", save=False)
            elif plan.candidate is not None and plan.candidate not in versions:
                self._apply(model_id, Plan(plan.serving), "candidate unloaded", "reload",
                            save=False)  # fmt: skip

    def _read(self) -> None:
        try:
            wanted = json.loads(self.path.read_text()).get("models", {}) if self._seen else {}
            if not isinstance(wanted, dict):
                raise ValueError('"models" must be an object of model id -> plan')
        except (OSError, ValueError, AttributeError) as err:
            log.error("rollout file not read; rollouts unchanged",
                      extra={"file": str(self.path), "reason": str(err)})  # fmt: skip
            return
        for model_id in [m for m in self.plans if m not in wanted]:
            self._apply(model_id, None, "removed from the file", "file", save=False)
        for model_id, entry in wanted.items():
            try:
                plan = _plan_of(entry)
                if plan == self.plans.get(model_id):
                    continue
                versions = self._versions(model_id)
                for version, what in ((plan.serving, "the serving version"),
                                      (plan.candidate, "a candidate")):  # fmt: skip
                    if version is not None:
                        self._loaded(model_id, version, versions, what)
            except (UnknownModel, RolloutConflict, BadParameter, TypeError, ValueError) as err:
                message = getattr(err, "message", str(err))
                log.error("rollout not applied", extra={"model": model_id, "reason": message,
                                                        "file": str(self.path)})  # fmt: skip
                continue
            what = f"{plan.mode} started" if plan.mode else "pinned"
            self._apply(model_id, plan, what, "file", save=False)

    def _save(self) -> bool:
        """Write every plan to the file, whole (to a temporary name, then renamed)."""
        body = {"models": {m: p.describe() for m, p in sorted(self.plans.items())}}
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        try:
            temporary.write_text(json.dumps(body, indent=2) + "\n")
            os.replace(temporary, self.path)
            st = self.path.stat()
        except OSError as err:  # a read-only models folder: this worker still applies it
            log.warning("rollout file not written: the change holds in this worker only",
                        extra={"file": str(self.path), "reason": str(err)})  # fmt: skip
            return False
        self._seen = (st.st_size, st.st_mtime_ns)  # our own write: nothing to read back
        return True

    # --- one place where plans change -----------------------------------------------------

    def _apply(
        self, model_id: str, plan: Plan | None, what: str, by: str, save: bool = True
    ) -> Plan:
        before = self.plans.get(model_id)
        if plan is None:
            self.plans.pop(model_id, None)
            self.catalog.pinned.pop(model_id, None)
        else:
            self.plans[model_id] = plan
            self.catalog.pinned[model_id] = plan.serving
        saved = self._save() if save else None
        if save:
            self.written = saved
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "change": what, "by": by, "model": model_id,
            "before": before.describe() if before else None,
            "after": plan.describe() if plan else None,
        }  # fmt: skip
        self.history.setdefault(model_id, deque(maxlen=HISTORY)).append(event)
        log.info("rollout changed", extra={**event, "saved": saved})
        return plan if plan is not None else Plan("")

    def _versions(self, model_id: str) -> dict[str, Served]:
        self.catalog.get(model_id)  # NotReady or UnknownModel, with the catalog's message
        return self.catalog.models[model_id]

    def _tried(self, model_id: str, verb: str) -> Plan:
        self._versions(model_id)
        plan = self.plans.get(model_id)
        if plan is None or plan.candidate is None:
            raise RolloutConflict(f"{model_id} has no candidate to {verb}")
        return plan

    def _loaded(self, model_id: str, version: str | None, versions: dict, what: str) -> None:
        if version in versions:
            return
        failed = "; ".join(f"{name}: {why}" for name, why in self.catalog.failures.items())
        raise RolloutConflict(
            f"{what} must be a loaded version of {model_id}, and {quoted(str(version))} is not "
            f"(loaded: {', '.join(sorted(versions))}). A file that failed its self-check or "
            f"signature is never loaded{f' (failed: {failed})' if failed else ''}"
        )


def _plan_of(entry: object) -> Plan:
    """One model's entry of the file, checked."""
    if not isinstance(entry, dict) or not isinstance(entry.get("serving"), str):
        raise ValueError('each model needs at least {"serving": "<version>"}')
    plan = Plan(entry["serving"], entry.get("candidate"), entry.get("mode"),
                float(entry.get("share") or 0.0))  # fmt: skip
    if (plan.candidate is None) != (plan.mode is None):
        raise ValueError("candidate and mode go together")
    if plan.mode is not None and plan.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    if not 0 <= plan.share <= 1:
        raise ValueError("share must be from 0 to 1")
    return plan


def rollouts_for(catalog: Catalog, path: Path) -> Rollouts:
    """The rollouts of `catalog`, read from `path` now and after each of its syncs."""
    rollouts = Rollouts(catalog, path)
    rollouts.reload()
    catalog.on_sync = rollouts.reload
    return rollouts
