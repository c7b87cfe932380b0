"""The models this server holds: every *.onnx in MODELS_DIR, loaded and warmed up.

Each file is one version of a model: its version is a short hash of its content, so the
weights that answered a request are known whatever the file is called. Two files with
the same model id are two versions of one model; the newest by the training date in
its card is the default. Every file present is kept loaded (memory grows with the
number of files: remove old ones to unload them).

A file that cannot be served is reported by name with a short reason (the detail goes
to the log) and skipped; the others still load. That includes a file that does not give,
on this machine, the outputs its self-check promises (contract/selfcheck.py). Only regular
files are opened, each within a time limit, so a FIFO or a hung network mount cannot stall
startup.

With MODEL_POLL_SECONDS set, `watch` reloads while serving: files added, replaced (by
rename) or removed are loaded, swapped or unloaded. A request holds the version it
started on until it is answered; a broken new file is reported and the version it was
meant to replace keeps serving.

With TRUSTED_KEYS set, a file is served only if its signature bundle verifies for the bytes
loaded (contract/trust.py); one that does not is reported like any broken file. A bundle
added or replaced beside a file counts as a change to that file.

Each version's micro-batcher is made here; service/dataplane.py hands requests to it.
"""

import asyncio
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from contract.classifier import Classifier
from contract.trust import TrustedKeys, bundle_path
from service.batching import MicroBatcher
from service.config import Settings
from service.errors import DeviceUnavailable, InvalidModel, NotReady, UnknownModel, quoted
from service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Served:
    """One loaded file and the batcher in front of its session."""

    model: Classifier
    batcher: MicroBatcher

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def ready(self) -> bool:
        return self.model.ready and self.batcher.alive


