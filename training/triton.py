"""python -m training export-triton: a Triton model repository from the exported ONNX files.

For every models/<id>.onnx, out/ gets:
    <id>/config.pbtxt        platform onnxruntime_onnx, dynamic batching, one instance on a GPU,
                             cuDNN's heuristic search, warm-up at the batch sizes it will run
    <id>/configs/cpu.pbtxt   the same on the CPU (tritonserver --model-config-name=cpu)
    <id>/configs/openvino.pbtxt  Triton's OpenVINO backend on the CPU, reading the same
                             model.onnx, in float32 (--model-config-name=openvino); written
                             where OpenVINO keeps the file's promise here (not for float16
                             twins, which are for GPUs). Not in bfloat16: Triton cannot run
                             the file's self-check where it serves, and a bfloat16 promise
                             holds or not by the CPU, so it is not offered unchecked
    <id>/labels.txt          the 100 class names in class-index order (Triton's classification)
    <id>/1/model.onnx        the export, byte for byte, once its self-check has passed here
    <id>/1/model.onnx.sig    the export's signature bundle, where it has one: the copy holds
                             the same bytes, so the same bundle verifies it

Everything comes from the ONNX file and its model card: no TensorFlow, so the service's
dependencies are enough to run it. Triton's own schema (ModelConfig in model_config.proto) is
checked in the tests; here the text is written plainly to keep tritonclient out of the
runtime dependencies.
"""

import argparse
import sys
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from contract.classifier import Classifier
from contract.errors import InvalidModel
from contract.modelcard import (
    FAMILIARITY_NAME,
    IMAGE_SIZE,
    INPUT_NAME,
    NUM_CLASSES,
    OUTPUT_NAME,
    ModelCard,
)
from contract.trust import bundle_path
from training.atomic import write_bytes, write_text
from training.errors import TrainingError

DEFAULT_MODELS_DIR = Path("models")
DEFAULT_OUT = Path("model_repository")
VERSION = "1"
MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
CPU_CONFIG = "cpu"  # configs/cpu.pbtxt, picked by `tritonserver --model-config-name=cpu`
OPENVINO_CONFIG = "openvino"  # configs/openvino.pbtxt: Triton's OpenVINO backend, the CPU
# The OpenVINO backend's parameters (its README): one stream and the latency hint, as the
# service's engine runs it (contract/engines.py), the batcher sending one batch at a time.
OPENVINO_PARAMETERS = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}

# 128, twice the service's BATCH_MAX_SIZE: the service caps batches at 64 to hold its p99
# target on a CPU, where throughput is flat from batch 32 on (see the README's ceiling
# table); Triton is the GPU path, where larger batches still pay, and 128 is the largest
# batch our benchmark runs these graphs at.
MAX_BATCH_SIZE = 128
PREFERRED_BATCH_SIZES = (64, 128)
# The service's BATCH_MAX_WAIT_MS default: a request waits at most 2 ms for company.
MAX_QUEUE_DELAY_MICROSECONDS = 2000
# Warm-up requests Triton runs before it marks a model ready, largest first, as the
# service warms its sessions (contract.engines.warm_up_sizes; the tests hold the two to
# the same rule): on a GPU every power of two up to the batch cap, since the dynamic
# batcher forms batches of any size up to it; on the CPU the cap and a single image.
GPU_WARMUP_BATCH_SIZES = (128, 64, 32, 16, 8, 4, 2, 1)
CPU_WARMUP_BATCH_SIZES = (MAX_BATCH_SIZE, 1)
# The onnxruntime backend's CUDA provider options (its README: "ONNX Runtime with CUDA
# Execution Provider optimization"), as the service sets them: cuDNN's heuristics instead
# of the default exhaustive benchmark at every new batch shape (cudnn_conv_algo_search 1 =
# HEURISTIC), and an arena grown by what is asked (arena_extend_strategy 1 =
# kSameAsRequested). Model-level `parameters`, which every release of the backend reads
# (newer ones also take them from a "cuda" execution accelerator, but where both are given
# these win, and an absent one here is reset to onnxruntime's default).
GPU_PARAMETERS = {"cudnn_conv_algo_search": "1", "arena_extend_strategy": "1"}


class RepositoryError(TrainingError):
    """An export that cannot be described to Triton, or no export at all."""


# ONNX element types our graphs use -> Triton's DataType names.
TRITON_TYPES = {
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
}


