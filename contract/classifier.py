"""One exported ONNX file, loaded by the engine that serves it best here and checked
there. Knows nothing of HTTP.

A file is accepted only if it is one of ours: uint8 [batch, 32, 32, 3] in, probabilities
[batch, 100] out, a model card and a self-check in its metadata. It is served only once
it has run at the batch sizes the micro-batcher will send it and has given, through that
engine, in that precision, on this machine, the outputs its self-check promises for its
reference images (`warm_up`, contract/selfcheck.py).

Which engine and precision: the ways this machine offers the file, fastest first
(contract/engines.py, within DEVICE, ENGINE and PRECISION). The first whose promise holds
here serves; one whose promise fails is left with its reason (`declined`) and the next is
tried, so a forced choice that cannot keep its promise leaves none and the file is refused.

The file is read once: the engine is built from those bytes and the version is their
hash, so a file replaced while it loads is never served under the other file's version.
"""

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from contract import engines, selfcheck, trust
from contract.engines import Engine, Way
from contract.errors import InvalidModel
from contract.modelcard import (
    IMAGE_SIZE,
    INPUT_NAME,
    NUM_CLASSES,
    OUTPUT_NAME,
    ModelCard,
)

log = logging.getLogger(__name__)
# The largest batch a file is warmed up for unless told: the service's BATCH_MAX_SIZE default.
MAX_BATCH_SIZE = 64


