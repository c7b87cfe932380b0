"""The Triton model repository: written by the real command from the exports, every config
parsed with Triton's own ModelConfig schema (from tritonclient) and checked against the
ONNX graph it describes. No Triton server runs here; onnxruntime runs each copied model
at the shapes the config declares."""

import ast
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import descriptor_pool, message_factory, text_format
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from tritonclient.utils import np_to_triton_dtype

from contract.engines import CUDA_PROVIDER_OPTIONS, warm_up_sizes
from contract.modelcard import FAMILIARITY_NAME, INPUT_NAME, OUTPUT_NAME, ModelCard
from training import triton

ROOT = Path(__file__).resolve().parent.parent


def triton_model_config() -> SimpleNamespace:
    """Triton's ModelConfig schema, from the model_config.proto tritonclient ships, in a
    descriptor pool of its own: importing tritonclient.grpc would put its `inference.*`
    messages in the default pool, which holds the service's own gRPC messages
    (service/rpc/inference.proto, the same package) in this interpreter."""
    (folder,) = importlib.util.find_spec("tritonclient").submodule_search_locations
    tree = ast.parse((Path(folder) / "grpc" / "model_config_pb2.py").read_text())
    (serialized,) = [
        node.args[0].value for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile"
    ]  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(serialized)
    data_type = EnumTypeWrapper(pool.FindEnumTypeByName("inference.DataType"))
    kind = EnumTypeWrapper(pool.FindEnumTypeByName("inference.ModelInstanceGroup.Kind"))
    return SimpleNamespace(
        ModelConfig=message_factory.GetMessageClass(
            pool.FindMessageTypeByName("inference.ModelConfig")
        ),
        DataType=data_type,
        TYPE_UINT8=data_type.Value("TYPE_UINT8"),
        TYPE_FP32=data_type.Value("TYPE_FP32"),
        ModelInstanceGroup=SimpleNamespace(
            KIND_GPU=kind.Value("KIND_GPU"), KIND_CPU=kind.Value("KIND_CPU")
        ),
    )


model_config_pb2 = triton_model_config()
HEAVY = ("tensorflow", "keras", "tf2onnx")
# How the onnxruntime backend reads its CUDA `parameters` (src/onnxruntime.cc): numbers
# standing for onnxruntime's own option values.
BACKEND_CODES = {
    "cudnn_conv_algo_search": {"0": "EXHAUSTIVE", "1": "HEURISTIC", "2": "DEFAULT"},
    "arena_extend_strategy": {"0": "kNextPowerOfTwo", "1": "kSameAsRequested"},
}