@dataclass
class Catalog:
    settings: Settings
    metrics: Metrics
    models: dict[str, dict[str, Served]] = field(default_factory=dict)  # id -> version ->
    failures: dict[str, str] = field(default_factory=dict)  # file name -> why not served
    default_id: str | None = None
    # Told of every batch any model runs (the admission's measure of the service rate).
    on_batch: Callable[[int, float], None] = lambda size, seconds: None
    trusted: TrustedKeys | None = None  # TRUSTED_KEYS, read once at startup
    # model id -> the version that serves it whatever else is loaded (service/rollout.py
    # pins it while a candidate is tried, and after a promotion or a rollback)
    pinned: dict[str, str] = field(default_factory=dict)
    # Told after every sync (the rollouts read their file again then).
    on_sync: Callable[[], None] = lambda: None
    # file name -> (size, mtime, inode) of it and of its bundle, and what it serves, to see
    # what changed on disk
    _files: dict[str, tuple[tuple[int, ...], Served | None]] = field(default_factory=dict)

    def get(self, model_id: str | None, version: str | None = None) -> Served:
        """The model asked for (or the default one), at the version asked for (or its
        default version)."""
        if not self.models:
            raise NotReady(self.not_ready_reason())
        model_id = model_id or self.default_id
        if model_id not in self.models:
            raise UnknownModel(
                f"unknown model {quoted(model_id)}; available: {', '.join(sorted(self.models))}"
            )
        versions = self.models[model_id]
        if version is None:
            return versions[self.default_version_of(model_id)]
        if version not in versions:
            raise UnknownModel(
                f"model {model_id!r} has no version {quoted(version)}; it has "
                f"{', '.join(sorted(versions))}"
            )
        return versions[version]

    def served(self) -> list[Served]:
        return [s for versions in self.models.values() for s in versions.values()]

    def default_version_of(self, model_id: str) -> str:
        """The version that answers a request naming none: the pinned one while it is
        loaded, else the newest trained."""
        versions = self.models[model_id]
        pinned = self.pinned.get(model_id)
        return pinned if pinned in versions else default_version(versions)

    def is_default(self, served: Served) -> bool:
        return (served.model_id == self.default_id
                and self.default_version_of(served.model_id) == served.version)  # fmt: skip

    @property
    def ready(self) -> bool:
        return any(served.ready for served in self.served())

    def not_ready_reason(self) -> str:
        if self.models:
            return "no model can take requests: " + ", ".join(
                f"the batcher of {s.model_id} {s.version} is not running"
                for s in self.served()
                if not s.batcher.alive
            )
        if self.failures:
            problems = "; ".join(f"{name}: {why}" for name, why in self.failures.items())
            return f"no model could be loaded ({problems})"
        return "no model loaded: no .onnx files found; run `make train-export` first"

    async def sync(self) -> None:
        """Bring what is served in line with MODELS_DIR: load what is new or changed,
        unload what is gone. Startup is the first sync."""
        on_disk = {
            path.name: path for path in sorted(Path(self.settings.models_dir).glob("*.onnx"))
        }
        gone = [name for name in self._files if name not in on_disk]
        for name in gone:
            _, served = self._files.pop(name)
            self.failures.pop(name, None)
            if served is not None:
                await self._unload(served, f"{name} was removed")
        changed = bool(gone)
        for name, path in on_disk.items():
            signature = _signature(path)
            known = self._files.get(name)
            if known is not None and known[0] == signature:
                continue
            changed = True
            replaced = known[1] if known is not None else None
            served = await self._load(path)
            if served is None:  # broken: what it was meant to replace keeps serving
                self._files[name] = (signature, replaced)
                continue
            self.failures.pop(name, None)
            self._files[name] = (signature, served)
            if replaced is not None and replaced.version != served.version:
                await self._unload(replaced, f"{name} was replaced")
        if changed:  # a poll that found nothing new costs a glob and a stat per file
            self._choose_default()
        self.on_sync()

    async def watch(self) -> None:
        """Poll MODELS_DIR every MODEL_POLL_SECONDS (the lifespan runs this as a task)."""
        while True:
            await asyncio.sleep(self.settings.model_poll_seconds)
            try:
                await self.sync()
            except Exception:  # keep watching: one bad pass must not end reloading
                log.exception("reloading models failed")

    async def stop(self) -> None:
        for served in self.served():
            await served.batcher.stop()

    async def _load(self, path: Path) -> Served | None:
        settings = self.settings
        try:
            model = await asyncio.wait_for(
                asyncio.to_thread(_open, path, settings, self.trusted),
                settings.model_load_timeout_seconds,
            )
        except TimeoutError:
            # The thread cannot be stopped; it is left to finish or hang on its own.
            self._skip(path, f"it took over {settings.model_load_timeout_seconds:g} s to load")
            return None
        except InvalidModel as err:
            self._skip(path, err.message.removeprefix(f"{path.name}: "), err.__cause__)
            return None
        except DeviceUnavailable:
            raise  # DEVICE=cuda without CUDA: the whole server must not start
        except Exception as err:  # anything else one file does must not stop the others
            self._skip(path, f"it cannot be loaded ({type(err).__name__})", err)
            return None
        existing = self.models.get(model.model_id, {}).get(model.version)
        if existing is not None:
            if existing.model.path.name == path.name:
                return existing  # touched, or rewritten with the same bytes
            other = existing.model.path.name
            self._skip(path, f"the same file as {other} (version {model.version})")
            return None
        served = Served(model, self._batcher(model))
        self.models.setdefault(model.model_id, {})[model.version] = served
        self.metrics.loaded.labels(model.model_id, model.version).set(1)
        self.metrics.served_by(model.model_id, model.version, model.serving)
        log.info(
            "model loaded",
            extra={
                "model": model.model_id,
                "version": model.version,
                "file": path.name,
                **model.serving,
                "self_check_seconds": round(model.self_check_seconds or 0.0, 4),
            },
        )
        return served

    async def _unload(self, served: Served, why: str) -> None:
        versions = self.models.get(served.model_id, {})
        if versions.get(served.version) is served:
            del versions[served.version]
        if not versions:
            self.models.pop(served.model_id, None)
        self.metrics.loaded.labels(served.model_id, served.version).set(0)
        self.metrics.served_by(served.model_id, served.version, served.model.serving, 0)
        log.info("model unloaded", extra={"model": served.model_id, "version": served.version,
                                          "reason": why})  # fmt: skip
        # Requests already queued on it are answered before its batcher stops.
        await served.batcher.drain(self.settings.request_timeout_seconds)

    def _batcher(self, model: Classifier) -> MicroBatcher:
        settings, metrics = self.settings, self.metrics
        labels = (model.model_id, model.version)

        def on_batch(size: int, seconds: float) -> None:
            metrics.batch_size.labels(*labels).observe(size)
            metrics.inference_seconds.labels(*labels).observe(seconds)
            self.on_batch(size, seconds)

        batcher = MicroBatcher(
            model.run,
            max_batch=settings.batch_max_size,
            max_wait=settings.batch_max_wait_ms / 1000,
            max_queue=settings.max_queue_images,
            combine=settings.batching,
            on_batch=on_batch,
            on_drop=lambda reason, images: metrics.dropped.labels(*labels, reason).inc(images),
            name=f"{model.model_id} {model.version}",
        )
        batcher.start()
        return batcher

    def _choose_default(self) -> None:
        wanted = self.settings.default_model
        if wanted in self.models:
            self.default_id = wanted
            return
        if wanted:
            log.warning("DEFAULT_MODEL is not loaded", extra={"model": wanted})
        largest = max(
            (self.get(model_id).model for model_id in self.models),
            key=lambda m: m.card.parameter_count,
            default=None,
        )
        self.default_id = largest.model_id if largest is not None else None

    def _skip(self, path: Path, reason: str, cause: BaseException | None = None) -> None:
        log.error("model not served", extra={"file": str(path), "reason": reason,
                                              "cause": str(cause)})  # fmt: skip
        self.failures[path.name] = reason