class Classifier:
    def __init__(
        self,
        path: Path,
        device: str = "auto",
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        *,
        max_batch_size: int = MAX_BATCH_SIZE,
        engine: str = "auto",
        precision: str = "auto",
        trusted: trust.TrustedKeys | None = None,
    ):
        """`device`, `engine`, `precision`: DEVICE, ENGINE and PRECISION (contract/engines.py
        `ways`); `intra_op_threads`: the engine's threads (0: the engine's default);
        `max_batch_size`: the largest batch `run` will get (BATCH_MAX_SIZE): `warm_up` runs
        the sizes up to it. `trusted`: the keys the file must be signed with (TRUSTED_KEYS;
        contract/trust.py); None: it is loaded unverified."""
        self.path = Path(path)
        self.max_batch_size = max_batch_size
        self._threads, self._inter_op_threads, self._device = (
            intra_op_threads, inter_op_threads, device,
        )  # fmt: skip
        # One read: the engine and the version come from the same bytes.
        try:
            with self.path.open("rb") as file:
                content = file.read()
                mtime = os.fstat(file.fileno()).st_mtime
        except OSError as err:
            raise InvalidModel(f"{self.path.name}: cannot be read ({err.strerror})") from err
        # The bytes just read, the ones the engine is built from, are the bytes verified.
        self.provenance = trust.provenance(self.path, content, trusted)
        metadata, inputs, outputs = read_graph(content, self.path.name)
        self._check_signature(inputs, outputs)  # the file's fault whatever the engine
        # The graph's outputs, whatever engine computes them (read once: the data plane
        # asks for them on every request).
        self.output_names = [port.name for port in outputs]
        self.output_widths = {port.name: port.shape[-1] for port in outputs}
        try:
            self.card = ModelCard.from_metadata(metadata)
            self.self_check = selfcheck.read(metadata)
        except ValueError as err:
            raise InvalidModel(f"{self.path.name}: {err}") from None
        self.version = content_version(content)
        # When the weights were trained, as the card says (else the file's time): the
        # newest version of a model is its default.
        self.trained_at = str(self.card.training.get("trained_at") or "") or time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime)
        )
        # The precision the file was exported in: float32, or a twin's int8 or float16.
        self.file_precision = str(self.card.training.get("precision") or "float32")
        offered, self.declined = engines.ways(
            self.file_precision, device=device, engine=engine, precision=precision
        )
        # A way in a precision the file promises nothing for is not even built.
        self.ways = [
            way for way in offered if self.self_check is None or self.promise(way.precision)
        ]
        self.declined += [
            f"{way}: the file carries no {way.precision} promise (its export did not measure "
            "one, or measured it outside the limits)"
            for way in offered
            if way not in self.ways
        ]
        if not self.ways:
            raise InvalidModel(
                f"{self.path.name}: no engine here serves it as asked: " + "; ".join(self.declined)
            )
        self._content = content  # until warm_up has chosen: a later way is built from it
        self._failed: list[str] = []  # the ways tried that failed here, and why
        self.engine = self._open_from(0)
        self.ready = False
        self.self_check_seconds: float | None = None  # set once the self-check has passed

    @property
    def model_id(self) -> str:
        return self.card.model_id

    @property
    def way(self) -> Way:
        """How this file is computed here: engine, precision, device."""
        return self.engine.way

    @property
    def serving(self) -> dict[str, object]:
        """What serves it, for /models, the log and the metrics."""
        return {**self.engine.describe(), "declined": list(self.declined)}

    def run(
        self, images: np.ndarray, outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """The graph's outputs by name: `outputs`, or all of them (probabilities, and
        features and familiarity where the file has them). Naming fewer saves their copy
        back from the device."""
        if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"expected uint8 [N, 32, 32, 3], got {images.dtype} {images.shape}")
        names = list(self.output_names if outputs is None else outputs)
        return dict(zip(names, self.engine.run(names, images), strict=True))

    @property
    def warm_up_sizes(self) -> list[int]:
        """The batch sizes `warm_up` runs, largest first (see engines.warm_up_sizes)."""
        return engines.warm_up_sizes(self.max_batch_size, self.way.device)

    def warm_up(self) -> None:
        """Run the batch sizes the micro-batcher will send, so the first requests pay for
        neither allocations nor per-shape set-up, then the file's self-check, on each way
        in turn until one keeps the file's promise; a file no way serves here is refused
        (InvalidModel, with every reason) rather than answering wrongly or failing later."""
        # The file's own faults, whatever the engine: refused at once.
        self._check_batch(self.engine)
        if self.self_check is None:
            self.check_itself()  # says why
        while True:
            try:
                self._warm()
                self.check_itself()
                break
            except InvalidModel as err:
                self._decline(self.way, err)
                self.engine = self._open_from(self._tried + 1)
        del self._content  # chosen: the bytes are no longer needed
        self.ready = True

    def check_itself(self) -> None:
        """Run the reference images the file carries through this engine (this precision,
        this device, this CPU) and refuse it where an output leaves its promise."""
        if self.self_check is None:
            raise InvalidModel(
                f"{self.path.name}: it carries no self-check, so nothing shows that it computes "
                "here what it was exported to compute; export it again"
            )
        tolerances = self.promise(self.way.precision)
        if tolerances is None:
            raise InvalidModel(
                f"{self.path.name}: it carries no {self.way.precision} promise (its export "
                f"did not measure it, or measured it outside the limits); export it again"
            )
        started = time.perf_counter()
        try:
            problems = self.self_check.run(self._run_in_batches, tolerances)
        except Exception as err:  # an output it names that the graph lacks, a failed run
            raise InvalidModel(f"{self.path.name}: its self-check could not run") from err
        if problems:
            raise InvalidModel(
                f"{self.path.name}: it does not compute here what it promises: "
                + "; ".join(problems)
            )
        self.self_check_seconds = time.perf_counter() - started

    def promise(self, precision: str) -> list[selfcheck.Tolerance] | None:
        """The tolerances the file promises when computed in `precision`: its own in the
        precision it was exported in, else that precision's promise, if it carries one."""
        assert self.self_check is not None
        if precision == self.file_precision:
            return self.self_check.tolerances
        promise = self.self_check.precisions.get(precision)
        return None if promise is None else promise.tolerances

    def _open_from(self, first: int) -> Engine:
        """The first of `ways[first:]` that builds (InvalidModel with every reason when
        none is left)."""
        for index in range(first, len(self.ways)):
            way = self.ways[index]
            self._tried = index
            try:
                engine = engines.open_engine(
                    self._content, way, name=self.path.name, threads=self._threads,
                    inter_op_threads=self._inter_op_threads, device_setting=self._device,
                )  # fmt: skip
                return engine
            except InvalidModel as err:
                self._decline(way, err)
        raise InvalidModel(f"{self.path.name}: " + "; ".join(self._failed))

    def _decline(self, way: Way, err: InvalidModel) -> None:
        reason = err.message.removeprefix(f"{self.path.name}: ")
        self._failed.append(f"{way}: {reason}")
        self.declined.append(f"{way}: {reason}")
        log.warning("a way of serving a model was declined", extra={
            "file": self.path.name, "way": str(way), "reason": reason,
            "cause": repr(err.__cause__) if err.__cause__ else None,
        })  # fmt: skip

    def _check_batch(self, engine: Engine) -> None:
        (image_input,) = [i for i in engine.inputs if i.name == INPUT_NAME]
        batch = image_input.shape[0]
        if batch is not None and list(range(1, self.max_batch_size + 1)) != [batch]:
            raise InvalidModel(
                f"{self.path.name}: its input takes batches of exactly {batch} image(s), but "
                f"the micro-batcher sends 1 to {self.max_batch_size} at once; export it with a "
                "free batch dimension"
            )

    def _warm(self) -> None:
        for size in self.warm_up_sizes:
            try:
                self.run(np.zeros((size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
            except Exception as err:  # loads but cannot run here (an op, the device, memory)
                raise InvalidModel(
                    f"{self.path.name}: its warm-up inference failed (a batch of {size})"
                ) from err

    def _run_in_batches(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """`run`, at most max_batch_size images at a time (what the batcher sends)."""
        step = self.max_batch_size
        parts = [self.run(images[i : i + step]) for i in range(0, len(images), step)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _check_signature(self, inputs: list[engines.Port], outputs: list[engines.Port]) -> None:
        inputs = {i.name: i for i in inputs}
        outputs = {o.name: o for o in outputs}
        image_input, probabilities = inputs.get(INPUT_NAME), outputs.get(OUTPUT_NAME)
        if (
            image_input is None
            or image_input.dtype != "uint8"
            or list(image_input.shape[1:]) != [IMAGE_SIZE, IMAGE_SIZE, 3]
            or probabilities is None
            or probabilities.shape[-1] != NUM_CLASSES
        ):
            raise InvalidModel(
                f"{self.path.name}: not a CIFAR-100 export: expected input {INPUT_NAME!r} "
                f"uint8 [batch, 32, 32, 3] and output {OUTPUT_NAME!r} [batch, 100], found "
                f"inputs {[(i.name, i.dtype, i.shape) for i in inputs.values()]}, "
                f"outputs {[(o.name, o.shape) for o in outputs.values()]}"
            )


def read_graph(
    content: bytes, name: str
) -> tuple[dict[str, str], list[engines.Port], list[engines.Port]]:
    """The ONNX file's metadata_props (its card, its self-check) and its graph's inputs and
    outputs, before any engine reads it; InvalidModel when the bytes are not an ONNX
    model."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_model_from_string(content)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise InvalidModel(f"{name}: not an ONNX model (it cannot be parsed)") from err
    initializers = {init.name for init in proto.graph.initializer}

    def port(value: onnx.ValueInfoProto) -> engines.Port:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if (
            tensor.elem_type) else "undefined"  # fmt: skip
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        return engines.Port(value.name, dtype, shape)

    inputs = [port(v) for v in proto.graph.input if v.name not in initializers]
    return (
        {prop.key: prop.value for prop in proto.metadata_props},
        inputs,
        [port(v) for v in proto.graph.output],
    )


def content_version(content: bytes) -> str:
    """A short content hash: which weights answered, whatever the file is called."""
    return hashlib.sha256(content).hexdigest()[:12]


def file_version(path: Path) -> str:
    """The version a file's current content would be served under."""
    return content_version(Path(path).read_bytes())
