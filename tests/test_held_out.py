"""Classes left out of training, and what the report makes of them: the recipe option, the
data it removes, the evaluation over the known classes, the model card; then the report's
familiarity section (known test images against held-out ones and against --unfamiliar
images) and its occlusion heat maps of the most confused pairs."""

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from markupsafe import escape

from contract.images import decode, open_image
from contract.modelcard import FAMILIARITY_NAME, ModelCard
from contract.occlusion import count
from tests.conftest import SMALL_VAL_SIZE, VAL_SIZE
from tests.service_helpers import encode
from tests.synthetic import CLASS_NAMES
from tests.test_report import claimed, numbers_shown, plant
from training import data as cifar
from training import train as training_loop
from training.__main__ import main, parser
from training.commands.options import recipe_of
from training.errors import RecipeError, ReportError
from training.evaluate import evaluate_test_set
from training.recipe import Recipe
from training.report import unfamiliar
from training.report.analysis import familiarity
from training.report.occlusion import explain_confusions
from training.report.pages import render

SMALL = "cifar100-712868"
HELD_OUT = ("class_07", "class_03")  # given out of order: the recipe sorts them
HELD_OUT_INDEX = [3, 7]

# --- the recipe option ------------------------------------------------------------------


def test_the_recipe_names_held_out_classes_once_and_in_order():
    recipe = Recipe(held_out_classes=HELD_OUT)
    assert recipe.held_out_classes == ("class_03", "class_07")
    # recipe.json holds a list: read back, it is the same recipe (resume, train-export skip).
    record = json.loads(json.dumps(recipe.record()))
    assert record["held_out_classes"] == ["class_03", "class_07"]
    assert Recipe(**record) == recipe and record == recipe.record()
    assert recipe.choice()["differs_from_default"] == {"held_out_classes": list(sorted(HELD_OUT))}
    assert Recipe().choice()["differs_from_default"] == {}
    assert "all but class_03, class_07" in recipe.method()["classes"]
    assert Recipe().method()["classes"] == "all"
    for bad in (("bed", "bed"), "bed", ("",), (3,)):
        with pytest.raises(ValueError, match="held-out classes"):
            Recipe(held_out_classes=bad)


def test_hold_out_on_the_command_line():
    def recipe(*argv):
        return recipe_of(parser().parse_args(argv))

    model = ["--model", SMALL]
    assert recipe("train", *model).held_out_classes == ()
    for command in (["train", *model], ["train-export"], ["ablate", *model]):
        held = recipe(*command, "--hold-out", "bottle, bed")
        assert held.held_out_classes == ("bed", "bottle")
    with pytest.raises(RecipeError, match="twice"):
        recipe("train", *model, "--hold-out", "bed,bed")


def test_held_out_classes_leave_training_and_validation_not_test(cifar_dir):
    data = cifar.load(cifar_dir, val_size=VAL_SIZE)
    kept = cifar.without_classes(data, HELD_OUT)
    for split, full in ((kept.train, data.train), (kept.val, data.val)):
        assert not np.isin(split.fine, HELD_OUT_INDEX).any()
        assert len(split) == len(full) - np.isin(full.fine, HELD_OUT_INDEX).sum()
    assert kept.test is data.test  # scored apart, never dropped
    # The other classes keep exactly their images: the same validation set as a run
    # without held-out classes, minus those.
    others = ~np.isin(data.val.fine, HELD_OUT_INDEX)
    np.testing.assert_array_equal(kept.val.images, data.val.images[others])
    assert cifar.without_classes(data, ()) is data


def test_unknown_or_all_classes_are_refused(cifar_dir):
    data = cifar.load(cifar_dir, val_size=VAL_SIZE)
    with pytest.raises(RecipeError, match=r"not in the dataset: 'class_3' \(did you mean class_"):
        cifar.without_classes(data, ("class_3",))
    with pytest.raises(RecipeError, match="none left"):
        cifar.without_classes(data, tuple(CLASS_NAMES))


