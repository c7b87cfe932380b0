"""The two architectures match the original Keras summaries, and Keras 2 HDF5 files of
them, as Keras 2 writes them, load into them."""

import h5py
import numpy as np
import pytest

from tests.originals import ORIGINAL_SUMMARIES
from training.errors import WeightsError
from training.models import MODEL_IDS, build_model, load_original_weights

TOTALS = {"cifar100-712868": 712_868, "cifar100-5735844": 5_735_844}


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_architecture_matches_the_original_summary(model_id):
    model = build_model(model_id)
    assert model.name == model_id
    # Our first layer scales uint8 pixels to [0, 1]; it has no weights and keeps the shape.
    scale, *layers = model.layers
    assert scale.name == "scale" and scale.count_params() == 0
    assert model.inputs[0].dtype == "uint8"
    got = [(tuple(layer.output.shape[1:]), layer.count_params()) for layer in layers]
    assert got == [(shape, params) for _, shape, params in ORIGINAL_SUMMARIES[model_id]]
    assert model.count_params() == TOTALS[model_id]


def test_unknown_model_id_is_refused():
    with pytest.raises(ValueError, match="unknown model id"):
        build_model("cifar100-42")


@pytest.mark.parametrize("layout", ["save", "weights"])
@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_keras2_files_load_into_the_matching_model(tmp_path, model_id, layout):
    """Files written by Keras 2 itself, both layouts, with the original layer names."""
    from tests.keras2_files import write_keras2_file  # imports Keras 2: only where needed

    path = tmp_path / f"{model_id}-48-0.37.hdf5"
    original = write_keras2_file(path, model_id, layout, seed=1)
    model = load_original_weights(path)
    assert model.name == model_id
    for loaded, written in zip(model.get_weights(), original.get_weights(), strict=True):
        np.testing.assert_array_equal(loaded, written)
    # Same function: the original took pixels scaled to [0, 1], ours scales uint8 itself.
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        model.predict(images, verbose=0), original.predict(images / 255, verbose=0), atol=1e-6
    )


def test_hdf5_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "other.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("dense/kernel:0", data=np.zeros((10, 10), "float32"))
    with pytest.raises(WeightsError, match="100 parameters"):
        load_original_weights(path)
    (tmp_path / "junk.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(WeightsError, match="not a readable HDF5"):
        load_original_weights(tmp_path / "junk.hdf5")