def default_version(versions: dict[str, Served]) -> str:
    """The newest by the training date in its card (then by file time)."""
    return max(versions, key=lambda v: versions[v].model.trained_at)


async def load_catalog(
    settings: Settings,
    metrics: Metrics,
    on_batch: Callable[[int, float], None] = lambda size, seconds: None,
) -> Catalog:
    # A TRUSTED_KEYS that names no usable key stops startup (UnusableKeys), as DEVICE=cuda
    # without CUDA does: serving unverified files would be the opposite of what was asked.
    trusted = TrustedKeys(settings.trusted_keys) if settings.trusted_keys else None
    catalog = Catalog(settings, metrics, on_batch=on_batch, trusted=trusted)
    await catalog.sync()
    if not catalog.models:
        log.error("not ready", extra={"reason": catalog.not_ready_reason()})
    return catalog


def _signature(path: Path) -> tuple[int, ...]:
    """The file's and its bundle's (size, mtime, inode): a bundle that arrives after its
    file, or is replaced, has the file loaded again."""
    stats = []
    for each in (path, bundle_path(path)):
        try:
            st = each.stat()
        except OSError:
            stats += (-1, -1, -1)
            continue
        stats += (st.st_size, st.st_mtime_ns, st.st_ino)
    return tuple(stats)


def _open(path: Path, settings: Settings, trusted: TrustedKeys | None) -> Classifier:
    # Only regular files: opening a FIFO or a device would block or read forever.
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        regular = False  # a dangling symlink
    if not regular:
        raise InvalidModel(f"{path.name}: not a regular file")
    model = Classifier(
        path,
        settings.device,
        settings.onnx_threads,
        settings.inter_op_threads,
        max_batch_size=settings.batch_max_size,  # warm-up runs the sizes the batcher sends
        engine=settings.engine,
        precision=settings.precision,
        trusted=trusted,
    )
    model.warm_up()
    return model