@pytest.fixture(scope="module")
def exported(models_dir, tmp_path_factory):
    """`python -m training export-triton` in a fresh interpreter; what it imported."""
    out = tmp_path_factory.mktemp("triton") / "model_repository"
    script = textwrap.dedent(
        f"""
        import json, runpy, sys
        sys.argv = ["training", "export-triton", "--models-dir", {str(models_dir)!r},
                    "--out", {str(out)!r}]
        try:
            runpy.run_module("training", run_name="__main__", alter_sys=True)
            code = None
        except SystemExit as stop:
            code = stop.code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        print(json.dumps({{"code": code, "heavy": heavy}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    return out, report, result.stdout


def configs(out: Path) -> list[Path]:
    return sorted([*out.glob("*/config.pbtxt"), *out.glob("*/configs/*.pbtxt")])


def parse(path: Path) -> model_config_pb2.ModelConfig:
    # Strict: an unknown field or a wrong enum name is a ParseError, as in tritonserver.
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def graph_tensors(model: onnx.ModelProto, kind: str) -> dict[str, onnx.ValueInfoProto]:
    initializers = {i.name for i in model.graph.initializer}
    values = model.graph.input if kind == "input" else model.graph.output
    return {v.name: v for v in values if v.name not in initializers}


def test_export_triton_writes_a_model_per_export_without_tensorflow(exported, models_dir):
    out, report, stdout = exported
    assert report["code"] == 0, stdout
    assert report["heavy"] == [], f"export-triton imported {report['heavy']}"
    exports = sorted(p.stem for p in models_dir.glob("*.onnx"))
    assert exports == ["cifar100-5735844", "cifar100-712868"]
    assert sorted(p.name for p in out.iterdir()) == exports
    for model_id in exports:
        folder = out / model_id
        assert (folder / triton.VERSION / triton.MODEL_FILE).read_bytes() == (
            models_dir / f"{model_id}.onnx"
        ).read_bytes()
        assert f"Wrote {folder}" in stdout
    assert len(configs(out)) == 3 * len(exports)  # GPU, CPU, OpenVINO on the CPU
    assert not list(out.rglob("*.tmp")), "atomic writes left a temporary file"


def test_the_openvino_config_runs_the_same_file_on_the_cpu_in_float32(exported):
    """Triton's OpenVINO backend reads model.onnx as it is: the same inputs, outputs,
    batching and warm-up as the CPU config, the backend in place of the platform, and
    its latency settings; never a bfloat16 hint, which Triton could not check."""
    out, _, _ = exported
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        cpu = parse(folder / "configs" / f"{triton.CPU_CONFIG}.pbtxt")
        openvino = parse(folder / "configs" / f"{triton.OPENVINO_CONFIG}.pbtxt")
        assert (openvino.backend, openvino.platform) == ("openvino", "")
        assert openvino.default_model_filename == "model.onnx"
        parameters = {k: v.string_value for k, v in openvino.parameters.items()}
        assert parameters == {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        assert "HINT_BF16" not in parameters
        for field in ("input", "output", "max_batch_size", "dynamic_batching", "instance_group",
                      "model_warmup"):  # fmt: skip
            assert getattr(openvino, field) == getattr(cpu, field), field


def test_every_config_parses_with_tritons_schema_and_matches_the_onnx_graph(exported):
    out, _, _ = exported
    for path in configs(out):
        folder = path.parent if path.name == "config.pbtxt" else path.parent.parent
        config = parse(path)
        model = onnx.load(folder / triton.VERSION / config.default_model_filename)
        card = ModelCard.from_metadata({p.key: p.value for p in model.metadata_props})

        assert config.name == folder.name == card.model_id, path
        openvino = path.stem == triton.OPENVINO_CONFIG
        assert (config.platform, config.backend) == (
            ("", "openvino") if openvino else ("onnxruntime_onnx", "")
        )
        assert config.default_model_filename == "model.onnx"
        assert config.max_batch_size > 0
        for kind, declared in (("input", config.input), ("output", config.output)):
            graph = graph_tensors(model, kind)
            assert [t.name for t in declared] == list(graph), (path, kind)
            for tensor in declared:
                value = graph[tensor.name].type.tensor_type
                numpy_type = onnx.helper.tensor_dtype_to_np_dtype(value.elem_type)
                # tritonclient's own mapping, not ours: np.uint8 -> UINT8, np.float32 -> FP32
                assert model_config_pb2.DataType.Name(tensor.data_type) == (
                    "TYPE_" + np_to_triton_dtype(numpy_type)
                ), (path, tensor.name)
                batch, *dims = value.shape.dim
                assert batch.dim_param and not batch.HasField("dim_value"), "batch not free"
                assert list(tensor.dims) == [d.dim_value for d in dims], (path, tensor.name)

        (image,) = config.input
        assert (image.name, list(image.dims)) == (INPUT_NAME, [32, 32, 3])
        assert image.data_type == model_config_pb2.TYPE_UINT8
        outputs = {t.name: t for t in config.output}
        assert list(outputs[OUTPUT_NAME].dims) == [100]
        assert outputs[OUTPUT_NAME].data_type == model_config_pb2.TYPE_FP32
        assert "features" in outputs and outputs["features"].dims[0] > 0
        assert list(outputs[FAMILIARITY_NAME].dims) == [1]
        assert outputs[FAMILIARITY_NAME].data_type == model_config_pb2.TYPE_FP32
        labelled = {name for name, t in outputs.items() if t.label_filename}
        assert labelled == {OUTPUT_NAME}
        labels = (folder / outputs[OUTPUT_NAME].label_filename).read_text().splitlines()
        assert labels == card.class_names and len(labels) == 100

        batching = config.dynamic_batching
        assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
        assert batching.preferred_batch_size, "no preferred batch sizes"
        assert all(0 < b <= config.max_batch_size for b in batching.preferred_batch_size)
        assert 0 < batching.max_queue_delay_microseconds <= 10_000


def test_gpu_config_and_its_cpu_alternative_differ_only_in_device_settings(exported):
    out, _, _ = exported
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        gpu = parse(folder / "config.pbtxt")
        cpu = parse(folder / "configs" / f"{triton.CPU_CONFIG}.pbtxt")
        assert [(g.kind, g.count) for g in gpu.instance_group] == [
            (model_config_pb2.ModelInstanceGroup.KIND_GPU, 1)
        ]
        assert [(g.kind, g.count) for g in cpu.instance_group] == [
            (model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)
        ]
        # The GPU instance tunes cuDNN by heuristics (not the backend's default exhaustive
        # benchmark at every new batch shape) and grows its arena by what is asked: the
        # options the service gives its own CUDA sessions.
        parameters = {k: v.string_value for k, v in gpu.parameters.items()}
        decoded = {key: BACKEND_CODES[key][value] for key, value in parameters.items()}
        assert decoded == {
            key: CUDA_PROVIDER_OPTIONS[key]
            for key in ("cudnn_conv_algo_search", "arena_extend_strategy")
        }
        assert not cpu.parameters
        # Warm-up before ready, at the sizes the service warms its own sessions at.
        assert [w.batch_size for w in gpu.model_warmup] == warm_up_sizes(gpu.max_batch_size, "cuda")
        assert [w.batch_size for w in cpu.model_warmup] == warm_up_sizes(cpu.max_batch_size, "cpu")
        assert [w.batch_size for w in gpu.model_warmup] == [128, 64, 32, 16, 8, 4, 2, 1]
        for warmup in [*gpu.model_warmup, *cpu.model_warmup]:
            assert warmup.name == f"batch_{warmup.batch_size}"
            (image,) = gpu.input
            (name,) = warmup.inputs
            data = warmup.inputs[name]
            assert (name, data.data_type, list(data.dims)) == (
                image.name, image.data_type, list(image.dims)
            )  # fmt: skip
            assert data.WhichOneof("input_data_type") == "zero_data" and data.zero_data
        for config in (gpu, cpu):
            del config.instance_group[:]
            config.ClearField("parameters")
            del config.model_warmup[:]
        assert gpu == cpu


def test_each_copied_model_runs_at_the_shapes_its_config_declares(exported):
    out, _, _ = exported
    rng = np.random.default_rng(0)
    for path in sorted(out.glob("*/config.pbtxt")):
        config = parse(path)
        session = ort.InferenceSession(
            str(path.parent / triton.VERSION / triton.MODEL_FILE),
            providers=["CPUExecutionProvider"],
        )
        warmups = {w.batch_size for w in config.model_warmup}
        assert max(warmups) == config.max_batch_size and min(warmups) == 1
        for batch in sorted({1, max(config.dynamic_batching.preferred_batch_size), *warmups}):
            (image,) = config.input
            pixels = rng.integers(0, 256, (batch, *image.dims), dtype=np.uint8)
            results = session.run([t.name for t in config.output], {image.name: pixels})
            for tensor, result in zip(config.output, results, strict=True):
                assert result.shape == (batch, *tensor.dims), (path, tensor.name)
                assert result.dtype == np.float32
        probabilities = results[[t.name for t in config.output].index(OUTPUT_NAME)]
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)


def test_the_training_cli_lists_export_triton_and_runs_it_without_the_dataset(models_dir, tmp_path):
    from training.__main__ import main, parser

    args = parser().parse_args(["export-triton"])
    assert (args.models_dir, args.out) == (triton.DEFAULT_MODELS_DIR, triton.DEFAULT_OUT)
    # No --data-dir and no CIFAR100_DIR: the command must not ask for the dataset.
    out = tmp_path / "repo"
    assert main(["export-triton", "--models-dir", str(models_dir), "--out", str(out)]) == 0
    assert len(configs(out)) == 6


def test_a_file_that_is_not_one_of_our_exports_is_refused_by_name(models_dir, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / "good.onnx").write_bytes((models_dir / "cifar100-712868.onnx").read_bytes())
    stranger = onnx.load(models_dir / "cifar100-712868.onnx")
    del stranger.metadata_props[:]
    onnx.save(stranger, models / "stranger.onnx")
    out = tmp_path / "repo"
    assert triton.main(["export-triton", "--models-dir", str(models), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "stranger.onnx" in error and "model card" in error

    empty = tmp_path / "empty"
    empty.mkdir()
    assert triton.main(["export-triton", "--models-dir", str(empty), "--out", str(out)]) == 2
    assert "no exported model" in capsys.readouterr().err


def test_a_familiarity_output_of_another_shape_is_refused(models_dir, tmp_path):
    """The service and Triton's clients read familiarity as one float per image."""
    model = onnx.load(models_dir / "cifar100-712868.onnx")
    (output,) = [o for o in model.graph.output if o.name == FAMILIARITY_NAME]
    output.type.tensor_type.shape.dim[1].dim_value = 2
    models = tmp_path / "models"
    models.mkdir()
    onnx.save(model, models / "wide.onnx")
    with pytest.raises(triton.RepositoryError, match="familiarity as TYPE_FP32"):
        triton.write_repository(models, tmp_path / "repo")
    # Without the output its self-check promises, it cannot prove itself: refused too.
    model.graph.output.remove(output)
    onnx.save(model, models / "wide.onnx")
    with pytest.raises(triton.RepositoryError, match="it has no output familiarity"):
        triton.write_repository(models, tmp_path / "repo")


def test_a_graph_with_a_fixed_batch_size_is_refused(models_dir, tmp_path):
    model = onnx.load(models_dir / "cifar100-712868.onnx")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8
    models = tmp_path / "models"
    models.mkdir()
    onnx.save(model, models / "fixed.onnx")
    with pytest.raises(triton.RepositoryError, match="fixed batch size 8"):
        triton.write_repository(models, tmp_path / "repo")
