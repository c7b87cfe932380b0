"""Every exported file carries its own proof (contract/selfcheck.py, training/proof.py):
reference test images, the outputs they must give and a tolerance per output, checked by
the service before the file is served, by the export before it is written, and by
export-triton before it is copied. The measures on hand-worked arrays; the files the
training CLI exported; tampered files refused by name while a good one beside them is
served."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from contract import selfcheck
from contract.classifier import Classifier
from contract.modelcard import FAMILIARITY_NAME, FEATURES_NAME, INPUT_NAME, OUTPUT_NAME
from contract.selfcheck import SelfCheck, Tolerance
from service.errors import InvalidModel
from tests.conftest import VAL_SIZE
from tests.service_helpers import encode, serve, upload
from training import proof, triton
from training.data import load
from training.errors import ExportError

SMALL, LARGE = "cifar100-712868", "cifar100-5735844"


# --- The measures, on arrays worked by hand --------------------------------------------


def test_each_kind_measures_what_it_says():
    expected = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)
    got = np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]], np.float32)  # row 0 moved by 0.1
    assert Tolerance("p", "max_abs", 1).measure(got, expected) == pytest.approx(0.1)
    assert Tolerance("p", "mean_abs", 1).measure(got, expected) == pytest.approx(0.2 / 6)
    assert Tolerance("p", "top1_disagreements", 1).measure(got, expected) == 0
    flipped = np.array([[0.1, 0.2, 0.7], [0.2, 0.5, 0.3]], np.float32)
    assert Tolerance("p", "top1_disagreements", 1).measure(flipped, expected) == 2
    # Relative to the largest |expected| when that is above 1, else absolute.
    features = np.array([[10.0, -40.0]], np.float32)
    moved = np.array([[12.0, -40.0]], np.float32)
    assert Tolerance("f", "max_relative", 1).measure(moved, features) == pytest.approx(2 / 40)
    assert Tolerance("f", "max_relative", 1).measure(got, expected) == pytest.approx(0.1)
    # A NaN is as far as can be.
    nan = expected.copy()
    nan[1, 2] = np.nan
    assert Tolerance("p", "max_abs", 1).measure(nan, expected) == np.inf
    with pytest.raises(ValueError, match="unknown tolerance kind"):
        Tolerance("p", "median", 1)
    # Per-value bounds: inclusive at both ends; a NaN is outside.
    ranks = np.array([[0.25], [0.5], [np.nan]], np.float32)
    low, high = np.float32([[0.25], [0.375], [0.0]]), np.float32([[0.5], [0.375], [1.0]])
    assert Tolerance("r", "outside_bounds", 0).measure(ranks, ranks, (low, high)) == 2


def small_check(limit: float = 0.05) -> SelfCheck:
    images = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
    expected = {"p": np.array([[0.2, 0.8], [0.6, 0.4]], np.float32)}
    return SelfCheck(images, expected, [Tolerance("p", "max_abs", limit, "a reason")])


def test_failures_name_the_output_the_difference_and_the_tolerance():
    check = small_check()
    assert check.failures({"p": check.expected["p"] + 0.01}) == []
    (problem,) = check.failures({"p": check.expected["p"] + np.float32([[0, 0.25], [0, 0]])})
    assert problem == "p differ by up to 0.25 on 2 reference images, at most 0.05 (a reason)"
    assert check.failures({}) == ["it has no output p, which it promises"]
    assert "shape (1, 2)" in check.failures({"p": check.expected["p"][:1]})[0]
    top1 = SelfCheck(check.images, check.expected, [Tolerance("p", "top1_disagreements", 0)])
    (problem,) = top1.failures({"p": check.expected["p"][:, ::-1]})
    assert problem == "the top-1 class of p differs on 2 of 2 reference images, at most 0"


def test_metadata_round_trip_is_exact_and_malformed_metadata_is_a_reason():
    check = small_check()
    back = SelfCheck.from_metadata(check.to_metadata())
    assert np.array_equal(back.images, check.images) and back.images.dtype == np.uint8
    assert np.array_equal(back.expected["p"], check.expected["p"])
    assert back.tolerances == check.tolerances
    bounded = SelfCheck(
        check.images,
        check.expected,
        [Tolerance("p", "outside_bounds", 0)],
        bounds={"p": (check.expected["p"] - 1, check.expected["p"] + 1)},
    )
    back = SelfCheck.from_metadata(bounded.to_metadata())
    assert all(np.array_equal(a, b) for a, b in zip(back.bounds["p"], bounded.bounds["p"],
                                                    strict=True))  # fmt: skip
    assert back.failures({"p": check.expected["p"] + 0.5}) == []
    assert "outside the values" in back.failures({"p": check.expected["p"] + 2})[0]
    with pytest.raises(ValueError, match="no bounds stored for p"):
        SelfCheck(check.images, check.expected, [Tolerance("p", "outside_bounds", 0)])
    stored = json.loads(check.to_metadata())
    cases = {
        "missing": ({k: v for k, v in stored.items() if k != "images"}, "missing 'images'"),
        "format": ({**stored, "format_version": 99}, "unknown format 99"),
        "bytes": (
            {**stored, "images": {**stored["images"], "shape": [3, 32, 32, 3]}},
            "bytes for an array of shape",
        ),
        "dtype": ({**stored, "images": {**stored["images"], "dtype": "<f8"}}, "not '<f8'"),
        "base64": ({**stored, "images": {**stored["images"], "data": "%%%"}}, "unreadable"),
        "tolerance": ({**stored, "tolerances": [{"output": "q", "kind": "max_abs",
                                                  "limit": 1}]}, "which has no reference"),
        "infinite": ({**stored, "tolerances": [{"output": "p", "kind": "max_abs",
                                                 "limit": float("inf")}]}, "finite"),
        "none": ({**stored, "tolerances": []}, "promise nothing"),
    }  # fmt: skip
    for name, (data, reason) in cases.items():
        with pytest.raises(ValueError, match=reason):
            SelfCheck.from_metadata(json.dumps(data))
        assert name
    with pytest.raises(ValueError, match="unreadable"):
        SelfCheck.from_metadata("{not json")


def test_binomial_bound_is_what_the_binomial_distribution_gives():
    """Against the binomial sum written out: the bound is the smallest k whose upper tail
    is at most proof.FALSE_REFUSAL."""
    from math import comb

    for n, p in ((64, 0.011), (64, 0.005), (32, 0.1), (64, 0.0)):

        def tail(k, n=n, p=p):  # P(X > k)
            return sum(comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1, n + 1))

        k = proof.disagreement_bound(n, p)
        assert tail(k) <= proof.FALSE_REFUSAL
        assert k == 0 or tail(k - 1) > proof.FALSE_REFUSAL
    # Clopper-Pearson: at the bound, seeing at most k of n has probability 1 - confidence.
    from scipy import stats

    upper = proof.upper_rate(3, 500)
    assert stats.binom.cdf(3, 500, upper) == pytest.approx(0.001, rel=1e-6)
    assert proof.upper_rate(0, 500) > 0 and proof.upper_rate(5, 5) == 1.0


# --- The files the training CLI exported ---------------------------------------------


def outputs_of(path, images) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_NAME: images}), strict=True))


@pytest.mark.parametrize("model_id", [SMALL, LARGE])
def test_an_export_carries_test_images_and_its_own_outputs_for_them(models_dir, cifar_tarball,
                                                                     model_id):  # fmt: skip
    path = models_dir / f"{model_id}.onnx"
    check = selfcheck.read({p.key: p.value for p in onnx.load(path).metadata_props})
    assert check is not None and len(check.images) == proof.REFERENCE_IMAGES
    test = {image.tobytes() for image in load(cifar_tarball, val_size=VAL_SIZE).test.images}
    assert all(image.tobytes() in test for image in check.images)
    # The references are what onnxruntime computes on the file, here.
    now = outputs_of(path, check.images)
    assert sorted(check.expected) == sorted(now)
    for name, values in now.items():
        np.testing.assert_allclose(check.expected[name], values, rtol=1e-5, atol=1e-6)
    kinds = {(t.output, t.kind): t.limit for t in check.tolerances}
    assert kinds == {(OUTPUT_NAME, "max_abs"): 1e-4, (FEATURES_NAME, "max_relative"): 1e-4,
                     (FAMILIARITY_NAME, "outside_bounds"): 0}  # fmt: skip
    # Each image's familiarity bounds hold its value, and on the trained small model are
    # narrow enough to see a move as large as the int8 gate allows (0.05): the rounding
    # band spans a few validation ranks at most (measured: up to 21 of 500). The large
    # test model trains one epoch: its probabilities are so flat that GEN, half of the
    # default score, gives every image the same value to within rounding, so its bounds
    # may span everything.
    low, high = check.bounds[FAMILIARITY_NAME]
    values = check.expected[FAMILIARITY_NAME]
    assert ((low <= values) & (values <= high)).all()
    if model_id == "cifar100-712868":
        assert 0 <= (high - low).max() < 0.05
    assert check.source["what"] == "this file" and check.verified_on[0]["what"] == "verified"
    assert check.verified_on[0]["provider"] == "CPUExecutionProvider"
    # The service runs it at warm-up, and records how long that took (python -m bench
    # engines measures it on each engine).
    model = Classifier(path, "cpu", 1, 1, max_batch_size=8, precision="float32")
    model.warm_up()
    assert model.ready and model.self_check_seconds > 0


def tampered(source, target, name: str, factor: float) -> None:
    """`source` with the initializer `name` scaled by `factor`, its metadata (card and
    self-check) kept."""
    proto = onnx.load(source)
    (tensor,) = [t for t in proto.graph.initializer if t.name == name]
    values = numpy_helper.to_array(tensor)
    tensor.CopyFrom(numpy_helper.from_array((values * factor).astype(values.dtype), tensor.name))
    onnx.save(proto, target)


def dense_kernel(path) -> str:
    """The name of the classifier's weights: the initializer of the first MatMul or Gemm
    found walking back from the Softmax (the familiarity head is elsewhere)."""
    proto = onnx.load(path)
    producer = {name: node for node in proto.graph.node for name in node.output}
    inits = {t.name for t in proto.graph.initializer}
    (softmax,) = [n for n in proto.graph.node if n.op_type == "Softmax"]
    pending = list(softmax.input)
    while pending:
        node = producer.get(pending.pop(0))
        if node is None:
            continue
        if node.op_type in ("MatMul", "Gemm"):
            return next(i for i in node.input if i in inits)
        pending.extend(node.input)
    raise AssertionError("no dense layer before the softmax")


def test_a_file_whose_weights_changed_is_refused_and_the_good_one_still_serves(
    monkeypatch, model_copy, images
):
    small = model_copy / f"{SMALL}.onnx"
    tampered(small, small, dense_kernel(small), 1.01)  # 1 % on the classifier's weights
    with serve(monkeypatch, model_copy) as client:
        listing = client.get("/models").json()
        reason = listing["failed"][f"{SMALL}.onnx"]
        assert "onnxruntime float32 on the CPU: it does not compute here what it promises" in reason
        assert "openvino float32 on the CPU: it does not compute here what it promises" in reason
        assert "probabilities differ by up to" in reason and "at most 0.0001" in reason
        assert [m["model_id"] for m in listing["models"]] == [LARGE]
        assert client.get("/health/ready").status_code == 200
        assert client.post("/predict", files=upload(encode(images[0]))).status_code == 200


def test_a_file_without_a_self_check_is_not_served(monkeypatch, model_copy):
    small = model_copy / f"{SMALL}.onnx"
    proto = onnx.load(small)
    kept = [p for p in proto.metadata_props if p.key != selfcheck.METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, small)
    with serve(monkeypatch, model_copy) as client:
        reason = client.get("/models").json()["failed"][f"{SMALL}.onnx"]
        assert "carries no self-check" in reason and "export it again" in reason


def test_the_export_refuses_a_file_that_breaks_its_promise(models_dir, tmp_path):
    path = models_dir / f"{SMALL}.onnx"
    check = proof.read(onnx.load(path))
    assert proof.checked(onnx.load(path), check).verified_on  # the good file passes
    tampered(path, tmp_path / "bad.onnx", dense_kernel(path), 1.01)
    with pytest.raises(ExportError, match="does not keep its own promise on this machine"):
        proof.checked(onnx.load(tmp_path / "bad.onnx"), check)


def test_export_triton_refuses_a_file_that_breaks_its_promise(models_dir, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(models_dir / f"{LARGE}.onnx", models)
    small = models_dir / f"{SMALL}.onnx"
    tampered(small, models / f"{SMALL}.onnx", dense_kernel(small), 1.01)
    out = tmp_path / "repo"
    assert triton.main(["export-triton", "--models-dir", str(models), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"{SMALL}.onnx" in error and "probabilities differ by up to" in error
    assert not out.exists()  # one bad file writes nothing
    (models / f"{SMALL}.onnx").unlink()
    assert triton.main(["export-triton", "--models-dir", str(models), "--out", str(out)]) == 0


def test_classifier_refuses_a_self_check_that_cannot_hold(models_dir, tmp_path):
    """The check itself, not just its plumbing: the same file with a tolerance of 0 on a
    reference moved by one part in a million is refused."""
    path = models_dir / f"{SMALL}.onnx"
    proto = onnx.load(path)
    check = proof.read(proto)
    moved = dict(check.expected)
    moved[OUTPUT_NAME] = moved[OUTPUT_NAME] * np.float32(1 + 1e-6) + np.float32(1e-6)
    strict = SelfCheck(check.images, moved, [Tolerance(OUTPUT_NAME, "max_abs", 0.0)])
    proof.attach(proto, strict)
    onnx.save(proto, tmp_path / "strict.onnx")
    model = Classifier(tmp_path / "strict.onnx", "cpu", 1, 1, max_batch_size=4)
    with pytest.raises(InvalidModel, match="probabilities differ by up to"):
        model.warm_up()
    assert not model.ready
