"""One ONNX file as every loader opens it (contract/classifier.py), on onnxruntime: the CUDA
options and warm-up sizes it really passes to onnxruntime, a fixed batch refused at
warm-up, one read of the file for both the engine and its version, and a loud warning
when DEVICE=auto finds an NVIDIA driver but runs on the CPU. On small graphs of our
contract, built here, so no training is needed; there is no GPU on these machines, so what
reaches onnxruntime is recorded rather than run on CUDA (tests/test_engines.py has the
choice between engines and precisions)."""

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from contract import engines as engines_module
from contract import selfcheck
from contract.classifier import Classifier, content_version
from contract.engines import CPU, CUDA, requested_providers, warm_up_sizes
from contract.modelcard import FEATURES_NAME, INPUT_NAME, OUTPUT_NAME, ModelCard
from contract.selfcheck import SelfCheck, Tolerance
from service.errors import DeviceUnavailable, InvalidModel
from training.synthetic import CLASS_NAMES, FINE_TO_COARSE, SUPERCLASS_NAMES, make_images

EXPECTED_CUDA_OPTIONS = {
    "cudnn_conv_algo_search": "HEURISTIC",
    "arena_extend_strategy": "kSameAsRequested",
    "do_copy_in_default_stream": "1",
    "use_tf32": "0",  # a float32 file promises float32 parity (its self-check)
}