def test_training_never_sees_a_held_out_image(cifar_dir, tmp_path, monkeypatch):
    """What train() hands the input pipeline and the validation: no held-out class."""
    data = cifar.load(cifar_dir, val_size=VAL_SIZE)
    seen = {}

    class Seen(Exception):
        pass

    def train_dataset(split, recipe, first_epoch=0):
        seen["train"] = split.fine

    def eval_dataset(split, batch_size):
        seen["validation"] = split.fine
        raise Seen  # enough: fit is next

    monkeypatch.setattr(training_loop, "train_dataset", train_dataset)
    monkeypatch.setattr(training_loop, "eval_dataset", eval_dataset)
    with pytest.raises(Seen):
        training_loop.train(SMALL, data, tmp_path / "run", Recipe(held_out_classes=HELD_OUT), False)
    for labels in seen.values():
        assert len(labels) and not np.isin(labels, HELD_OUT_INDEX).any()
    assert set(seen) == {"train", "validation"}
    saved = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert saved["recipe"]["held_out_classes"] == ["class_03", "class_07"]
    # A name the dataset lacks is refused before the run folder is touched.
    with pytest.raises(RecipeError):
        training_loop.train(SMALL, data, tmp_path / "new", Recipe(held_out_classes=("x",)), False)
    assert not (tmp_path / "new").exists()


def test_evaluation_is_over_the_known_classes(cifar_dir):
    """An oracle right on every known image and wrong on every held-out one scores 100 %
    when the held-out images are left out, and less if they were counted."""
    data = cifar.load(cifar_dir, val_size=VAL_SIZE)
    pairs = zip(data.test.images, data.test.fine, strict=True)
    label_of = {image.tobytes(): label for image, label in pairs}

    def oracle(images):
        labels = np.array([label_of[image.tobytes()] for image in images])
        answers = np.where(np.isin(labels, HELD_OUT_INDEX), 50, labels)  # never right there
        return np.eye(100)[answers]

    known = evaluate_test_set(oracle, data, HELD_OUT)
    held = np.isin(data.test.fine, HELD_OUT_INDEX).sum()
    assert known["top1_accuracy"] == 1.0 and known["images"] == len(data.test) - held
    assert known["held_out_classes"]["classes"] == ["class_03", "class_07"]
    assert known["held_out_classes"]["test_images"] == held
    assert known["per_class_accuracy"]["class_03"] is None  # no image of it was scored
    everything = evaluate_test_set(oracle, data)
    assert everything["top1_accuracy"] < 1.0 and everything["held_out_classes"]["classes"] == []


# --- a model trained without two classes, exported, reported on --------------------------


@pytest.fixture(scope="session")
def held_out_run(small_tarball, tmp_path_factory) -> Path:
    """The small model trained one epoch without class_03 and class_07, and exported."""
    root = tmp_path_factory.mktemp("held_out")
    common = ["--data-dir", str(small_tarball), "--val-size", str(SMALL_VAL_SIZE)]
    common += ["--runs-dir", str(root / "runs")]
    train = ["train", "--model", SMALL, "--epochs", "1", "--batch-size", "64", "--no-augment"]
    assert main([*train, "--hold-out", ",".join(HELD_OUT), *common]) == 0
    assert main(["export", "--model", SMALL, "--models-dir", str(root / "models"), *common]) == 0
    return root


@pytest.fixture(scope="session")
def other_images(tmp_path_factory) -> Path:
    """A folder of image files as a user has them: sizes, formats and modes the service
    takes, one in a subfolder, and two files it would refuse."""
    folder = tmp_path_factory.mktemp("others")
    rng = np.random.default_rng(5)
    (folder / "deeper").mkdir()
    files = {
        "a_noise.png": encode(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)),
        "b_photo.jpg": encode(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "JPEG"),
        "c_alpha.png": encode(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)),
        "deeper/d_grey.bmp": encode(rng.integers(0, 256, (32, 32), dtype=np.uint8), "BMP"),
        "e_readme.txt": b"not an image",
        "f_cut.png": encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))[:200],
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


