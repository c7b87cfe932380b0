"""Which engine and precision serve a file (contract/engines.py, contract/classifier.py):
the ways a machine offers, in order, within DEVICE, ENGINE and PRECISION; OpenVINO
computing the same file as onnxruntime; the automatic choice taking bfloat16 only where
the CPU has it and the file's bfloat16 promise holds there, and falling back, with the
reason, where it does not. On a small graph of our contract (tests/test_classifier.py's),
so no training is needed. What this CPU offers decides which branch runs: each branch
asserts what is right for its CPU class."""

import dataclasses

import numpy as np
import onnx
import pytest

from contract import engines, selfcheck
from contract.classifier import Classifier
from contract.engines import Way, open_engine, openvino_has, ways
from contract.errors import DeviceUnavailable, InvalidModel
from contract.modelcard import FEATURES_NAME, OUTPUT_NAME, ModelCard
from contract.selfcheck import Promise, SelfCheck, Tolerance
from tests.test_classifier import tiny_model
from training import bfloat16
from training.synthetic import make_images

CPU_BF16 = openvino_has("BF16")
REFERENCES = make_images(np.arange(64) % 100, seed=5)


def cpu(engine: str, precision: str) -> Way:
    return Way(engine, precision, "cpu")


@pytest.fixture
def capabilities(monkeypatch):
    """Stand in for what OpenVINO's CPU plugin says of this CPU (the ways' input)."""

    def set_to(*names: str, missing: str | None = None) -> None:
        monkeypatch.setattr(engines, "openvino_missing", lambda: missing)
        monkeypatch.setattr(engines, "openvino_capabilities", lambda: list(names))
        monkeypatch.setattr(engines, "cuda_usable", lambda: False)

    return set_to


def test_a_cpu_with_bfloat16_offers_it_first_then_float32(capabilities):
    capabilities("FP32", "BF16", "INT8")
    offered, skipped = ways("float32")
    assert offered == [cpu("openvino", "bfloat16"), cpu("onnxruntime", "float32"),
                       cpu("openvino", "float32")]  # fmt: skip
    assert skipped == []
    assert ways("float16")[0] == [cpu("onnxruntime", "float16")]


INT8_FIRST = [(["avx2", "avx512_vnni"], "onnxruntime"),
              (["avx2", "amx_tile", "amx_int8"], "openvino")]  # fmt: skip


@pytest.mark.parametrize(("flags", "first"), INT8_FIRST)
def test_int8_goes_to_openvino_first_only_where_the_cpu_has_amx(
    capabilities, monkeypatch, flags, first
):
    capabilities("FP32", "INT8")
    monkeypatch.setattr(engines.hardware, "cpu", lambda: {"cpu_flags": flags})
    offered, _ = ways("int8")
    assert [way.engine for way in offered] == [
        first,
        {"onnxruntime": "openvino", "openvino": "onnxruntime"}[first],
    ]
    assert {way.precision for way in offered} == {"int8"}


def test_a_cpu_without_bfloat16_says_so_and_offers_float32(capabilities):
    capabilities("FP32", "INT8")
    offered, skipped = ways("float32")
    assert offered == [cpu("onnxruntime", "float32"), cpu("openvino", "float32")]
    assert skipped == ["openvino bfloat16: this CPU has no bfloat16 instructions (OpenVINO "
                       "reports FP32, INT8)"]  # fmt: skip
    offered, skipped = ways("float32", precision="bfloat16")
    assert offered == [] and "no bfloat16 instructions" in skipped[0]


def test_engine_and_precision_narrow_the_ways(capabilities):
    capabilities("FP32", "BF16")
    assert ways("float32", engine="onnxruntime")[0] == [cpu("onnxruntime", "float32")]
    assert ways("float32", engine="openvino")[0] == [cpu("openvino", "bfloat16"),
                                                     cpu("openvino", "float32")]  # fmt: skip
    offered, skipped = ways("float32", precision="float32")
    assert offered == [cpu("onnxruntime", "float32"), cpu("openvino", "float32")]
    assert skipped == ["openvino bfloat16 on the CPU: not asked for (ENGINE=auto, "
                       "PRECISION=float32)"]  # fmt: skip
    assert ways("float32", precision="bfloat16")[0] == [cpu("openvino", "bfloat16")]
    # A twin is computed in its own precision: PRECISION names a float32 file's.
    assert {way.precision for way in ways("int8", precision="bfloat16")[0]} == {"int8"}


def test_without_openvino_onnxruntime_serves_and_the_reason_is_kept(capabilities):
    capabilities(missing="not installed (pip install openvino)")
    offered, skipped = ways("float32")
    assert offered == [cpu("onnxruntime", "float32")]
    assert skipped == ["openvino: not installed (pip install openvino)"]
    assert ways("float32", engine="openvino")[0] == []


def test_a_gpu_takes_onnxruntime_cuda_and_openvino_cannot_be_forced_there(
    capabilities, monkeypatch
):
    capabilities("FP32", "BF16")
    monkeypatch.setattr(engines, "cuda_usable", lambda: True)
    assert ways("float32")[0] == [Way("onnxruntime", "float32", "cuda")]
    assert ways("float16", device="cuda")[0] == [Way("onnxruntime", "float16", "cuda")]
    assert ways("float32", device="cpu")[0][0] == cpu("openvino", "bfloat16")
    with pytest.raises(DeviceUnavailable, match="ENGINE=openvino runs on the CPU only"):
        ways("float32", engine="openvino", device="cuda")


