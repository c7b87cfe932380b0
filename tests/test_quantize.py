"""int8 and float16 twins of an exported file (training/quantize.py, float16.py), made by the real
command line from the session's exported model: served by the service's Classifier,
cards that say how they were made and what they scored, an accuracy gate that refuses,
calibration on training images only, and float16 parity."""

import contextlib
import dataclasses
import hashlib
import io
import json
import shutil
from collections import Counter
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from scipy import stats

from contract import selfcheck
from contract.classifier import Classifier
from contract.modelcard import FAMILIARITY_NAME, INPUT_NAME, OUTPUT_NAME, ModelCard
from tests.conftest import VAL_SIZE
from tests.synthetic import make_images
from training import float16 as half
from training import quantize
from training import twins as twins_module
from training.__main__ import main
from training.data import load
from training.twins import as_trained

MODEL = "cifar100-712868"  # the small model: trained long enough to learn the classes


def export_args(models_dir, cifar_tarball, precision: str) -> list[str]:
    return [
        "export", "--model", MODEL, "--precision", precision, "--models-dir", str(models_dir),
        "--data-dir", str(cifar_tarball), "--val-size", str(VAL_SIZE),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data(cifar_tarball):
    return load(cifar_tarball, val_size=VAL_SIZE)


@pytest.fixture(scope="module")
def twins(models_dir, cifar_tarball, tmp_path_factory):
    """`export --precision int8` and `--precision float16` run once on a copy of the float
    export, recording every image the calibration was given and what was printed."""
    folder = tmp_path_factory.mktemp("twins")
    shutil.copy(models_dir / f"{MODEL}.onnx", folder)
    calibration: list[np.ndarray] = []
    real_init = quantize.CalibrationImages.__init__

    def recording(self, images, *args, **kwargs):
        calibration.append(np.array(images))
        real_init(self, images, *args, **kwargs)

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(quantize.CalibrationImages, "__init__", recording)
        for precision in ("int8", "float16"):
            assert main(export_args(folder, cifar_tarball, precision)) == 0
    return SimpleNamespace(
        folder=folder,
        float=folder / f"{MODEL}.onnx",
        int8=folder / f"{MODEL}-int8.onnx",
        float16=folder / f"{MODEL}-float16.onnx",
        calibration=calibration,
        printed=printed.getvalue(),
    )


def served(path) -> Classifier:
    """The file as the service opens it, warmed up as it is before it serves."""
    model = Classifier(path, "cpu", 1, 1, max_batch_size=8)
    model.warm_up()
    return model


def initializer_types(proto: onnx.ModelProto, nodes) -> set[int]:
    """The element types of the initializers that `nodes` read directly."""
    inits = {tensor.name: tensor.data_type for tensor in proto.graph.initializer}
    return {inits[name] for node in nodes for name in node.input if name in inits}


def test_int8_file_is_served_beside_the_float_one(twins):
    int8, reference = served(twins.int8), served(twins.float)
    assert int8.model_id == f"{MODEL}-int8"
    assert int8.output_names == reference.output_names  # probabilities, features, familiarity
    images = make_images(np.arange(100), seed=21)
    got, expected = int8.run(images), reference.run(images)
    np.testing.assert_allclose(got[OUTPUT_NAME].sum(axis=1), 1, atol=1e-5)  # a float softmax
    agreement = (got[OUTPUT_NAME].argmax(1) == expected[OUTPUT_NAME].argmax(1)).mean()
    assert agreement >= 0.9, agreement
    # The familiarity head computes in float from float features: it stays close.
    assert np.abs(got[FAMILIARITY_NAME] - expected[FAMILIARITY_NAME]).mean() < 0.05


def test_int8_graph_is_int8_where_the_compute_is_and_float_where_it_decides(twins):
    proto = onnx.load(twins.int8)
    ops = Counter(node.op_type for node in proto.graph.node)
    assert ops["QuantizeLinear"] and ops["DequantizeLinear"]
    convolutions = [node for node in proto.graph.node if node.op_type == "Conv"]
    assert len(convolutions) == 4
    # Every convolution reads int8 weights through a DequantizeLinear, none float ones.
    producer = {name: node for node in proto.graph.node for name in node.output}
    for conv in convolutions:
        weights = producer[conv.input[1]]
        assert weights.op_type == "DequantizeLinear"
        assert initializer_types(proto, [weights]) >= {TensorProto.INT8}
    kept = [node for node in proto.graph.node if node.name.startswith("familiarity")]
    kept += [node for node in proto.graph.node if node.op_type == "Softmax"]
    assert len(kept) > 5
    # float32 weights (int64 constants are axes and indices, not weights)
    assert initializer_types(proto, kept) - {TensorProto.INT64} <= {TensorProto.FLOAT}
    # ... and reads no int8 tensor: nothing of theirs comes through a DequantizeLinear.
    assert not [name for node in kept for name in node.input
                if name in producer and producer[name].op_type == "DequantizeLinear"]  # fmt: skip


def test_int8_card_says_how_it_was_made_and_what_it_scored(twins, data):
    card = served(twins.int8).card
    float_card = served(twins.float).card
    content = twins.float.read_bytes()
    assert card.training["precision"] == "int8"
    assert card.training["recipe"] == float_card.training["recipe"]
    assert card.training["converted_from"] == {
        "model_id": MODEL,
        "version": served(twins.float).version,
        "sha256": hashlib.sha256(content).hexdigest(),
    }
    quantization = card.training["quantization"]
    # The scheme chosen by measurement (README), as literals: a change to it is a decision.
    assert quantization["per_channel"] is True and quantization["reduce_range"] is True
    assert quantization["format"] == "QDQ"
    assert quantization["activations"] == "uint8, one scale per tensor"
    assert quantization["weights"].startswith("int8, symmetric, one scale per output channel, "
                                              "7-bit range")  # fmt: skip
    calibration = quantization["calibration"]
    assert calibration["method"] == "MinMax"
    assert calibration["images"] == quantize.CALIBRATION_IMAGES < len(data.train)
    assert calibration["source"].startswith("training split")
    kept = {group["why"]: group["nodes"] for group in quantization["kept_float"]}
    familiarity = kept[quantize.KEPT_FLOAT["off_path"]]
    assert any(name.startswith("familiarity") for name in familiarity)
    assert any("Softmax" in name for name in kept[quantize.KEPT_FLOAT["softmax"]])
    assert card.familiarity == float_card.familiarity and card.outputs == float_card.outputs

    # Its numbers are what the two files compute on the test split.
    int8 = served(twins.int8).run(data.test.images)[OUTPUT_NAME].argmax(1)
    reference = served(twins.float).run(data.test.images)[OUTPUT_NAME].argmax(1)
    evaluation = card.evaluation
    assert evaluation["images"] == len(data.test) and evaluation["split"] == "test"
    assert evaluation["top1_accuracy"] == pytest.approx((int8 == data.test.fine).mean())
    assert evaluation["float32_top1_accuracy"] == pytest.approx(
        (reference == data.test.fine).mean()
    )
    assert evaluation["top1_agreement"] == pytest.approx((int8 == reference).mean())
    assert evaluation["limits"] == {
        "top1_accuracy_drop": quantize.ACCURACY_DROP_LIMIT,
        "familiarity_mean_abs_difference": quantize.INT8_MAX_FAMILIARITY_DIFF,
    }
    assert evaluation["familiarity_mean_abs_difference"] <= quantize.INT8_MAX_FAMILIARITY_DIFF
    assert evaluation["top1_accuracy"] >= evaluation["float32_top1_accuracy"] - 0.01
    assert f"top-1 agreement with float32 {evaluation['top1_agreement']:.4f}" in twins.printed
    assert f"top-1 {evaluation['top1_accuracy']:.4f}" in twins.printed


def test_calibration_reads_training_images_only(twins, data):
    """The test split is what the accuracy promise is measured on: calibration never sees
    it (nor the validation images, which are no training images either)."""
    (calibration,) = twins.calibration  # one calibration: int8 (float16 has none)
    train = {image.tobytes() for image in data.train.images}
    held_out = {image.tobytes() for image in [*data.test.images, *data.val.images]}
    assert not train & held_out  # else the test below could not tell them apart
    assert len(calibration) == quantize.CALIBRATION_IMAGES
    assert len({image.tobytes() for image in calibration}) == len(calibration)
    assert all(image.tobytes() in train for image in calibration)


def worsened(**changes):
    """The twins' compare_with_float (training/twins.py, which every twin's export calls),
    measuring as it does, then reporting `changes` (a function of the measured comparison
    each) instead."""
    measured = twins_module.compare_with_float

    def compare(*args, **kwargs):
        comparison = measured(*args, **kwargs)
        return {**comparison, **{key: change(comparison) for key, change in changes.items()}}

    return compare


REFUSALS = {
    # A limit nothing can meet: better than the float model by more than 100 points.
    "limit -1": (
        {
            "INT8_TWIN": dataclasses.replace(
                quantize.INT8_TWIN, limits={**quantize.LIMITS, "top1_accuracy_drop": -1.0}
            )
        },
        {},
        "more than the -1 it may lose",
    ),
    # One image more than a point of the test split (500 images: 5 may be lost).
    "6 images": (
        {},
        {"top1_accuracy": lambda c: c["float32_top1_accuracy"] - 6 / c["images"]},
        "more than the 0.01 it may lose",
    ),
    "familiarity": (
        {},
        {"familiarity_mean_abs_difference": lambda c: 0.051},
        "its familiarity output moved by 0.0510 on average (at most 0.05)",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_gate_refuses_and_writes_nothing(twins, cifar_tarball, tmp_path, monkeypatch, capsys, case):
    settings, changes, reason = REFUSALS[case]
    shutil.copy(twins.float, tmp_path)
    for name, value in settings.items():
        monkeypatch.setattr(quantize, name, value)
    monkeypatch.setattr(twins_module, "compare_with_float", worsened(**changes))
    assert main(export_args(tmp_path, cifar_tarball, "int8")) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: the int8 model does not keep to the float model")
    assert reason in error and f"not writing {MODEL}-int8.onnx" in error
    assert [path.name for path in tmp_path.iterdir()] == [twins.float.name]


@pytest.mark.parametrize("points", [0.9, 1.0])
def test_gate_lets_through_a_drop_within_the_limit(twins, data, tmp_path, monkeypatch, points):
    """Up to and including the limit: 1 point of 500 test images is 5 images, not a float
    difference that rounding puts a hair above 0.01."""
    images = len(as_trained(data, served(twins.float).card).test)
    assert images == 500
    # 0.51 - 0.50 > 0.01 in floats: the drop of exactly one point, as the gate sees it.
    drop = worsened(
        float32_top1_accuracy=lambda c: 255 / images,
        top1_accuracy=lambda c: (255 - round(points / 100 * images)) / images,
    )
    monkeypatch.setattr(twins_module, "compare_with_float", drop)
    card = quantize.export_int8(twins.float, tmp_path / "int8.onnx", data)
    assert (tmp_path / "int8.onnx").exists() and card.model_id == f"{MODEL}-int8"


def test_quantize_int8_for_speed_only(twins, tmp_path):
    """What the benchmark calls: any exported file, any images, no gate, and a card that
    says nothing was measured."""
    target = tmp_path / "speed" / f"{MODEL}-int8.onnx"
    quantize.quantize_int8(twins.float, target, make_images(np.arange(40), seed=4))
    model = served(target)
    assert model.model_id == f"{MODEL}-int8" and model.card.evaluation is None
    calibration = model.card.training["quantization"]["calibration"]
    assert calibration["images"] == 40 and "speed only" in calibration["source"]
    with pytest.raises(ValueError, match="uint8"):
        quantize.quantize_int8(twins.float, target, np.zeros((4, 32, 32, 3), np.float32))


def test_kept_float_nodes_are_chosen_by_the_scheme(twins):
    proto = onnx.load(twins.float)
    quantize.name_nodes(proto)
    graph = proto.graph
    familiarity = {node.name for node in graph.node if node.name.startswith("familiarity")}
    assert familiarity and all(node.name for node in graph.node)
    softmax = {node.name for node in graph.node if node.op_type == "Softmax"}
    last = [node for node in graph.node if node.op_type in quantize.WEIGHTED_OPS
            and node.name not in familiarity][-1]  # fmt: skip

    def kept(**scheme) -> dict:
        return quantize.float_nodes(graph, quantize.Int8Scheme(**scheme))

    assert kept(float_layers=0, float_softmax=False) == dict.fromkeys(familiarity, "off_path")
    assert set(kept(float_layers=0)) == familiarity | softmax
    one = kept(float_layers=1)
    assert one[last.name] == "tail" and set(one) > familiarity | softmax | {last.name}
    assert not {n.name for n in graph.node if n.op_type == "Conv"} & set(kept(float_layers=3))
    # The default score reads the pixels: its head starts from the uint8 input too.
    assert any(INPUT_NAME in node.input for node in graph.node if node.name in familiarity)
    # A familiarity node on the probabilities' path (as the graph optimisation can leave
    # one, merging the head's Cast of the input with the network's) stays float by name.
    shared = next(node for node in graph.node if node.name not in familiarity
                  and INPUT_NAME in node.input)  # fmt: skip
    shared.name = "familiarity/merged"
    assert kept(float_layers=0, float_softmax=False)["familiarity/merged"] == "off_path"


def test_float16_file_matches_the_float_one(twins):
    float16, reference = served(twins.float16), served(twins.float)
    assert float16.model_id == f"{MODEL}-float16"
    assert float16.output_names == reference.output_names
    images = make_images(np.arange(100), seed=22)
    got, expected = float16.run(images), reference.run(images)
    for name, values in got.items():
        assert values.dtype == np.float32, name  # float32 outputs kept
    difference = np.abs(got[OUTPUT_NAME] - expected[OUTPUT_NAME]).max()
    assert 0 < difference <= half.FLOAT16_MAX_ABS_DIFF  # 0: not converted at all
    assert (got[OUTPUT_NAME].argmax(1) == expected[OUTPUT_NAME].argmax(1)).mean() >= 0.99

    proto = onnx.load(twins.float16)
    convolutions = [node for node in proto.graph.node if node.op_type == "Conv"]
    assert initializer_types(proto, convolutions) == {TensorProto.FLOAT16}
    head = [node for node in proto.graph.node if node.name.startswith("familiarity")]
    assert head and initializer_types(proto, head) - {TensorProto.INT64} == {TensorProto.FLOAT}

    card = float16.card
    assert card.training["precision"] == "float16"
    assert "not measured on a GPU" in card.training["float16"]["tested_on"]
    evaluation = card.evaluation
    assert evaluation["top1_agreement"] >= half.FLOAT16_MIN_AGREEMENT
    assert evaluation["probabilities_max_abs_difference"] <= half.FLOAT16_MAX_ABS_DIFF
    assert evaluation["limits"]["top1_agreement"] == half.FLOAT16_MIN_AGREEMENT
    assert ModelCard.from_metadata(card.to_metadata()) == card


FLOAT16_REFUSALS = {
    # Each limit, one at a time: the measured comparison with one value moved past it.
    "probabilities": ("probabilities_max_abs_difference", 0.0051, "5.10e-03 (limit 0.005)"),
    "features": ("features_max_relative_difference", 0.0021, "2.10e-03 (limit 0.002)"),
    "familiarity": ("familiarity_max_abs_difference", 0.031, "3.10e-02 (limit 0.03)"),
    "agreement": ("top1_agreement", 0.994, "top-1 agreement 0.9940 (at least 0.995)"),
}


@pytest.mark.parametrize("case", FLOAT16_REFUSALS)
def test_float16_gate_refuses_and_writes_nothing(
    twins, cifar_tarball, tmp_path, monkeypatch, capsys, case
):
    key, value, reason = FLOAT16_REFUSALS[case]
    shutil.copy(twins.float, tmp_path)
    monkeypatch.setattr(twins_module, "compare_with_float", worsened(**{key: lambda c: value}))
    assert main(export_args(tmp_path, cifar_tarball, "float16")) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: the float16 graph differs from the float32 one: ")
    assert reason in error and error.count("(limit") + error.count("(at least") == 1
    assert [path.name for path in tmp_path.iterdir()] == [twins.float.name]


def test_precision_needs_the_float_export(cifar_tarball, tmp_path, capsys):
    assert main(export_args(tmp_path, cifar_tarball, "int8")) == 2
    error = capsys.readouterr().err
    assert "does not exist" in error and f"python -m training export --model {MODEL}" in error
    weights = ["export", "--weights", str(tmp_path / "w.hdf5"), "--precision", "float16"]
    assert main([*weights, "--data-dir", str(cifar_tarball), "--val-size", str(VAL_SIZE)]) == 2
    assert "name it with --model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_held_out_classes_are_left_out_of_calibration_and_scoring(data):
    """A model trained without some classes is calibrated on the training images it saw
    and scored, like its own evaluation, on the test images of the classes it knows."""
    held_out = [data.class_names[3], data.class_names[17]]
    card = ModelCard(
        model_id=MODEL,
        class_names=data.class_names,
        superclass_names=data.superclass_names,
        fine_to_coarse=data.fine_to_coarse,
        parameter_count=1,
        training={"recipe": {"held_out_classes": held_out}},
    )
    trained = as_trained(data, card)
    for split in ("train", "val", "test"):
        labels = getattr(trained, split).fine
        assert not np.isin(labels, [3, 17]).any(), split
        assert len(labels) == np.isin(getattr(data, split).fine, [3, 17], invert=True).sum()
    original = dataclasses.replace(card, training={"recipe": "original Keras 2 experiment"})
    assert as_trained(data, original) is data


# --- The twins' self-checks: the float file's references, the twin's own promise ------


def self_check_of(path) -> selfcheck.SelfCheck:
    return selfcheck.read({p.key: p.value for p in onnx.load(path).metadata_props})


def test_twins_carry_the_float_files_references_and_their_gates_limits(twins):
    reference = self_check_of(twins.float)
    for path in (twins.int8, twins.float16):
        check = self_check_of(path)
        assert np.array_equal(check.images, reference.images)
        for name, values in reference.expected.items():
            assert np.array_equal(check.expected[name], values), name
        assert check.source["file"] == f"the float32 file, version {served(twins.float).version}"
        assert [v["what"] for v in check.verified_on] == ["verified"]
    n = len(reference.images)
    evaluation = served(twins.int8).card.evaluation
    kept = round(evaluation["top1_agreement"] * evaluation["images"])
    rate = stats.beta.ppf(0.999, evaluation["images"] - kept + 1, kept)  # Clopper-Pearson
    bound = int(stats.binom.isf(1e-6, n, rate))
    assert {(t.output, t.kind): t.limit for t in self_check_of(twins.int8).tolerances} == {
        (OUTPUT_NAME, "top1_disagreements"): bound,
        (FAMILIARITY_NAME, "mean_abs"): 0.05,
    }
    assert {(t.output, t.kind): t.limit for t in self_check_of(twins.float16).tolerances} == {
        (OUTPUT_NAME, "max_abs"): 5e-3,
        (OUTPUT_NAME, "top1_disagreements"): int(stats.binom.isf(1e-6, n, 0.005)),
        ("features", "max_relative"): 2e-3,
        (FAMILIARITY_NAME, "max_abs"): 0.03,
    }


def test_an_int8_file_that_breaks_its_promise_here_is_refused_and_the_float_one_served(
    twins, monkeypatch, tmp_path, images
):
    """What an int8 file whose kernels saturate looks like to the service: every
    convolution's weights read through a scale that is wrong (x4)."""
    from tests.service_helpers import encode, serve, upload

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(twins.float, folder)
    proto = onnx.load(twins.int8)
    producer = {name: node for node in proto.graph.node for name in node.output}
    inits = {t.name: t for t in proto.graph.initializer}
    for conv in [node for node in proto.graph.node if node.op_type == "Conv"]:
        scale = inits[producer[conv.input[1]].input[1]]
        values = numpy_helper.to_array(scale) * np.float32(4)
        scale.CopyFrom(numpy_helper.from_array(values, scale.name))
    onnx.save(proto, folder / twins.int8.name)
    with serve(monkeypatch, folder) as client:
        listing = client.get("/models").json()
        reason = listing["failed"][twins.int8.name]
        assert "does not compute here what it promises" in reason
        assert "familiarity differ by" in reason or "top-1 class of probabilities" in reason
        assert [m["model_id"] for m in listing["models"]] == [MODEL]
        response = client.post(f"/predict?model={MODEL}", files=upload(encode(images[0])))
        assert response.status_code == 200


def test_bench_schemes_measures_what_the_export_measured(twins, cifar_tarball, tmp_path):
    """`python -m bench.schemes` on the default scheme quantizes as the export did (same
    calibration, same scheme): its row is the int8 card's evaluation."""
    from bench import schemes

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(twins.float, folder)
    out = tmp_path / "schemes.json"
    default = next(name for name, scheme in schemes.SCHEMES.items() if scheme == quantize.INT8)
    argv = ["--models-dir", str(folder), "--data-dir", str(cifar_tarball), "--val-size",
            str(VAL_SIZE), "--pairs", "0", "--scheme", default, "--out", str(out)]  # fmt: skip
    assert schemes.main(argv) == 0
    (row,) = json.loads(out.read_text())["models"][MODEL].values()
    evaluation = served(twins.int8).card.evaluation
    assert row["top1"] == evaluation["top1_accuracy"]
    assert row["agreement"] == evaluation["top1_agreement"]
    assert row["familiarity_moved"] == evaluation["familiarity_mean_abs_difference"]
    assert row["self_check"] == "holds" and "speed_vs_float" not in row
