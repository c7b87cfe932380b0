"""Each precision's promise pinned end to end, at export and where the file loads: outputs
moved by half the limit pass, by twice or four times it are refused, for float32 (the
export's parity with Keras), bfloat16 (training/bfloat16.py), float16 and int8 (the twins'
gates). The limits are written here as the documentation states them, not read from the
code, so loosening one (by 100-fold, or by 2) fails a test here rather than passing
every test on real exported files, whose tampering overshoots any tolerance."""

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy import stats

from contract.classifier import Classifier
from contract.errors import InvalidModel
from contract.modelcard import FEATURES_NAME, OUTPUT_NAME
from contract.selfcheck import Promise
from tests.test_classifier import tiny_model
from tests.test_engines import CPU_BF16, REFERENCES, reference_check, with_check
from training import bfloat16, float16, proof, quantize
from training import export as exporter

# The documented limits (docs/exported-files.md), independently of the code's constants.
PROBABILITIES_LIMIT = {"float32": 1e-4, "bfloat16": 0.05, "float16": 5e-3}
INT8_ACCURACY_DROP = 0.01
INT8_FAMILIARITY_MEAN = 0.05
MOVES = [(0.5, True), (2, False), (4, False)]  # times the limit, kept?


def file_with(precision: str, moved: float) -> bytes:
    """tiny_model carrying the promise `precision` asks of it, as the export writes it,
    with its reference probabilities moved by `moved`."""
    content = tiny_model()
    check = reference_check(content, moved)
    if precision == "float32":
        own = [proof.Tolerance(OUTPUT_NAME, "max_abs", exporter.MAX_ABS_DIFF)]
        return with_check(content, dataclasses.replace(check, tolerances=own))
    if precision == "bfloat16":  # the float32 file's other promise
        return with_check(content, check)
    tolerances = float16.float16_tolerances(len(check.images), check)
    twin = dataclasses.replace(check, tolerances=tolerances, precisions={})
    return with_check(content, twin, precision="float16")


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(("times", "kept"), MOVES)
def test_probabilities_moved_past_a_promise_are_refused_where_the_file_loads(
    precision, times, kept, tmp_path
):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(file_with(precision, times * PROBABILITIES_LIMIT[precision]))
    asked = {"precision": "bfloat16"} if precision == "bfloat16" else {"engine": "onnxruntime"}
    if precision == "bfloat16" and not CPU_BF16:  # no bfloat16 way on this CPU to load it in
        with pytest.raises(InvalidModel, match="no bfloat16 instructions"):
            Classifier(path, "cpu", 1, 1, **asked)
        return
    model = Classifier(path, "cpu", 1, 1, **asked)
    if kept:
        model.warm_up()
        assert model.ready and model.way.precision == precision
    else:
        with pytest.raises(InvalidModel, match="probabilities differ by up to"):
            model.warm_up()


def int8_bound(disagreements: int, images: int, references: int) -> int:
    """What the int8 promise allows on `references` images, computed with scipy: the
    Clopper-Pearson 99.9 % upper rate, then the smallest count a file at that rate exceeds
    with probability at most one in a million."""
    rate = stats.beta.ppf(0.999, disagreements + 1, images - disagreements)
    return next(k for k in range(references + 1) if stats.binom.sf(k, references, rate) <= 1e-6)


@pytest.mark.parametrize("extra", [0, 1, "double"])
def test_top1_flips_past_the_int8_promise_are_refused_where_the_file_loads(extra, tmp_path):
    """An int8 file measured at 3 disagreements in 1,000 test images: as many flipped
    references as its bound allows are served, one more or twice as many are not."""
    content = tiny_model()
    check = reference_check(content)
    bound = int8_bound(3, 1000, len(REFERENCES))
    flips = bound + 1 if extra == 1 else 2 * (bound + 1) if extra == "double" else bound
    probabilities = check.expected[OUTPUT_NAME].copy()
    rows = np.arange(flips)
    top = probabilities[rows].argmax(1)
    probabilities[rows, top], probabilities[rows, (top + 1) % 100] = 0.0, 2.0  # a new top-1
    moved = dataclasses.replace(
        check, expected={OUTPUT_NAME: probabilities, FEATURES_NAME: check.expected[FEATURES_NAME]}
    )
    twin = quantize.int8_self_check(content, moved, 3, 1000)
    path = tmp_path / "tiny-int8.onnx"
    path.write_bytes(with_check(content, twin, precision="int8"))
    for engine in ("onnxruntime", "openvino"):
        model = Classifier(path, "cpu", 1, 1, engine=engine)
        if extra == 0:
            model.warm_up()
            assert model.way.precision == "int8"
        else:
            with pytest.raises(InvalidModel, match=f"differs on {flips} of 64 reference"):
                model.warm_up()