def test_held_out_run_records_its_classes_everywhere(held_out_run):
    run_dir = held_out_run / "runs" / SMALL
    recipe = json.loads((run_dir / "recipe.json").read_text())
    assert recipe["recipe"]["held_out_classes"] == ["class_03", "class_07"]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["images"] == 200 - 4  # 2 test images per class, 2 classes aside
    assert evaluation["held_out_classes"]["test_images"] == 4
    proto = onnx.load(held_out_run / "models" / f"{SMALL}.onnx")
    card = ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
    assert card.training["recipe"]["held_out_classes"] == ["class_03", "class_07"]
    assert "all but class_03, class_07" in card.training["method"]["classes"]
    assert card.training["choice"]["differs_from_default"]["held_out_classes"] == [
        "class_03",
        "class_07",
    ]
    assert card.evaluation == evaluation
    # Familiarity is fitted on the training images without the held-out classes: they
    # must not look familiar by construction.
    assert FAMILIARITY_NAME in card.outputs
    assert {3, 7} <= set(card.familiarity["classes_without_training_images"])


def write_report(models: Path, small_tarball: Path, out: Path, *unfamiliar_paths: Path) -> dict:
    args = ["report", "--model", SMALL, "--models-dir", str(models), "--reports-dir", str(out)]
    args += ["--data-dir", str(small_tarball), "--val-size", str(SMALL_VAL_SIZE)]
    for path in unfamiliar_paths:
        args += ["--unfamiliar", str(path)]
    assert main(args) == 0
    return json.loads((out / SMALL / "report.json").read_text())


@pytest.fixture(scope="session")
def held_out_report(held_out_run, small_tarball, other_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("held_out_reports")
    write_report(held_out_run / "models", small_tarball, out, other_images, small_tarball)
    return out / SMALL


def test_report_scores_the_known_classes_and_sets_the_others_apart(
    held_out_report, held_out_run, small_tarball
):
    report = json.loads((held_out_report / "report.json").read_text())
    evaluation = json.loads((held_out_run / "runs" / SMALL / "evaluation.json").read_text())
    assert report["held_out_classes"] == ["class_03", "class_07"]
    assert report["images"] == evaluation["images"] == 196
    assert report["top1_accuracy"] == pytest.approx(evaluation["top1_accuracy"])
    assert np.array(report["confusion_matrix"])[HELD_OUT_INDEX].sum() == 0
    assert (
        "class_03" not in report["per_class_accuracy"] and len(report["per_class_accuracy"]) == 98
    )

    f = report["familiarity"]
    assert f["available"] and f["known"]["images"] == 196 and f["recall"] == 0.95
    held, folder, archive = f["sets"]
    assert (held["name"], held["images"], held["source"]) == (
        "held-out classes",
        4,
        "class_03, class_07",
    )
    assert [c["class"] for c in held["per_class"]] == ["class_03", "class_07"]
    assert [c["images"] for c in held["per_class"]] == [2, 2]
    # The folder: four files the service would take, two it would refuse.
    assert (folder["kind"], folder["images"], folder["skipped"]) == ("image files", 4, 2)
    assert (archive["kind"], archive["images"]) == ("CIFAR-100 test split", 200)
    for s in (held, folder, archive, *held["per_class"]):
        assert 0 <= s["auroc"] <= 1 and 0 <= s["false_positive_rate"] <= 1
        assert 0 <= s["top_probability_auroc"] <= 1
    assert f["threshold_recall"] >= 0.95

    x = report["explanations"]
    assert (x["patch"], x["stride"], x["copies_per_image"]) == (8, 4, count(8, 4))
    pairs = {(p["true"], p["predicted"]) for p in report["most_confused_pairs"][:4]}
    assert x["examples"] and {(e["true"], e["predicted"]) for e in x["examples"]} <= pairs
    test = cifar.test_split(small_tarball)
    for e in x["examples"]:  # image numbers are the whole test file's
        assert CLASS_NAMES[test.fine[e["index"]]] == e["true"]


def test_report_page_shows_both_sections_and_only_json_numbers(held_out_report):
    report = json.loads((held_out_report / "report.json").read_text())
    page = (held_out_report / "index.html").read_text()
    assert render(report) == page
    for name in ("familiarity.png", "explanations.png"):
        assert f'<img src="{name}"' in page
        assert (held_out_report / name).read_bytes().startswith(b"\x89PNG")
    assert 'id="held-out"' in page and "When not to trust it" in page
    for key in ("familiarity", "explanations"):
        assert escape(report["findings"][key]) in page
    # The number check of tests/test_report.py, on this page.
    leaves: list = []
    shown, planted = numbers_shown(page), numbers_shown(render(plant(report, leaves)))
    assert len(shown) == len(planted)
    for real, marker in zip(shown, planted, strict=True):
        assert real[0] + real[2] == (claimed(marker, leaves) or marker[0] + marker[2])
    auroc = f"{report['familiarity']['sets'][0]['auroc']:.3f}"
    assert re.search(rf'<td class="num">{auroc}</td>', page)


def test_a_file_without_familiarity_gets_a_section_that_says_so(
    held_out_run, small_tarball, other_images, tmp_path
):
    models = tmp_path / "models"
    models.mkdir()
    proto = onnx.load(held_out_run / "models" / f"{SMALL}.onnx")
    kept = [o for o in proto.graph.output if o.name != FAMILIARITY_NAME]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    card = ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
    card = replace(card, outputs=[o.name for o in kept], familiarity=None)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, card.to_metadata())
    onnx.save(proto, models / f"{SMALL}.onnx")

    report = write_report(models, small_tarball, tmp_path / "reports", other_images)
    assert report["familiarity"] == {"available": False}
    assert "no familiarity output" in report["findings"]["familiarity"]
    page = (tmp_path / "reports" / SMALL / "index.html").read_text()
    assert escape(report["findings"]["familiarity"]) in page
    assert not (tmp_path / "reports" / SMALL / "familiarity.png").exists()
    assert report["images"] == 196  # still over the known classes


