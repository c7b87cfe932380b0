"""Writes dashboard.json beside this file: the Grafana dashboard for rules.yml's series.

    .venv/bin/python deploy/monitoring/dashboard.py          # rewrite dashboard.json
    .venv/bin/python deploy/monitoring/dashboard.py --check  # exit 1 if it is out of date

Built with Grafana's own builder library (grafana-foundation-sdk, its Grafana 11.6
flavour, in the dev extra); both this script and its output are committed, and
tests/test_monitoring.py fails when they differ. Import dashboard.json into Grafana (or
provision it from a file or a ConfigMap) and pick the Prometheus data source that scrapes
the service and loads rules.yml: the drift, shedding and latency panels read the rules'
recorded series, so they show exactly what the alerts see; the rest are raw service
metrics.
"""

import argparse
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import GraphThresholdsStyleMode, LegendDisplayMode
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "dashboard.json"
UID = "cifar100-api-monitoring"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
MODEL = 'model=~"$model"'
# The inference routes, as rules.yml's latency rules select them (route templates).
INFERENCE_ROUTES = (
    'route=~"/predict|/v2/models/{model_name}/infer'
    '|/v2/models/{model_name}/versions/{model_version}/infer"'
)
# Thresholds drawn on the panels: the alerts' (rules.yml says why each is what it is).
UNFAMILIAR_BASELINE, UNFAMILIAR_ALERT = 0.01, 0.05
SHED_ALERT = 0.01
LATENCY_OBJECTIVE = 0.25
AGREEMENT_ALERT = 0.8  # a floor: CIFAR100ShadowDisagreement fires below it


def query(expr: str, legend: str, ref: str = "A") -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def thresholds(*steps: tuple[float, str]) -> ThresholdsConfig:
    """Green below the first step, then each step's colour from its value on."""
    return (
        ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(None, "green"), *(Threshold(value, color) for value, color in steps)])
    )


def timeseries(title: str, description: str, unit: str, *targets: Dataquery) -> Timeseries:
    panel = (
        Timeseries()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(8)
        .span(12)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(LegendDisplayMode.LIST)
            .show_legend(True)
        )
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def with_lines(panel: Timeseries, *steps: tuple[float, str]) -> Timeseries:
    """Dashed threshold lines at the given values (the baseline, the alert)."""
    return panel.thresholds(thresholds(*steps)).thresholds_style(
        common_builders.GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.DASHED)
    )