@pytest.mark.parametrize(("times", "kept"), MOVES)
def test_the_float32_export_refuses_probabilities_past_its_parity_limit(times, kept):
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(100), 16).astype(np.float32)
    features = rng.normal(0, 1, (16, 8)).astype(np.float32)
    moved = probabilities.copy()
    moved += np.float32(times * PROBABILITIES_LIMIT["float32"])
    problem = exporter.parity_failure(moved, features, probabilities, features)
    assert (problem is None) == kept


def moved_graph(proto: onnx.ModelProto, moved: float) -> onnx.ModelProto:
    """`proto` whose probabilities come out `moved` higher, every class (the top class of
    each image stays where it was)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    (softmax,) = [node for node in graph.node if node.op_type == "Softmax"]
    softmax.output[0] = "unmoved"
    shift = np.full((1, 100), moved, np.float32)
    graph.initializer.append(numpy_helper.from_array(shift, "shift"))
    graph.node.append(helper.make_node("Add", ["unmoved", "shift"], [OUTPUT_NAME]))
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    return copy


@pytest.mark.parametrize(("times", "kept"), MOVES)
def test_the_export_promises_bfloat16_only_within_its_limit(times, kept, monkeypatch):
    """What the export measures in bfloat16 (its emulation) moved by `times` the limit:
    the promise is written within it, not beyond (the float32 file is written either way)."""
    proto = onnx.load_from_string(tiny_model())
    check = reference_check(proto.SerializeToString())
    check = dataclasses.replace(check, precisions={})
    real = bfloat16.emulated
    delta = times * PROBABILITIES_LIMIT["bfloat16"]
    monkeypatch.setattr(bfloat16, "emulated", lambda p: moved_graph(real(p), delta))
    labels = np.arange(len(REFERENCES)) % 100
    written = bfloat16.with_promise(proto, check, REFERENCES, labels)
    assert ("bfloat16" in written.precisions) == kept
    if kept:
        promise: Promise = written.precisions["bfloat16"]
        limits = {(t.output, t.kind): t.limit for t in promise.tolerances}
        assert limits[(OUTPUT_NAME, "max_abs")] == PROBABILITIES_LIMIT["bfloat16"]
        assert promise.measured["probabilities_max_abs_difference"] == pytest.approx(
            delta, abs=0.01
        )


@pytest.mark.parametrize(("times", "kept"), MOVES)
def test_the_float16_gate_refuses_probabilities_past_its_limit(times, kept):
    comparison = {
        "probabilities_max_abs_difference": times * PROBABILITIES_LIMIT["float16"],
        "top1_agreement": 1.0,
        "limits": float16.LIMITS,
    }
    assert (float16.float16_problems(comparison) == []) == kept


@pytest.mark.parametrize(("times", "kept"), MOVES)
def test_the_int8_gate_refuses_accuracy_and_familiarity_past_its_limits(times, kept):
    images = 10_000
    dropped = round(times * INT8_ACCURACY_DROP * images)
    comparison = {
        "images": images,
        "float32_top1_accuracy": 0.5,
        "top1_accuracy": (0.5 * images - dropped) / images,
        "familiarity_mean_abs_difference": 0.0,
        "limits": quantize.LIMITS,
    }
    assert (quantize.int8_problems(comparison) == []) == kept
    comparison["top1_accuracy"] = 0.5
    comparison["familiarity_mean_abs_difference"] = times * INT8_FAMILIARITY_MEAN
    assert (quantize.int8_problems(comparison) == []) == kept
