"""Exported ONNX files: uint8 in, probabilities (and features, familiarity) out, a model card
inside, and never written unless onnxruntime reproduces Keras and the familiarity reference."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from contract.modelcard import (
    FAMILIARITY_NAME,
    FEATURES_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    ModelCard,
)
from tests.conftest import SMALL_VAL_SIZE, VAL_SIZE
from tests.interrupt import kill_when
from tests.synthetic import CLASS_NAMES, FINE_TO_COARSE, SUPERCLASS_NAMES, make_images
from training import export as exporter
from training import familiarity, scores
from training.__main__ import main
from training.data import load
from training.errors import TrainingError
from training.models import MODEL_IDS, build_model
from training.recipe import Recipe
from training.train import best_checkpoint


def card_for(model: keras.Model) -> ModelCard:
    return ModelCard(
        model_id=model.name,
        class_names=CLASS_NAMES,
        superclass_names=SUPERCLASS_NAMES,
        fine_to_coarse=FINE_TO_COARSE,
        parameter_count=model.count_params(),
    )


def calibration(n: int = 200) -> dict[str, np.ndarray]:
    """export()'s familiarity images: synthetic training images of every class, and others
    to calibrate on."""
    labels = np.arange(n) % 100
    return {
        "train_images": make_images(labels, seed=21),
        "train_labels": labels,
        "val_images": make_images(labels, seed=22),
    }


def full_graph(model: keras.Model) -> tuple[onnx.ModelProto, familiarity.Familiarity]:
    """The graph export() checks, familiarity head included, and what that head was fit to."""
    fitted = exporter.fit_familiarity(model, **calibration())
    proto = exporter.to_onnx(model)
    familiarity.add_to_graph(proto, fitted)
    return proto, fitted


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_exported_file_is_self_describing(models_dir, workspace, model_id):
    proto = onnx.load(models_dir / f"{model_id}.onnx")
    (image_input,) = proto.graph.input
    assert image_input.name == INPUT_NAME
    assert image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = image_input.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 32, 32, 3]
    assert sorted(o.name for o in proto.graph.output) == ["familiarity", "features", OUTPUT_NAME]
    (output,) = [o for o in proto.graph.output if o.name == FAMILIARITY_NAME]
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == ["batch", 1]

    card = ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
    assert card.outputs == [o.name for o in proto.graph.output]  # the card says what it has
    # Fitted on every training image of every class, calibrated on every validation image.
    assert card.familiarity["training_images"] == 40 * 100 - VAL_SIZE
    assert card.familiarity["classes_without_training_images"] == []
    assert card.familiarity["validation_images"] == VAL_SIZE
    # The training mix the traffic page compares with: the validation split takes the same
    # share of every class of the 40 written per class.
    assert card.training_class_counts == [(40 * 100 - VAL_SIZE) // 100] * 100
    assert card.familiarity["score"] == scores.DEFAULT and card.familiarity["method"]
    quantiles = list(card.familiarity["validation_strangeness_quantiles"].values())
    assert quantiles == sorted(quantiles)
    run_dir = workspace / "runs" / model_id
    assert card.model_id == model_id
    assert card.class_names == CLASS_NAMES and card.superclass_names == SUPERCLASS_NAMES
    assert card.fine_to_coarse == FINE_TO_COARSE
    assert (
        card.parameter_count == {"cifar100-712868": 712868, "cifar100-5735844": 5735844}[model_id]
    )
    assert card.training["source"] == best_checkpoint(run_dir).name
    assert card.training["recipe"]["batch_size"] == 64
    assert card.training["method"] == Recipe(**card.training["recipe"]).method()
    assert card.training["choice"]["differs_from_default"]["batch_size"] == 64
    assert card.evaluation == json.loads((run_dir / "evaluation.json").read_text())


def test_onnx_matches_keras_on_any_batch_size(models_dir, workspace):
    model = keras.models.load_model(best_checkpoint(workspace / "runs" / "cifar100-712868"))
    session = ort.InferenceSession(
        models_dir / "cifar100-712868.onnx", providers=["CPUExecutionProvider"]
    )
    for n in (1, 7, 64):
        images = make_images(np.arange(n) % 100, seed=n)
        (probs,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})
        assert probs.shape == (n, 100)
        np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(probs, model.predict(images, verbose=0), atol=1e-4)


def test_familiarity_on_the_trained_model(models_dir, cifar_tarball):
    """On the validation images it was calibrated on, familiarity is uniform: each rank
    0, 1/V, ..., (V-1)/V once, give or take the image's own float32 distance against its
    stored copy. Unseen images of the training classes are typical; uniform noise, unlike
    anything the model trained on, is stranger than almost every validation image."""
    data = load(cifar_tarball, val_size=VAL_SIZE)
    session = ort.InferenceSession(
        models_dir / "cifar100-712868.onnx", providers=["CPUExecutionProvider"]
    )

    def familiarity_of(images: np.ndarray) -> np.ndarray:
        (values,) = session.run([FAMILIARITY_NAME], {INPUT_NAME: images})
        assert values.shape == (len(images), 1) and values.dtype == np.float32
        return values[:, 0]

    ranks = np.sort(familiarity_of(data.val.images)) * VAL_SIZE
    assert np.abs(ranks - np.arange(VAL_SIZE)).max() <= 2
    # Bounds from the statistics, not from one machine's trained model: were test images
    # like validation images, familiarity would be uniform, and its mean over 500 images
    # within 0.2 of 0.5 and the share below 0.1 within 0.1 of 0.1 (7 and 7.5 standard
    # errors).
    test = familiarity_of(data.test.images)
    assert 0.3 < test.mean() < 0.7 and 0.0 < (test < 0.1).mean() < 0.2
    # Noise: were it like the validation images, the share of 64 scoring at most 0.05
    # would be Binomial(64, 0.05), and at least half of them (32) has probability below
    # 1e-20. The model's view of each single image is not bounded: that depends on how
    # training went on this CPU (one noise image scored 0.016 on one machine, 0.002 on
    # another).
    strange = familiarity_of(np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3),
                                                               dtype=np.uint8))  # fmt: skip
    assert (strange <= 0.05).mean() >= 0.5, np.sort(strange)


def test_failed_parity_writes_nothing(tmp_path):
    model, other = build_model("cifar100-712868"), build_model("cifar100-712868")
    images = make_images(np.arange(16), seed=0)
    proto, fitted = full_graph(other)
    with pytest.raises(exporter.ExportError, match="differs from Keras"):
        exporter.check_parity(proto, model, images, fitted)

    target = tmp_path / "cifar100-712868.onnx"
    target.write_bytes(b"previous good export")

    def broken(proto, model, images, fitted):
        raise exporter.ExportError("simulated mismatch")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exporter, "check_parity", broken)
        with pytest.raises(exporter.ExportError):
            exporter.export(model, card_for(model), target, images, **calibration())
    assert target.read_bytes() == b"previous good export"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def reference_outputs(seed: int = 0, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (softmax rows with a clear top class) and unbounded features."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, size=(n, 100))
    logits[np.arange(n), rng.integers(0, 100, n)] += 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs.astype(np.float32), rng.normal(0, 3, size=(n, 64)).astype(np.float32)


def off_top(probs: np.ndarray, row: int = 0) -> int:
    """A class that is not the top one of `row`: moving it cannot change the top-1."""
    return int(np.argsort(probs[row])[len(probs[row]) // 2])


def test_parity_gate_checks_probabilities_to_1e_4():
    probs, features = reference_outputs()
    assert exporter.parity_failure(probs, features, probs, features) is None
    for step, fails in ((0.5e-4, False), (2e-4, True), (5e-4, True)):
        moved = probs.copy()
        moved[3, off_top(probs, 3)] += step
        assert moved.argmax(1).tolist() == probs.argmax(1).tolist()
        failure = exporter.parity_failure(moved, features, probs, features)
        assert (failure is not None) == fails, (step, failure)
        if fails:
            assert f"{step:.2e} on probabilities" in failure and "0 top-1" in failure


def test_parity_gate_checks_features_relative_to_their_scale():
    probs, features = reference_outputs()
    scale = float(np.abs(features).max())
    assert scale > 1  # relative, not absolute: a 2e-4 absolute error is within the limit
    for relative, fails in ((0.5e-4, False), (2e-4, True), (5e-4, True)):
        moved = features.copy()
        moved[5, 7] += relative * scale
        failure = exporter.parity_failure(probs, moved, probs, features)
        assert (failure is not None) == fails, (relative, failure)
        if fails:
            assert "on features" in failure and "0.00e+00 on probabilities" in failure


def test_parity_gate_refuses_a_changed_top_class_within_the_tolerance():
    """Two near-equal classes swapping places move no probability by 1e-4, and still
    change the answer the service gives."""
    probs, features = reference_outputs()
    row = probs[0].copy()
    top, other = int(row.argmax()), off_top(probs)
    row[other] = row[top] - 2e-5
    keras_probs, onnx_probs = probs.copy(), probs.copy()
    keras_probs[0], onnx_probs[0] = row, row
    onnx_probs[0, other] = row[top] + 2e-5  # now the top class, 4e-5 away from Keras
    assert np.abs(onnx_probs - keras_probs).max() < exporter.MAX_ABS_DIFF
    failure = exporter.parity_failure(onnx_probs, features, keras_probs, features)
    assert failure is not None and "1 top-1 mismatches" in failure


def test_check_parity_compares_the_features_it_computes(monkeypatch):
    """The whole gate on a real graph: a Keras reference off in its features alone fails it."""
    model = build_model("cifar100-712868")
    images = make_images(np.arange(8), seed=0)
    proto, fitted = full_graph(model)
    exporter.check_parity(proto, model, images, fitted)  # the real reference agrees
    probs, features = exporter.keras_reference(model, images)
    scale = max(1.0, float(np.abs(features).max()))
    features[2, 3] += 3 * exporter.MAX_ABS_DIFF * scale
    monkeypatch.setattr(exporter, "keras_reference", lambda model, images: (probs, features))
    with pytest.raises(exporter.ExportError, match="on features"):
        exporter.check_parity(proto, model, images, fitted)


def test_check_parity_refuses_a_tampered_familiarity_constant(workspace):
    """The gate holds the graph's familiarity to the NumPy reference: any of its constants
    changed in the file (moved to what a different fit would give: 10 % off and shifted,
    the validation scores halved) fails it, each on its own. On a trained model: an
    untrained one's probabilities are so flat that GEN gives every image the same score to
    within float32 rounding, and no gate can tell its constants apart."""
    model = keras.models.load_model(best_checkpoint(workspace / "runs" / "cifar100-712868"))
    images = make_images(np.arange(32) % 100, seed=0)
    proto, fitted = full_graph(model)
    exporter.check_parity(proto, model, images, fitted)
    constants = [t.name for t in proto.graph.initializer if t.name.startswith(familiarity.PREFIX)
                 and t.data_type == onnx.TensorProto.FLOAT and t.dims]  # fmt: skip
    assert familiarity.PREFIX + "validation" in constants and len(constants) >= 5
    for name in constants:
        tampered = onnx.ModelProto()
        tampered.CopyFrom(proto)
        (tensor,) = [t for t in tampered.graph.initializer if t.name == name]
        value = onnx.numpy_helper.to_array(tensor)
        # Not a uniform shift: softmax, hence GEN, does not see one added to every logit.
        shift = 0.5 * np.cos(np.arange(value.size)).reshape(value.shape)
        changed = value / 2 if name.endswith("validation") else value * 1.1 + shift
        tensor.CopyFrom(onnx.numpy_helper.from_array(changed.astype(np.float32), name))
        with pytest.raises(exporter.ExportError, match="familiarity differs from the reference"):
            exporter.check_parity(tampered, model, images, fitted)


@pytest.mark.parametrize("tf32_before", [True, False])
def test_parity_reference_is_computed_without_tf32(monkeypatch, tf32_before):
    """On Ampere and newer GPUs TensorFlow computes float32 convolutions in TF32 unless told
    not to; the reference the gate trusts must not: TF32 is off while it is computed, on
    whatever machine trained the model, and the caller's setting comes back after."""
    import tensorflow as tf

    seen = []
    real = exporter._with_features

    class Spy:
        def __init__(self, model):
            self.model = real(model)

        def predict(self, images, **kwargs):
            seen.append(tf.config.experimental.tensor_float_32_execution_enabled())
            return self.model.predict(images, **kwargs)

    model = build_model("cifar100-712868")
    images = make_images(np.arange(4), seed=0)
    proto, fitted = full_graph(model)
    monkeypatch.setattr(exporter, "_with_features", Spy)
    tf.config.experimental.enable_tensor_float_32_execution(tf32_before)
    try:
        exporter.check_parity(proto, model, images, fitted)
        assert seen == [False]
        assert tf.config.experimental.tensor_float_32_execution_enabled() is tf32_before

        def fails(images, **kwargs):
            raise RuntimeError("out of memory")

        monkeypatch.setattr(Spy, "predict", lambda self, images, **kwargs: fails(images))
        with pytest.raises(RuntimeError):
            exporter.keras_reference(model, images)
        assert tf.config.experimental.tensor_float_32_execution_enabled() is tf32_before
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(True)  # TensorFlow's default


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    model = build_model("cifar100-712868")
    target = tmp_path / "models" / "cifar100-712868.onnx"

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        exporter.export(
            model, card_for(model), target, make_images(np.arange(4), seed=0), **calibration()
        )
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("missing", [FEATURES_NAME, FAMILIARITY_NAME])
def test_graph_without_an_output_is_refused(missing):
    model = build_model("cifar100-712868")
    proto, fitted = full_graph(model)
    (output,) = [o for o in proto.graph.output if o.name == missing]
    proto.graph.output.remove(output)
    with pytest.raises(exporter.ExportError, match="expected probabilities, features, familiarity"):
        exporter.check_parity(proto, model, make_images(np.arange(4), seed=0), fitted)