def write_repository(models_dir: Path, out: Path) -> list[Path]:
    """Write out/<id>/ for every models_dir/*.onnx; return the model folders written.

    RepositoryError, naming the file, if one is not an export of ours: a repository that
    Triton would half-load is worse than none.
    """
    paths = sorted(Path(models_dir).glob("*.onnx"))
    if not paths:
        raise RepositoryError(f"no exported model in {models_dir}; run train-export first")
    # Every file is checked before anything is written: one bad file writes nothing. That
    # includes its self-check, run by the service's own code on this CPU: Triton runs the
    # same bytes with the same onnxruntime kernels.
    described = []
    for path in paths:
        try:
            model = onnx.load(path)
            card = ModelCard.from_metadata({p.key: p.value for p in model.metadata_props})
            openvino = openvino_kept(path)
            described.append((path, card, tensor_specs(model), labels(card), openvino))
            Classifier(path, "cpu", 1, 1, engine="onnxruntime").check_itself()  # as Triton runs it
        except (ValueError, DecodeError) as err:
            raise RepositoryError(f"{path}: {err}") from None
        except InvalidModel as err:
            raise RepositoryError(f"{path}: {err.message.removeprefix(path.name + ': ')}") from None
    written = []
    for path, card, tensors, label_text, openvino in described:
        folder = Path(out) / card.model_id
        # The model first, the config last: a Triton polling the repository never sees a
        # config whose model file is not there yet.
        copy = folder / VERSION / MODEL_FILE
        write_bytes(copy, path.read_bytes())
        if bundle_path(path).is_file():
            write_bytes(bundle_path(copy), bundle_path(path).read_bytes())
        else:  # an earlier export's bundle would not verify these bytes: none is honest
            bundle_path(copy).unlink(missing_ok=True)
        write_text(folder / LABELS_FILE, label_text)
        write_text(folder / "configs" / f"{CPU_CONFIG}.pbtxt", model_config(card, tensors, "cpu"))
        if openvino:
            write_text(folder / "configs" / f"{OPENVINO_CONFIG}.pbtxt",
                       model_config(card, tensors, OPENVINO_CONFIG))  # fmt: skip
        write_text(folder / "config.pbtxt", model_config(card, tensors, "gpu"))
        written.append(folder)
    return written


def openvino_kept(path: Path) -> bool:
    """Whether OpenVINO computes the file here, on the CPU, as its self-check promises
    (float32 files in float32, int8 twins in int8; float16 twins are not offered to it)."""
    try:
        model = Classifier(path, "cpu", 1, 1, engine="openvino", precision="float32")
        model.check_itself()
    except InvalidModel:
        return False
    return True


def tensor_specs(model: onnx.ModelProto) -> dict[str, list[tuple[str, str, list[int]]]]:
    """{"input": [...], "output": [...]} as (name, Triton type, dims without the batch dim).

    Checks the contract the service relies on too: uint8 images [batch, 32, 32, 3] in,
    float32 probabilities [batch, 100] out, float32 familiarity [batch, 1] where the file
    has it (files exported before it existed do not), and a batch dimension left free.
    Every output of the graph is listed, so Triton's clients can ask for any of them.
    """
    initializers = {i.name for i in model.graph.initializer}
    specs: dict[str, list[tuple[str, str, list[int]]]] = {"input": [], "output": []}
    for kind, values in (
        ("input", [v for v in model.graph.input if v.name not in initializers]),
        ("output", list(model.graph.output)),
    ):
        for value in values:
            tensor = value.type.tensor_type
            if tensor.elem_type not in TRITON_TYPES:
                raise ValueError(
                    f"{kind} {value.name!r} has ONNX element type "
                    f"{onnx.TensorProto.DataType.Name(tensor.elem_type)}, which we do not map"
                )
            batch, *dims = tensor.shape.dim
            if batch.HasField("dim_value"):
                raise ValueError(f"{kind} {value.name!r} has a fixed batch size {batch.dim_value}")
            if not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
                raise ValueError(f"{kind} {value.name!r} has a dimension other than the batch free")
            specs[kind].append(
                (value.name, TRITON_TYPES[tensor.elem_type], [d.dim_value for d in dims])
            )
    expected = {
        "input": (INPUT_NAME, "TYPE_UINT8", [IMAGE_SIZE, IMAGE_SIZE, 3]),
        "output": (OUTPUT_NAME, "TYPE_FP32", [NUM_CLASSES]),
    }
    if specs["input"] != [expected["input"]]:
        raise ValueError(f"expected the one input {expected['input']}, found {specs['input']}")
    if expected["output"] not in specs["output"]:
        raise ValueError(f"expected the output {expected['output']}, found {specs['output']}")
    familiarity = [spec for spec in specs["output"] if spec[0] == FAMILIARITY_NAME]
    if familiarity and familiarity != [(FAMILIARITY_NAME, "TYPE_FP32", [1])]:
        raise ValueError(
            f"expected the output {FAMILIARITY_NAME} as TYPE_FP32 [1], found {familiarity}"
        )
    return specs