# --- the parts, on cases worked out by hand ---------------------------------------------


def test_unfamiliar_folder_decodes_each_file_as_the_service_does(other_images):
    found = unfamiliar.load(other_images)
    assert found.images.shape == (4, 32, 32, 3) and found.images.dtype == np.uint8
    assert found.skipped == 2 and found.name == other_images.name
    order = ["a_noise.png", "b_photo.jpg", "c_alpha.png", "deeper/d_grey.bmp"]
    for image, name in zip(found.images, order, strict=True):
        data = (other_images / name).read_bytes()
        np.testing.assert_array_equal(image, decode(open_image(data, True, 1 << 30)))


def test_unfamiliar_refuses_what_holds_no_image(tmp_path):
    with pytest.raises(ReportError, match="no such file"):
        unfamiliar.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing")
    with pytest.raises(ReportError, match="no image in it"):
        unfamiliar.load(tmp_path / "empty")
    (tmp_path / "junk.tar.gz").write_bytes(b"junk")
    with pytest.raises(ReportError, match=r"junk\.tar\.gz: .* neither"):
        unfamiliar.load(tmp_path / "junk.tar.gz")


def test_familiarity_section_on_constructed_scores():
    """Known images at 0.1 .. 1.0; held-out ones below, level with and above them."""
    names = [f"c{i}" for i in range(4)]
    known_values = np.arange(1, 11) / 10
    known_probabilities = np.tile([0.7, 0.1, 0.1, 0.1], (10, 1))
    known_probabilities[:, 0] = np.linspace(0.5, 0.95, 10)  # top probability rises too
    held = np.array([0.05, 0.1, 0.55, 0.95])
    # Per held-out image: c1 twice (at the lowest two familiarities), c2 twice.
    held_probabilities = np.array(
        [[0.1, 0.6, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.1, 0.2, 0.6, 0.1], [0.1, 0.1, 0.7, 0.1]]
    )
    section = familiarity(
        {"familiarity": known_values[:, None], "probabilities": known_probabilities},
        [
            {
                "name": "held",
                "kind": "held-out",
                "source": "c3",
                "skipped": 0,
                "familiarity": held[:, None],
                "probabilities": held_probabilities,
                "labels": np.array([3, 3, 2, 2]),
            }
        ],
        names,
    )
    (s,) = section["sets"]
    # Pairs (known above held-out) of 40: 10 + 9.5 (a tie at 0.1 counts half) + 5 + 1.
    assert s["auroc"] == pytest.approx(25.5 / 40)
    # Accept 95 % of 10 known images: reject floor(0.5) = 0, the threshold is 0.1, which
    # accepts 3 of the 4 held-out images.
    assert section["threshold"] == pytest.approx(0.1) and section["threshold_recall"] == 1.0
    assert s["false_positive_rate"] == pytest.approx(0.75)
    # Top probability: the known images' 0.5 .. 0.95 against the held-out 0.6, 0.6, 0.6, 0.7,
    # counted pair by pair.
    tops = np.linspace(0.5, 0.95, 10)
    above = sum((k > h) + 0.5 * (k == h) for k in tops for h in (0.6, 0.6, 0.6, 0.7))
    assert s["top_probability_auroc"] == pytest.approx(above / 40)
    assert s["taken_for"] == [{"class": "c1", "share": 0.5}, {"class": "c2", "share": 0.5}]
    by_class = {c["class"]: c for c in s["per_class"]}
    assert by_class["c3"]["auroc"] == pytest.approx(19.5 / 20)  # 0.05 and 0.1: far below
    assert by_class["c2"]["auroc"] == pytest.approx(6 / 20)  # 0.55 and 0.95: among them
    assert section["known"]["share_below_level"] == 0.0 and s["share_below_level"] == 0.0