def test_report_says_when_a_file_lacks_features(models_dir, cifar_tarball, tmp_path, capsys):
    """A file from elsewhere, probabilities only (the service accepts it): the report
    cannot map features, and says so."""
    proto = onnx.load(models_dir / "cifar100-712868.onnx")
    (features,) = [o for o in proto.graph.output if o.name == FEATURES_NAME]
    proto.graph.output.remove(features)
    props = {p.key: p.value for p in proto.metadata_props}
    props["outputs"] = json.dumps([OUTPUT_NAME])
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, tmp_path / "cifar100-712868.onnx")
    args = ["report", "--models-dir", str(tmp_path), "--reports-dir", str(tmp_path / "reports")]
    assert main([*args, "--data-dir", str(cifar_tarball), "--val-size", "500"]) == 2
    assert "no 'features' output" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


def test_export_original_keras2_checkpoint(cifar_tarball, tmp_path):
    """A file as Keras 2's ModelCheckpoint wrote them: the whole model, by Keras 2."""
    from tests.keras2_files import write_keras2_file

    weights = tmp_path / "cifar100-712868-48-0.37.hdf5"
    original = write_keras2_file(weights, "cifar100-712868", "save", seed=1)
    args = ["export", "--weights", str(weights), "--data-dir", str(cifar_tarball)]
    assert main([*args, "--val-size", "500", "--models-dir", str(tmp_path / "models")]) == 0

    path = tmp_path / "models" / "cifar100-712868.onnx"
    proto = onnx.load(path)
    card = ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
    assert card.training["source"] == weights.name
    assert 0 <= card.evaluation["top1_accuracy"] <= 1
    images = make_images(np.arange(10), seed=9)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        session.run([OUTPUT_NAME], {INPUT_NAME: images})[0],
        original.predict(images / 255, verbose=0),
        atol=1e-4,
    )


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["export", "--model", "cifar100-712868", "--data-dir", str(tmp_path / "no")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_other_errors_keep_their_traceback(workspace, cifar_tarball, tmp_path):
    """A checkpoint Keras cannot read is a bug to debug, not a message to print."""
    run_dir = tmp_path / "runs" / "cifar100-712868"
    shutil.copytree(workspace / "runs" / "cifar100-712868", run_dir)
    best_checkpoint(run_dir).write_bytes(b"truncated")
    (run_dir / "evaluation.json").unlink()
    args = ["evaluate", "--model", "cifar100-712868", "--data-dir", str(cifar_tarball)]
    with pytest.raises(Exception) as raised:  # whatever Keras raises: it must get through
        main([*args, "--val-size", "500", "--runs-dir", str(tmp_path / "runs")])
    assert not isinstance(raised.value, TrainingError)


def test_evaluation_is_reused_only_for_the_same_checkpoint_content(
    workspace, cifar_tarball, tmp_path
):
    run_dir = Path(shutil.copytree(workspace / "runs" / "cifar100-712868", tmp_path / "runs" /
                                   "cifar100-712868"))  # fmt: skip
    args = ["evaluate", "--model", "cifar100-712868", "--data-dir", str(cifar_tarball)]
    args += ["--val-size", "500", "--runs-dir", str(tmp_path / "runs")]
    saved = run_dir / "evaluation.json"
    marked = {**json.loads(saved.read_text()), "top1_accuracy": 0.125}
    saved.write_text(json.dumps(marked))
    assert main(args) == 0
    assert json.loads(saved.read_text())["top1_accuracy"] == 0.125  # same content: reused

    # Another model under the same file name, as a retrained run could leave it.
    checkpoint = best_checkpoint(run_dir)
    model = keras.models.load_model(checkpoint)
    model.set_weights([w * 0.5 for w in model.get_weights()])
    model.save(checkpoint)
    assert main(args) == 0
    evaluation = json.loads(saved.read_text())
    assert evaluation["checkpoint"] == checkpoint.name
    assert evaluation["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert evaluation["top1_accuracy"] != 0.125


def test_train_export_killed_then_rerun_finishes_without_retraining(small_tarball, tmp_path):
    """What `make train-export` runs: killed while training the second model, the same
    command again keeps the first model's export, resumes the second and exports it."""
    command = [
        sys.executable, "-m", "training", "train-export", "--epochs", "2", "--batch-size", "32",
        "--data-dir", str(small_tarball), "--val-size", str(SMALL_VAL_SIZE),
        "--runs-dir", str(tmp_path / "runs"), "--models-dir", str(tmp_path / "models"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    second = tmp_path / "runs" / MODEL_IDS[1]
    ready = (second / "backup" / "training_metadata.json").exists
    kill_when(command, ready, "the second model's first epoch", env=env)
    first = tmp_path / "models" / f"{MODEL_IDS[0]}.onnx"
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    first_run = sorted(p.name for p in (tmp_path / "runs" / MODEL_IDS[0]).iterdir())

    again = subprocess.run(command, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"{MODEL_IDS[0]}: already exported with this recipe" in again.stdout
    assert f"Training {MODEL_IDS[0]}" not in again.stdout
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    assert sorted(p.name for p in (tmp_path / "runs" / MODEL_IDS[0]).iterdir()) == first_run
    assert "Resuming" in again.stdout and not (second / "backup").exists()
    for model_id in MODEL_IDS:
        proto = onnx.load(tmp_path / "models" / f"{model_id}.onnx")
        card = ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
        assert card.model_id == model_id and card.training["recipe"]["epochs"] == 2
        assert card.training["recipe"] == Recipe(epochs=2, batch_size=32).record()  # the default
        assert (tmp_path / "runs" / model_id / "evaluation.json").exists()
