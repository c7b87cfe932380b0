"""Exported ONNX files: uint8 in, probabilities out, a model card inside, and never
written unless onnxruntime reproduces Keras."""

import json

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.modelcard import INPUT_NAME, OUTPUT_NAME, ModelCard
from tests.synthetic import CLASS_NAMES, FINE_TO_COARSE, SUPERCLASS_NAMES, make_images
from tests.test_models import write_keras2_weights
from training import export as exporter
from training.__main__ import main
from training.models import MODEL_IDS, build_model
from training.train import best_checkpoint


def card_for(model: keras.Model) -> ModelCard:
    return ModelCard(
        model_id=model.name,
        class_names=CLASS_NAMES,
        superclass_names=SUPERCLASS_NAMES,
        fine_to_coarse=FINE_TO_COARSE,
        parameter_count=model.count_params(),
    )


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_exported_file_is_self_describing(models_dir, workspace, model_id):
    proto = onnx.load(models_dir / f"{model_id}.onnx")
    (image_input,) = proto.graph.input
    assert image_input.name == INPUT_NAME
    assert image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = image_input.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 32, 32, 3]
    assert sorted(o.name for o in proto.graph.output) == ["features", OUTPUT_NAME]

    card = ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
    run_dir = workspace / "runs" / model_id
    assert card.model_id == model_id
    assert card.class_names == CLASS_NAMES and card.superclass_names == SUPERCLASS_NAMES
    assert card.fine_to_coarse == FINE_TO_COARSE
    assert (
        card.parameter_count == {"cifar100-712868": 712868, "cifar100-5735844": 5735844}[model_id]
    )
    assert card.training["source"] == best_checkpoint(run_dir).name
    assert card.training["recipe"]["batch_size"] == 64
    assert card.training["method"]["optimizer"].startswith("AdamW")
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


def test_failed_parity_writes_nothing(tmp_path):
    model, other = build_model("cifar100-712868"), build_model("cifar100-712868")
    images = make_images(np.arange(16), seed=0)
    with pytest.raises(exporter.ExportError, match="differs from Keras"):
        exporter.check_parity(exporter.to_onnx(other), model, images)

    target = tmp_path / "cifar100-712868.onnx"
    target.write_bytes(b"previous good export")

    def broken(proto, model, images):
        raise exporter.ExportError("simulated mismatch")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exporter, "check_parity", broken)
        with pytest.raises(exporter.ExportError):
            exporter.export(model, card_for(model), target, images)
    assert target.read_bytes() == b"previous good export"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    model = build_model("cifar100-712868")
    target = tmp_path / "models" / "cifar100-712868.onnx"

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        exporter.export(model, card_for(model), target, make_images(np.arange(4), seed=0))
    assert list(target.parent.iterdir()) == []


def test_export_original_hdf5_weights(cifar_tarball, tmp_path):
    weights = tmp_path / "cifar100-712868-48-0.37.hdf5"
    write_keras2_weights(weights, "cifar100-712868", seed=1)
    args = ["export", "--weights", str(weights), "--data-dir", str(cifar_tarball)]
    assert main([*args, "--val-size", "500", "--models-dir", str(tmp_path / "models")]) == 0

    path = tmp_path / "models" / "cifar100-712868.onnx"
    proto = onnx.load(path)
    card = ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
    assert card.training["source"] == weights.name
    assert 0 <= card.evaluation["top1_accuracy"] <= 1
    keras_model = build_model("cifar100-712868")
    keras_model.load_weights(weights)
    images = make_images(np.arange(10), seed=9)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        session.run([OUTPUT_NAME], {INPUT_NAME: images})[0], keras_model(images), atol=1e-4
    )


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["export", "--model", "cifar100-712868", "--data-dir", str(tmp_path / "no")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_export_runs_the_whole_pipeline(cifar_dir, tmp_path):
    """What `make train-export` and the train container run, on one epoch each."""
    args = ["train-export", "--epochs", "1", "--batch-size", "128", "--data-dir", str(cifar_dir)]
    args += ["--val-size", "500", "--runs-dir", str(tmp_path / "runs")]
    assert main([*args, "--models-dir", str(tmp_path / "models")]) == 0
    for model_id in MODEL_IDS:
        assert (tmp_path / "runs" / model_id / "evaluation.json").exists()
        proto = onnx.load(tmp_path / "models" / f"{model_id}.onnx")
        card = ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
        assert card.model_id == model_id and card.training["recipe"]["epochs"] == 1
        assert card.training["recipe"]["augment"] is True  # the default recipe
