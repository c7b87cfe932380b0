"""One batch of images -> one Arrow table of answers: the work each Ray actor does.

Every step is the service's own. Bytes are opened and decoded by contract/images.py (the
same formats, limits and resize), probabilities come from contract/classifier.py's
Classifier on the same ONNX file (checked by its content hash, and verified against
TRUSTED_KEYS as the service verifies it, where set), and each answer is shaped
by service/schemas.describe, the function /predict answers with. A file that cannot be
read or decoded becomes a row with `error` set; the rest of its batch goes on.

Nothing here knows of Ray: an actor is an instance of `Scorer`, a batch a pyarrow.Table.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs

from contract.classifier import Classifier
from contract.columns import score_output_schema
from contract.errors import ContractError, UploadTooLarge
from contract.files import open_regular
from contract.images import bound_metadata, decode, open_image
from contract.modelcard import FAMILIARITY_NAME, FEATURES_NAME, IMAGE_SIZE, OUTPUT_NAME
from contract.trust import TrustedKeys
from service.schemas import describe


@dataclass(frozen=True)
class Options:
    """What every actor is built with (picklable: Ray sends it to each)."""

    model_path: str
    model_version: str  # the driver's hash of the file: every actor must load the same bytes
    top_k: int
    resize: bool
    features: bool
    max_bytes: int  # per file (the service's MAX_UPLOAD_BYTES)
    max_pixels: int  # per image (the service's MAX_IMAGE_PIXELS)
    batch_size: int  # images per onnxruntime call: what the warm-up runs
    device: str  # cpu, cuda or auto, as the service's DEVICE
    threads: int  # the engine's threads: the CPUs the actor holds
    engine: str = "auto"  # as the service's ENGINE
    precision: str = "auto"  # as the service's PRECISION
    trusted_keys: str | None = None  # TRUSTED_KEYS: each actor verifies the bytes it loads


class Scorer:
    """One model file on its engine, warmed up and checked; called with batches of
    SCORE_INPUT_SCHEMA rows."""

    def __init__(self, options: Options) -> None:
        bound_metadata()  # Pillow's limits on PNG metadata, as the service sets them
        self.options = options
        self.model = Classifier(
            Path(options.model_path),
            options.device,
            options.threads,
            1,
            max_batch_size=options.batch_size,
            engine=options.engine,
            precision=options.precision,
            trusted=TrustedKeys(Path(options.trusted_keys)) if options.trusted_keys else None,
        )
        if self.model.version != options.model_version:
            raise RuntimeError(
                f"{options.model_path} on this node is version {self.model.version}, not the "
                f"{options.model_version} the job started with: every node must see one file"
            )
        self.model.warm_up()
        self.outputs = [OUTPUT_NAME]
        if FAMILIARITY_NAME in self.model.output_widths:
            self.outputs.append(FAMILIARITY_NAME)
        if options.features:
            self.outputs.append(FEATURES_NAME)
        self.schema = score_output_schema(options.features)

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = batch["path"].to_pylist()
        pixels = batch["pixels"].to_pylist()
        images: list[np.ndarray] = []
        good: list[int] = []  # row of each image in `images`
        errors: list[str | None] = [None] * len(paths)
        for row, (path, raw) in enumerate(zip(paths, pixels, strict=True)):
            try:
                images.append(self.load(path, raw))
                good.append(row)
            except Exception as err:  # one file's fault, whatever it is, is its row's
                errors[row] = problem(err)
        columns = {name: [None] * len(paths) for name in self.schema.names}
        columns["shard"] = batch["shard"].to_pylist()
        columns["index"] = batch["index"].to_pylist()
        columns["path"] = paths
        columns["error"] = errors
        size = self.options.batch_size
        for start in range(0, len(good), size):
            rows = good[start : start + size]
            outputs = self.model.run(np.stack(images[start : start + size]), self.outputs)
            self.fill(columns, rows, paths, outputs)
        return pa.table(columns, schema=self.schema)

    def load(self, path: str, pixels: bytes | None) -> np.ndarray:
        """uint8 [32, 32, 3] of one input, as /predict decodes an upload."""
        if pixels is not None:
            return np.frombuffer(pixels, dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE, 3)
        data = read_file(path, self.options.max_bytes)
        image = open_image(data, self.options.resize, self.options.max_pixels)
        return decode(image)

    def fill(
        self, columns: dict[str, list], rows: list[int], paths: list[str], outputs: dict
    ) -> None:
        familiarity = outputs.get(FAMILIARITY_NAME)
        for i, row in enumerate(rows):
            answer = describe(
                self.model,
                outputs[OUTPUT_NAME][i],
                self.options.top_k,
                paths[row],
                None if familiarity is None else float(familiarity[i, 0]),
            )
            columns["model_id"][row] = self.model.model_id
            columns["model_version"][row] = self.model.version
            columns["top_k_ids"][row] = [c.class_id for c in answer.top_k]
            columns["top_k_labels"][row] = [c.label for c in answer.top_k]
            columns["top_k_probabilities"][row] = [c.probability for c in answer.top_k]
            columns["superclass_id"][row] = answer.superclass.superclass_id
            columns["superclass"][row] = answer.superclass.label
            columns["superclass_probability"][row] = answer.superclass.probability
            columns["familiarity"][row] = answer.familiarity
            if FEATURES_NAME in outputs:
                columns["features"][row] = outputs[FEATURES_NAME][i]


def read_file(path: str, max_bytes: int) -> bytes:
    """A file's bytes, local or an object store URI (s3://, gs://: pyarrow's filesystems);
    UploadTooLarge above `max_bytes`, told by its size before anything is read. Only a
    regular file is opened (contract/files.py): a FIFO, a device or a socket is refused at
    once instead of blocking the actor and every image of its batch."""
    if "://" in path:
        filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
        info = filesystem.get_file_info(inner)
        if info.type != pyarrow.fs.FileType.File:
            kind = {pyarrow.fs.FileType.NotFound: "no such file"}.get(info.type)
            raise OSError(kind or f"not a regular file ({info.type.name.lower()})")
        file, size = filesystem.open_input_stream(inner), info.size
    else:
        file, size = open_regular(path)
    with file:
        if size is not None and size > max_bytes:
            raise UploadTooLarge(
                f"the file is {size:,} bytes; the limit is {max_bytes:,} per image"
            )
        data = file.read(max_bytes + 1)  # a file that grew since its size was read
    if len(data) > max_bytes:
        raise UploadTooLarge(f"the file is over {max_bytes:,} bytes, the limit per image")
    return data


def problem(err: Exception) -> str:
    """The error column's text: the service's own message where it has one."""
    if isinstance(err, ContractError):
        return err.message
    if isinstance(err, OSError):
        return f"cannot read the file: {err.strerror or err}"
    return f"{type(err).__name__}: {err}"