def build() -> Dashboard:
    drift = [
        with_lines(
            timeseries(
                "Unfamiliar inputs: share of the last hour's images with familiarity ≤ 0.01",
                "Per model and version (recorded by rules.yml). On data like the validation "
                "set this is 1 % by construction (dashed yellow); CIFAR100UnfamiliarInputs "
                "fires above 5 % (dashed red) for 15 minutes, with at least 200 images in "
                "the hour. Models exported without the familiarity output have no line.",
                "percentunit",
                query(
                    f"model_version:prediction_unfamiliar:ratio_rate1h{{{MODEL}}}",
                    "{{model}} {{version}}",
                ),
            ),
            (UNFAMILIAR_BASELINE, "yellow"),
            (UNFAMILIAR_ALERT, "red"),
        ),
        timeseries(
            "Familiarity distribution: share of the last hour's images at or below 0.05, "
            "0.25 and 0.5",
            "On familiar data the share at or below x is x (familiarity is uniform on the "
            "validation set): 5 %, 25 % and 50 %. A drift moves all of them up; a shift "
            "only near 0 shows in the panel on the left first.",
            "percentunit",
            query(
                "sum by (model, version, le) (rate(prediction_familiarity_bucket"
                f'{{{MODEL}, le=~"0.05|0.25|0.5"}}[1h]))'
                " / ignoring (le) group_left"
                f" sum by (model, version) (rate(prediction_familiarity_count{{{MODEL}}}[1h]))",
                "{{model}} {{version}} ≤ {{le}}",
            ),
        ),
        timeseries(
            "Top-class probability: median and 10th percentile",
            "How sure the model is of its answers, per model and version. A drop with "
            "unchanged familiarity: harder images of known kinds; with falling familiarity: "
            "new kinds of images.",
            "percentunit",
            *(
                query(
                    f"histogram_quantile({q}, sum by (model, version, le) "
                    f"(rate(prediction_top_probability_bucket{{{MODEL}}}[$__rate_interval])))",
                    f"{{{{model}}}} {{{{version}}}} {name}",
                    ref,
                )
                for q, name, ref in ((0.5, "median", "A"), (0.1, "10th percentile", "B"))
            ),
        )
        .min(0)
        .max(1),
    ]
    capacity = [
        with_lines(
            timeseries(
                "Shed: share of images at each model's queue, of requests at the door (5 min)",
                "Refused at once with 503 (recorded by rules.yml; 0 when nothing was shed): "
                "images because the version's queue was full, per model and version "
                "(CIFAR100SheddingLoad), and inference requests at the door because their "
                "expected wait was above MAX_QUEUE_DELAY_MS, for every model at once "
                "(CIFAR100SheddingAtTheDoor). Both alerts fire above 1 % (dashed red) for "
                "10 minutes.",
                "percentunit",
                query(
                    f"model_version:images_shed:ratio_rate5m{{{MODEL}}}",
                    "{{model}} {{version}} at the queue",
                ),
                query(
                    "job:requests_shed_at_door:ratio_rate5m",
                    "{{job}} at the door (every model)",
                    "B",
                ),
            ),
            (SHED_ALERT, "red"),
        ),
        timeseries(
            "Images per second: classified, and dropped by reason",
            "Dropped: shed (queue full), expired (deadline passed), abandoned (client "
            "gone), failed (inference error).",
            "short",
            query(
                "sum by (model, version) "
                f"(rate(images_classified_total{{{MODEL}}}[$__rate_interval]))",
                "{{model}} {{version}} classified",
            ),
            query(
                "sum by (model, version, reason) "
                f"(rate(images_dropped_total{{{MODEL}}}[$__rate_interval]))",
                "{{model}} {{version}} {{reason}}",
                "B",
            ),
        ),
    ]
    latency = [
        with_lines(
            timeseries(
                "p99 latency of the inference routes (5 minutes; objective 250 ms)",
                "/predict and the two /v2 infer routes, every pod, model and version "
                "together, 4xx left out (recorded by rules.yml). "
                "CIFAR100InferenceLatencyHigh fires above 250 ms (dashed red) for 10 "
                "minutes, at 1 request a second or more.",
                "s",
                query("route:http_request_duration_seconds:p99_rate5m", "{{route}}"),
            ),
            (LATENCY_OBJECTIVE, "red"),
        ),
        timeseries(
            "Inference requests per second, by route and status; refused at the door",
            "Every status, 4xx included (the latency panel leaves them out). Requests "
            "refused at the door are answered before the metrics middleware, so they are "
            "counted apart (the door has one route for both /v2 infer routes).",
            "reqps",
            query(
                "sum by (route, status) "
                f"(rate(http_requests_total{{{INFERENCE_ROUTES}}}[$__rate_interval]))",
                "{{route}} {{status}}",
            ),
            query(
                "sum by (route) (rate(requests_shed_at_door_total[$__rate_interval]))",
                "{{route}} refused at the door",
                "B",
            ),
        ),
        timeseries(
            "Queue wait and onnxruntime time per batch, p99",
            "Per model and version: a queue wait that grows while inference time does not "
            "is load beyond capacity; inference time that grows is the hardware.",
            "s",
            *(
                query(
                    f"histogram_quantile(0.99, sum by (model, version, le) "
                    f"(rate({metric}_bucket{{{MODEL}}}[$__rate_interval])))",
                    f"{{{{model}}}} {{{{version}}}} {name}",
                    ref,
                )
                for metric, name, ref in (
                    ("inference_queue_seconds", "queue", "A"),
                    ("inference_seconds", "inference", "B"),
                )
            ),
        ),
    ]
    rollout = [
        timeseries(
            "Shadow agreement: share of compared images with the same top class (30 min)",
            "Per model, serving version and candidate (recorded by rules.yml), while a "
            "candidate shadows the serving version (docs/rollouts.md). "
            "CIFAR100ShadowDisagreement fires below 80 % (dashed red) for 10 minutes, with "
            "at least 200 images compared in 30 minutes.",
            "percentunit",
            query(
                f"model_version_candidate:shadow_agreement:ratio_rate30m{{{MODEL}}}",
                "{{model}} {{version}} vs {{candidate}}",
            ),
        )
        .thresholds(
            ThresholdsConfig()
            .mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(None, "red"), Threshold(AGREEMENT_ALERT, "green")])
        )
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.DASHED)
        )
        .min(0)
        .max(1),
        timeseries(
            "Shadow copies per second: compared, shed, failed by the candidate",
            "Copies of live requests the candidate answered (compared), dropped before it "
            "saw them (shed: the shadow queue full, or the door refusing live requests), "
            "or failed to answer. Shed copies cost the live requests nothing. A canary's "
            "traffic is in the images panel above, per version.",
            "short",
            query(
                "sum by (model, version, candidate) "
                f"(rate(shadow_images_compared_total{{{MODEL}}}[$__rate_interval]))",
                "{{model}} {{version}} vs {{candidate}} compared",
            ),
            query(
                "sum by (model, version, candidate, reason) "
                f"(rate(shadow_images_shed_total{{{MODEL}}}[$__rate_interval]))",
                "{{model}} {{version}} vs {{candidate}} shed ({{reason}})",
                "B",
            ),
            query(
                "sum by (model, version, candidate) "
                f"(rate(shadow_candidate_errors_total{{{MODEL}}}[$__rate_interval]))",
                "{{model}} {{version}} vs {{candidate}} failed",
                "C",
            ),
        ),
    ]
    dashboard = (
        Dashboard("CIFAR-100 classifier: drift, shedding, latency")
        .uid(UID)
        .description(
            "The service's drift (familiarity, confidence), shedding and latency: "
            "deploy/monitoring/rules.yml's recorded series and the raw metrics beside them."
        )
        .tags(["cifar100", "generated"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .time("now-6h", "now")
        .refresh("1m")
        .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            QueryVariable("model")
            .label("Model")
            .datasource(DATASOURCE)
            .query("label_values(images_classified_total, model)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    )
    ids = iter(range(1, 100))  # Grafana wants each panel's id unique; rows are panels
    for title, panels in (
        ("Drift of the inputs", drift),
        ("Load and shedding", capacity),
        ("Latency", latency),
        ("Rollouts: a candidate shadowing the serving version", rollout),
    ):
        dashboard = dashboard.with_row(Row(title).id(next(ids)))
        for panel in panels:
            dashboard = dashboard.with_panel(panel.id(next(ids)))
    return dashboard


def render() -> str:
    return JSONEncoder(indent=2, ensure_ascii=False).encode(build().build()) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if dashboard.json differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