def labels(card: ModelCard) -> str:
    if any("\n" in name or not name.strip() for name in card.class_names):
        raise ValueError("class names must be non-empty single lines to make a labels file")
    return "".join(f"{name}\n" for name in card.class_names)


def model_config(
    card: ModelCard, tensors: dict[str, list[tuple[str, str, list[int]]]], device: str
) -> str:
    """config.pbtxt in protobuf text format (Triton's ModelConfig message)."""

    def block(field: str, specs: list[tuple[str, str, list[int]]]) -> str:
        entries = []
        for name, data_type, dims in specs:
            lines = [f'name: "{name}"', f"data_type: {data_type}", f"dims: {list(dims)}"]
            if name == OUTPUT_NAME:  # Triton's classification extension names the classes
                lines.append(f'label_filename: "{LABELS_FILE}"')
            entries.append("  {\n" + "".join(f"    {line}\n" for line in lines) + "  }")
        return f"{field} [\n" + ",\n".join(entries) + "\n]\n"

    def warmup(sizes: tuple[int, ...]) -> str:
        (name, data_type, dims) = tensors["input"][0]
        entries = [
            "  {\n"
            f'    name: "batch_{size}"\n'
            f"    batch_size: {size}\n"
            f'    inputs {{\n      key: "{name}"\n'
            f"      value: {{ data_type: {data_type} dims: {list(dims)} zero_data: true }}\n"
            "    }\n"
            "  }"
            for size in sizes
        ]
        return "model_warmup [\n" + ",\n".join(entries) + "\n]\n"

    kind = "KIND_GPU" if device == "gpu" else "KIND_CPU"
    parameters = {"gpu": GPU_PARAMETERS, OPENVINO_CONFIG: OPENVINO_PARAMETERS}.get(device, {})
    sizes = GPU_WARMUP_BATCH_SIZES if device == "gpu" else CPU_WARMUP_BATCH_SIZES
    runtime = 'backend: "openvino"' if device == OPENVINO_CONFIG else 'platform: "onnxruntime_onnx"'
    return (
        f"# {card.model_id}: written by `python -m training export-triton` from the ONNX file\n"
        f"# and its model card ({card.parameter_count:,} parameters). Inputs are raw uint8 RGB\n"
        "# pixels: the graph scales them itself.\n"
        f'name: "{card.model_id}"\n'
        f"{runtime}\n"
        f'default_model_filename: "{MODEL_FILE}"\n'
        f"max_batch_size: {MAX_BATCH_SIZE}\n"
        + block("input", tensors["input"])
        + block("output", tensors["output"])
        + "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(map(str, PREFERRED_BATCH_SIZES))} ]\n"
        f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_MICROSECONDS}\n"
        "}\n"
        "instance_group [\n"
        f"  {{\n    count: 1\n    kind: {kind}\n  }}\n"
        "]\n"
        + "".join(
            f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
            for key, value in parameters.items()
        )
        + warmup(sizes)
    )


def add(commands: argparse._SubParsersAction, options: object = None) -> None:
    """The export-triton subcommand, for training/__main__.py's parser and for main() (it
    takes none of the shared `options`)."""
    command = commands.add_parser(
        "export-triton",
        help="write a Triton model repository from the exported models (no TensorFlow)",
    )
    command.add_argument(
        "--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help="the exports (*.onnx)"
    )
    command.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="the repository (default: %(default)s)"
    )
    command.set_defaults(command=run, needs_data=False)


def run(args: argparse.Namespace) -> None:
    for folder in write_repository(args.models_dir, args.out):
        print(f"Wrote {folder}")
    print(f"Serve it with Triton: --model-repository={args.out.resolve()}")


def main(argv: list[str]) -> int:
    """`python -m training export-triton ...`, dispatched before training/__main__.py
    imports TensorFlow."""
    root = argparse.ArgumentParser(prog="python -m training")
    add(root.add_subparsers(required=True, metavar="COMMAND"))
    args = root.parse_args(argv)
    try:
        args.command(args)
    except RepositoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