def test_explanations_map_each_class_to_the_pixels_that_carry_it():
    """A model that reads class 0 from the top-left quarter's brightness and class 1 from
    the bottom-right's: on an image it takes for 1, the true class's map lights up at the
    top left, the predicted class's at the bottom right, and the maps disagree."""

    def run(images):
        x = images.astype(np.float64) / 255
        logits = np.stack(
            [4 * x[:, :16, :16].mean(axis=(1, 2, 3)), 4 * x[:, 16:, 16:].mean(axis=(1, 2, 3))],
            axis=1,
        )
        logits = np.concatenate([logits, np.zeros((len(x), 98))], axis=1)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    images = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    images[:, :16, :16] = 200  # class 0's evidence
    images[:, 16:, 16:] = np.array([250, 0, 240])[:, None, None, None]  # class 1's
    labels = np.zeros(3, dtype=np.int64)
    probabilities = run(images)  # images 0 and 2 are taken for class 1; 0 most surely
    names = [f"c{i}" for i in range(100)]
    pair = {"true": "c0", "predicted": "c1"}
    numbers, maps = explain_confusions(run, [pair], images, labels, probabilities, names)
    assert [e["index"] for e in numbers["examples"]] == [0, 2]
    first = numbers["examples"][0]
    assert first["predicted_probability"] == pytest.approx(probabilities[0, 1])
    true_map, predicted_map = maps[0]
    assert true_map[:16, :16].mean() > 0 > true_map[16:, 16:].mean()
    assert predicted_map[16:, 16:].mean() > 0 > predicted_map[:16, :16].mean()
    assert first["map_correlation"] < 0


def test_known_test_images_come_from_the_model_card(cifar_dir):
    from training.report.write import held_out_of

    card = ModelCard(
        model_id=SMALL,
        class_names=CLASS_NAMES,
        superclass_names=[f"s{i}" for i in range(20)],
        fine_to_coarse=[i // 5 for i in range(100)],
        parameter_count=1,
        training={"recipe": Recipe(held_out_classes=HELD_OUT).record()},
    )
    assert held_out_of(card) == ["class_03", "class_07"]
    assert held_out_of(replace(card, training={"recipe": "original Keras 2 experiment"})) == []
