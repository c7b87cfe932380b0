"""Write the reports: score each exported model and write its folder, then the comparison.

    reports/<model id>/   index.html, report.json (every number on the page), *.png
    reports/compare/      the same for all exported models side by side (2 or more)

Scoring goes through contract.classifier.Classifier, the class that serves the model, so the
report describes exactly what the service answers: the test set, the occluded copies of the
explained images, and any --unfamiliar images (decoded as the service decodes uploads).
"""

import functools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from contract.classifier import Classifier
from contract.modelcard import FAMILIARITY_NAME, FEATURES_NAME, OUTPUT_NAME, ModelCard
from training.atomic import write_text
from training.data import Cifar100
from training.evaluate import known_test_images
from training.report import figures, montages, unfamiliar
from training.report.analysis import analyse, compare, familiarity, feature_maps
from training.report.dataset import describe_dataset
from training.report.occlusion import explain_confusions
from training.report.pages import render, render_compare
from training.report.sentences import sentences

COMPARE_DIR = "compare"


def write_reports(
    model_paths: list[Path],
    data: Cifar100,
    reports_dir: Path,
    unfamiliar_paths: list[Path] = (),
) -> list[dict]:
    """reports_dir/<id>/ for each model; reports_dir/compare/ when there are 2 or more.
    `unfamiliar_paths`: folders or archives of other images for the familiarity section."""
    reports_dir = Path(reports_dir)
    others = [unfamiliar.load(path) for path in unfamiliar_paths]
    dataset = describe_dataset(data)
    reports, scored, known_masks = [], [], []
    for path in model_paths:
        # The model itself, in float32: what the report describes, on any machine.
        model = Classifier(path, "auto", 0, 1, precision="float32")
        held_out = held_out_of(model.card)
        # A model that never saw some classes is scored on the others' test images; the
        # held-out ones go to the familiarity section.
        known = known_test_images(data, held_out)
        outputs = score(model, data.test.images)
        probabilities, features = outputs[OUTPUT_NAME], outputs[FEATURES_NAME]
        index = np.flatnonzero(known)
        known_data = replace(data, test=data.test.take(index))
        parameters = model.card.parameter_count
        report = analyse(
            model.model_id,
            parameters,
            probabilities[known],
            features[known],
            known_data,
            dataset,
            test_index=index,
            held_out=held_out,
        )
        maps = feature_maps(features[known])
        report["feature_maps"] = maps["numbers"]
        groups = familiarity_groups(model, outputs, known, data, held_out, others)
        report["familiarity"] = (
            familiarity(groups[0], groups[1:], data.class_names) if groups else {"available": False}
        )
        if groups:  # which score the file's familiarity calibrates, in the card's words
            report["familiarity"]["method"] = (model.card.familiarity or {}).get("method")
        report["explanations"], heat_maps = explain_confusions(
            functools.partial(probabilities_of, model),
            report["most_confused_pairs"],
            data.test.images,
            data.test.fine,
            probabilities,
            data.class_names,
        )
        report["findings"] = sentences(report)
        out = reports_dir / model.model_id
        out.mkdir(parents=True, exist_ok=True)
        figures.draw(report, maps, known_data, out)
        if groups:
            figures.familiarity(report["familiarity"], groups, out)
        if heat_maps:
            figures.explanations(report["explanations"], data.test.images, heat_maps, out)
        # The whole test file: the image numbers in the report are its indices.
        montages.draw(report, probabilities, data, out)
        write_text(out / "report.json", json.dumps(report, indent=2))
        write_text(out / "index.html", render(report))
        reports.append(report)
        scored.append((model.model_id, parameters, probabilities.argmax(axis=1)))
        known_masks.append(known)
    if len(scored) > 1:
        # On the test images of the classes every model was trained on.
        common = np.flatnonzero(np.logical_and.reduce(known_masks))
        out = reports_dir / COMPARE_DIR
        out.mkdir(parents=True, exist_ok=True)
        comparison = compare(
            [(m, p, predicted[common]) for m, p, predicted in scored],
            replace(data, test=data.test.take(common)),
        )
        figures.draw_compare(comparison, data, out)
        write_text(out / "report.json", json.dumps(comparison, indent=2))
        write_text(out / "index.html", render_compare(comparison))
    return reports


def held_out_of(card: ModelCard) -> list[str]:
    """The classes the model's recipe kept out of training (none for a Keras 2 file's)."""
    recipe = card.training.get("recipe")
    return list(recipe.get("held_out_classes", [])) if isinstance(recipe, dict) else []


def familiarity_groups(
    model: Classifier,
    outputs: dict[str, np.ndarray],
    known: np.ndarray,
    data: Cifar100,
    held_out: list[str],
    others: list[unfamiliar.ImageSet],
) -> list[dict]:
    """The known test images, then the held-out ones (if any), then each other set, with
    their familiarity and probabilities: what analysis.familiarity takes. Empty when the
    model file has no familiarity output."""
    if FAMILIARITY_NAME not in model.output_names:
        return []
    values, probabilities = outputs[FAMILIARITY_NAME], outputs[OUTPUT_NAME]
    groups = [
        {
            "name": "known classes",
            "familiarity": values[known],
            "probabilities": probabilities[known],
        }
    ]
    if held_out:
        groups.append(
            {
                "name": "held-out classes",
                "kind": "test images of classes left out of training",
                "source": ", ".join(held_out),
                "skipped": 0,
                "familiarity": values[~known],
                "probabilities": probabilities[~known],
                "labels": data.test.fine[~known],
            }
        )
    for other in others:
        scores = score(model, other.images, [OUTPUT_NAME, FAMILIARITY_NAME])
        groups.append(
            {
                "name": other.name,
                "kind": other.kind,
                "source": other.source,
                "skipped": other.skipped,
                "familiarity": scores[FAMILIARITY_NAME],
                "probabilities": scores[OUTPUT_NAME],
            }
        )
    return groups


def probabilities_of(model: Classifier, images: np.ndarray) -> np.ndarray:
    return model.run(images, [OUTPUT_NAME])[OUTPUT_NAME]


def score(
    model: Classifier, images: np.ndarray, names: list[str] | None = None, batch: int = 500
) -> dict[str, np.ndarray]:
    """The outputs `names` (default: every output the file has) of every image, in batches."""
    names = list(model.output_names if names is None else names)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in tqdm(range(0, len(images), batch), desc=f"Scoring {model.model_id}", unit="batch"):
        outputs = model.run(images[start : start + batch], names)
        for name in names:
            parts[name].append(outputs[name])
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}
