"""Write the reports: score each exported model and write its folder, then the comparison.

    reports/<model id>/   index.html, report.json (every number on the page), *.png
    reports/compare/      the same for all exported models side by side (2 or more)

Scoring goes through service.classifier.Classifier, the class that serves the model, so the
report describes exactly what the service answers.
"""

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.classifier import Classifier
from service.modelcard import FEATURES_NAME, OUTPUT_NAME
from training.atomic import write_text
from training.data import Cifar100
from training.report import figures, montages
from training.report.analysis import analyse, compare, feature_maps
from training.report.dataset import describe_dataset
from training.report.pages import render, render_compare

COMPARE_DIR = "compare"


def write_reports(model_paths: list[Path], data: Cifar100, reports_dir: Path) -> list[dict]:
    """reports_dir/<id>/ for each model; reports_dir/compare/ when there are 2 or more."""
    reports_dir = Path(reports_dir)
    dataset = describe_dataset(data)
    reports, scored = [], []
    for path in model_paths:
        model = Classifier(path, "auto", intra_op_threads=0, inter_op_threads=1)
        probabilities, features = score(model, data.test.images)
        parameters = model.card.parameter_count
        report = analyse(model.model_id, parameters, probabilities, features, data, dataset)
        maps = feature_maps(features)
        report["feature_maps"] = maps["numbers"]
        out = reports_dir / model.model_id
        out.mkdir(parents=True, exist_ok=True)
        figures.draw(report, maps, data, out)
        montages.draw(report, probabilities, data, out)
        write_text(out / "report.json", json.dumps(report, indent=2))
        write_text(out / "index.html", render(report))
        reports.append(report)
        scored.append((model.model_id, parameters, probabilities.argmax(axis=1)))
    if len(scored) > 1:
        out = reports_dir / COMPARE_DIR
        out.mkdir(parents=True, exist_ok=True)
        comparison = compare(scored, data)
        figures.draw_compare(comparison, data, out)
        write_text(out / "report.json", json.dumps(comparison, indent=2))
        write_text(out / "index.html", render_compare(comparison))
    return reports


def score(model: Classifier, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and penultimate features of every image, in batches."""
    probabilities, features = [], []
    for start in tqdm(range(0, len(images), batch), desc=f"Scoring {model.model_id}", unit="batch"):
        outputs = model.run(images[start : start + batch])
        probabilities.append(outputs[OUTPUT_NAME])
        features.append(outputs[FEATURES_NAME])
    return np.concatenate(probabilities), np.concatenate(features)