def tiny_model(model_id: str = "tiny", seed: int = 0, batch: int | str = "batch") -> bytes:
    """uint8 NHWC images -> a 3x3 convolution -> average -> dense -> softmax: our contract
    (input, outputs, model card) at a few hundred parameters."""
    rng = np.random.default_rng(seed)
    weights = {
        "conv_w": rng.normal(0, 0.1, (4, 3, 3, 3)),
        "conv_b": np.zeros(4),
        "dense_w": rng.normal(0, 1, (4, 100)),
        "dense_b": np.zeros(100),
        "scale": np.array(1 / 255),
    }
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "scale"], ["scaled"]),
        helper.make_node("Transpose", ["scaled"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], [FEATURES_NAME]),
        helper.make_node("Gemm", [FEATURES_NAME, "dense_w", "dense_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        model_id,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [batch, 32, 32, 3])],
        [
            helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [batch, 100]),
            helper.make_tensor_value_info(FEATURES_NAME, TensorProto.FLOAT, [batch, 4]),
        ],
        initializer=[
            numpy_helper.from_array(np.asarray(v, np.float32), name) for name, v in weights.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    card = ModelCard(
        model_id=model_id,
        class_names=CLASS_NAMES,
        superclass_names=SUPERCLASS_NAMES,
        fine_to_coarse=FINE_TO_COARSE,
        parameter_count=sum(np.size(v) for v in weights.values()),
        outputs=[OUTPUT_NAME, FEATURES_NAME],
    )
    onnx.helper.set_model_props(model, card.to_metadata())
    onnx.checker.check_model(model)
    # Its self-check: what onnxruntime computes for a few images, as an export stores it.
    references = make_images(np.arange(4), seed=seed)
    session = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
    probabilities = np.concatenate(  # one at a time: a file of fixed batch 1 too
        [session.run([OUTPUT_NAME], {INPUT_NAME: image[None]})[0] for image in references]
    )
    check = SelfCheck(references, {OUTPUT_NAME: probabilities},
                      [Tolerance(OUTPUT_NAME, "max_abs", 1e-5)])  # fmt: skip
    model.metadata_props.add(key=selfcheck.METADATA_KEY, value=check.to_metadata())
    return model.SerializeToString()


class Recorder:
    """Stands in for ort.InferenceSession: records what it is given, then builds the real
    session on the CPU (the only provider here). `before` runs first, `after` last; with
    `cuda`, the session says it runs on CUDA (what onnxruntime-gpu says on a GPU)."""

    def __init__(self, before=lambda: None, after=lambda: None, cuda: bool = False):
        self.calls: list[dict] = []
        self.before, self.after, self.cuda = before, after, cuda

    def __call__(self, model, sess_options=None, providers=None):
        self.calls.append({"model": model, "providers": providers})
        self.before()
        session = RealSession(model, sess_options=sess_options, providers=[CPU])
        if self.cuda:
            session.get_providers = lambda: [CUDA, CPU]
        self.after()
        return session


RealSession = ort.InferenceSession


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(tiny_model())
    return path


@pytest.fixture(autouse=True)
def fresh_driver_probe():
    engines_module.nvidia_driver.cache_clear()
    yield
    engines_module.nvidia_driver.cache_clear()


def onnxruntime_on(device: str, model_file, **kwargs) -> Classifier:
    """The file on onnxruntime (ENGINE=onnxruntime), DEVICE=`device`."""
    return Classifier(model_file, device, 1, 1, engine="onnxruntime", **kwargs)


def test_cuda_is_asked_for_with_deliberate_options(model_file, monkeypatch):
    """DEVICE=cuda: onnxruntime gets the CUDA provider with HEURISTIC cuDNN search (not
    its EXHAUSTIVE default) and an arena that grows by what is asked, and nothing else."""
    recorder = Recorder(cuda=True)
    monkeypatch.setattr(ort, "InferenceSession", recorder)
    model = onnxruntime_on("cuda", model_file)  # recorded, then run on the CPU
    (call,) = recorder.calls
    assert call["providers"] == [(CUDA, EXPECTED_CUDA_OPTIONS)]
    assert requested_providers("cuda") == [(CUDA, EXPECTED_CUDA_OPTIONS)]
    assert requested_providers("cuda", fallback=True) == [(CUDA, EXPECTED_CUDA_OPTIONS), CPU]
    assert requested_providers("cpu") == [CPU]
    assert model.way.device == "cuda" and model.serving["provider"] == CUDA
    assert model.serving["instructions"] == "CUDA"


def test_device_cuda_without_cuda_refuses_to_start(model_file):
    """No CUDA here: onnxruntime falls back to the CPU, and DEVICE=cuda must not."""
    with pytest.raises(DeviceUnavailable, match="could not use CUDA"):
        Classifier(model_file, "cuda", 1, 1)


def test_auto_warns_loudly_when_a_driver_is_here_but_the_cpu_is_used(
    model_file, monkeypatch, caplog
):
    monkeypatch.setattr(engines_module, "nvidia_driver", lambda: "NVRM version: 580.95")
    recorder = Recorder()
    monkeypatch.setattr(ort, "InferenceSession", recorder)
    with caplog.at_level(logging.WARNING, logger="contract.engines"):
        model = Classifier(model_file, "auto", 1, 1)
    assert model.serving["provider"] == CPU and model.way.device == "cpu"
    if CUDA in ort.get_available_providers():  # onnxruntime-gpu: CUDA was asked for first
        assert recorder.calls[0]["providers"] == [(CUDA, EXPECTED_CUDA_OPTIONS), CPU]
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "NVIDIA GPU is here but this model runs on the CPU" in record.getMessage()
    assert record.driver == "NVRM version: 580.95" and "DEVICE=cuda" in record.reason

    caplog.clear()
    monkeypatch.setattr(engines_module, "nvidia_driver", lambda: None)
    with caplog.at_level(logging.WARNING, logger="contract.engines"):
        onnxruntime_on("auto", model_file)
    assert recorder.calls[-1]["providers"] == [CPU]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no driver: quiet


def test_driver_probe_reads_the_kernel_module_version(monkeypatch, tmp_path):
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05\nGCC ...\n")
    real_path = engines_module.Path
    monkeypatch.setattr(
        engines_module,
        "Path",
        lambda p: version if p == "/proc/driver/nvidia/version" else real_path(p),
    )
    assert engines_module.nvidia_driver().endswith("Kernel Module  580.95.05")


def run_sizes(model: Classifier, monkeypatch) -> list[int]:
    """The batch sizes warm_up hands to onnxruntime (then the self-check's references,
    4 images in tiny_model, at most the batch cap at a time)."""
    sizes = []
    session = model.engine.session
    real_run = session.run

    def run(names, feeds):
        sizes.append(len(feeds[INPUT_NAME]))
        return real_run(names, feeds)

    monkeypatch.setattr(session, "run", run)
    model.warm_up()
    return sizes


def test_warm_up_on_cuda_runs_powers_of_two_up_to_the_batch_cap(model_file, monkeypatch):
    monkeypatch.setattr(ort, "InferenceSession", Recorder(cuda=True))
    model = onnxruntime_on("cuda", model_file, max_batch_size=128)
    assert run_sizes(model, monkeypatch) == [128, 64, 32, 16, 8, 4, 2, 1, 4]
    assert model.ready
    model = onnxruntime_on("cuda", model_file, max_batch_size=100)  # the cap, then powers
    assert run_sizes(model, monkeypatch) == [100, 64, 32, 16, 8, 4, 2, 1, 4]
    assert warm_up_sizes(1, "cuda") == [1]


def test_warm_up_on_the_cpu_runs_the_batch_cap_and_one(model_file, monkeypatch):
    model = onnxruntime_on("cpu", model_file)
    assert model.max_batch_size == 64  # BATCH_MAX_SIZE's default
    assert run_sizes(model, monkeypatch) == [64, 1, 4]
    assert warm_up_sizes(256, "cpu") == [256, 1]
    assert warm_up_sizes(1, "cpu") == [1]


def test_a_model_with_a_fixed_batch_of_one_is_refused_at_warm_up(tmp_path):
    """Such a file loads and answers one image, then fails every batch: it is not served,
    and the reason says why."""
    path = tmp_path / "fixed.onnx"
    path.write_bytes(tiny_model(batch=1))
    model = onnxruntime_on("cpu", path, max_batch_size=8)
    assert model.run(make_images(np.arange(1), seed=0))[OUTPUT_NAME].shape == (1, 100)
    with pytest.raises(InvalidModel, match=r"batches of exactly 1 image\(s\).*1 to 8") as raised:
        model.warm_up()
    assert raised.value.message.startswith("fixed.onnx: ")
    assert not model.ready
    # With a cap of one, every batch it gets is one image: then it is fine.
    onnxruntime_on("cpu", path, max_batch_size=1).warm_up()


def test_warm_up_failure_names_the_batch_size(model_file, monkeypatch):
    model = onnxruntime_on("cpu", model_file, max_batch_size=16)
    session = model.engine.session
    real_run = session.run

    def run(names, feeds):
        if len(feeds[INPUT_NAME]) > 1:
            raise RuntimeError("out of memory")
        return real_run(names, feeds)

    monkeypatch.setattr(session, "run", run)
    with pytest.raises(InvalidModel, match=r"warm-up inference failed \(a batch of 16\)"):
        model.warm_up()
    assert not model.ready


@pytest.mark.parametrize("when", ["before the session is built", "after it is built"])
def test_version_is_the_hash_of_the_bytes_the_session_runs(model_file, monkeypatch, when):
    """The file is replaced while it loads: what is served is the first file's weights,
    card and version, together, never one file's weights under the other's version."""
    first, second = model_file.read_bytes(), tiny_model("other", seed=1)
    assert first != second

    def replace():
        model_file.write_bytes(second)

    recorder = Recorder(**{"before" if when.startswith("before") else "after": replace})
    monkeypatch.setattr(ort, "InferenceSession", recorder)
    model = onnxruntime_on("cpu", model_file)
    assert model_file.read_bytes() == second  # it was replaced
    assert recorder.calls[0]["model"] == first  # the session got the bytes read once
    assert model.version == content_version(first) != content_version(second)
    assert model.model_id == "tiny"
    images = make_images(np.arange(4), seed=3)
    expected = RealSession(first, providers=[CPU]).run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    np.testing.assert_array_equal(model.run(images)[OUTPUT_NAME], expected)


def test_run_fetches_only_the_outputs_asked_for(model_file):
    model = onnxruntime_on("cpu", model_file)
    images = make_images(np.arange(3), seed=0)
    assert sorted(model.run(images)) == sorted([OUTPUT_NAME, FEATURES_NAME])
    only = model.run(images, outputs=[OUTPUT_NAME])
    assert list(only) == [OUTPUT_NAME] and only[OUTPUT_NAME].shape == (3, 100)