def test_openvino_computes_the_file_as_onnxruntime_does():
    """The same bytes, read by both: the ports match, and in float32 the outputs agree to
    float32 rounding at every batch size the batcher sends."""
    content = tiny_model()
    ort = open_engine(content, cpu("onnxruntime", "float32"), name="tiny", threads=1)
    ov = open_engine(content, cpu("openvino", "float32"), name="tiny", threads=1)
    assert ov.inputs == ort.inputs and ov.outputs == ort.outputs
    assert ov.describe()["engine"] == "openvino" and ov.describe()["precision"] == "float32"
    names = [OUTPUT_NAME, FEATURES_NAME]
    for size in (1, 7, 64):
        images = REFERENCES[:size]
        for got, expected in zip(ov.run(names, images), ort.run(names, images), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def reference_check(content: bytes, moved: float = 0.0) -> SelfCheck:
    """A self-check on REFERENCES as an export writes it for `content`: what onnxruntime
    computes for them in float32 (plus `moved` on every probability, which moves none of
    their top classes), the float32 parity tolerance, and a bfloat16 promise
    (training/bfloat16.py)."""
    engine = open_engine(content, cpu("onnxruntime", "float32"), name="tiny", threads=1)
    probabilities, features = engine.run([OUTPUT_NAME, FEATURES_NAME], REFERENCES)
    probabilities = probabilities.copy()
    probabilities += np.float32(moved)
    check = SelfCheck(REFERENCES, {OUTPUT_NAME: probabilities, FEATURES_NAME: features},
                      [Tolerance(OUTPUT_NAME, "max_abs", 1e-4)])  # fmt: skip
    return dataclasses.replace(
        check, precisions={"bfloat16": Promise(bfloat16.tolerances(check), {"how": "test"})}
    )


def with_check(content: bytes, check: SelfCheck, **training: str) -> bytes:
    """`content` carrying `check` as its self-check (and `training` in its card)."""
    proto = onnx.load_from_string(content)
    props = {p.key: p.value for p in proto.metadata_props}
    props[selfcheck.METADATA_KEY] = check.to_metadata()
    if training:
        card = ModelCard.from_metadata(props)
        props.update(dataclasses.replace(card, training={**card.training, **training})
                     .to_metadata())  # fmt: skip
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    return proto.SerializeToString()


def promised(content: bytes, moved: float = 0.0) -> bytes:
    return with_check(content, reference_check(content, moved))


def test_auto_serves_bfloat16_where_the_cpu_has_it_and_float32_elsewhere(tmp_path):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(promised(tiny_model()))
    model = Classifier(path, "cpu", 1, 1)
    model.warm_up()
    if CPU_BF16:
        assert model.way == cpu("openvino", "bfloat16") and model.declined == []
        assert model.serving["instructions"] in ("AMX", "AVX-512 BF16")
    else:
        assert model.way == cpu("onnxruntime", "float32")
        assert any("no bfloat16 instructions" in reason for reason in model.declined)


def test_a_bfloat16_promise_that_fails_here_falls_back_to_float32_or_refuses_when_forced(
    tmp_path,
):
    """References moved by 0.06 on one class: beyond the bfloat16 promise (0.05) and the
    float32 one (1e-4). auto declines bfloat16 with the reason, then float32 fails too;
    a file whose float32 promise holds but bfloat16's does not is served in float32."""
    path = tmp_path / "tiny.onnx"
    path.write_bytes(promised(tiny_model(), moved=0.06))
    with pytest.raises(InvalidModel) as refused:
        Classifier(path, "cpu", 1, 1).warm_up()
    if CPU_BF16:
        assert "openvino bfloat16 on the CPU: it does not compute here what it promises" in (
            refused.value.message
        )
        assert "at most 0.05 (the bfloat16 limit measured at export)" in refused.value.message
    assert "onnxruntime float32 on the CPU: it does not compute here" in refused.value.message

    # Its float32 promise kept, its bfloat16 one broken: the bfloat16 tolerances tightened
    # below what bfloat16 rounding moves (1e-6), as a file that bfloat16 breaks.
    check = reference_check(tiny_model())
    strict = [dataclasses.replace(t, limit=1e-6) if t.kind == "max_abs" else t
              for t in check.precisions["bfloat16"].tolerances]  # fmt: skip
    check = dataclasses.replace(check, precisions={"bfloat16": Promise(strict)})
    path.write_bytes(with_check(tiny_model(), check))
    model = Classifier(path, "cpu", 1, 1)
    model.warm_up()
    assert model.way == cpu("onnxruntime", "float32")
    reason = " ".join(model.declined)
    if CPU_BF16:
        assert "openvino bfloat16 on the CPU: it does not compute here what it promises" in reason
        with pytest.raises(InvalidModel, match="openvino bfloat16 on the CPU: it does not"):
            Classifier(path, "cpu", 1, 1, precision="bfloat16").warm_up()
    else:
        assert "no bfloat16 instructions" in reason
        with pytest.raises(InvalidModel, match="no bfloat16 instructions"):
            Classifier(path, "cpu", 1, 1, precision="bfloat16")


def test_a_file_without_a_bfloat16_promise_is_never_built_in_bfloat16(tmp_path):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(tiny_model())  # its self-check promises float32 only
    model = Classifier(path, "cpu", 1, 1)
    assert model.way.precision == "float32"
    if CPU_BF16:
        assert model.declined == ["openvino bfloat16 on the CPU: the file carries no bfloat16 "
                                  "promise (its export did not measure one, or measured it "
                                  "outside the limits)"]  # fmt: skip
    with pytest.raises(InvalidModel, match="no engine here serves it as asked"):
        Classifier(path, "cpu", 1, 1, precision="bfloat16")
