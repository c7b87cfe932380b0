"""deploy/monitoring/: the Prometheus rules and the Grafana dashboard.

promtool checks the rules and runs their unit tests (rules_test.yml), and those unit tests
are shown to fail on broken copies of the rules; every dashboard query parses as PromQL
and names only series the service exports or the rules record; the committed
dashboard.json is what its generator writes. Then the real thing: Debian's Prometheus,
loading rules.yml unchanged, scrapes a real two-worker `python -m service` that was sent
familiar and unfamiliar images, and the recorded share, the alert and the dashboard's
queries are read back from Prometheus's HTTP API.
"""

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from bench.load import multipart_form
from bench.servers import HOST, free_port, server_process, service_process
from bench.shadow import another_version
from contract.classifier import file_version
from contract.modelcard import FAMILIARITY_NAME, INPUT_NAME
from service.metrics import Metrics
from tests.service_helpers import encode
from training import data as cifar_data

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
RULES = MONITORING / "rules.yml"
RULES_TEST = MONITORING / "rules_test.yml"
DASHBOARD = MONITORING / "dashboard.json"
PROMTOOL = os.environ.get("PROMTOOL", "/usr/bin/promtool")
PROMETHEUS = os.environ.get("PROMETHEUS", "/usr/bin/prometheus")
SMALL, LARGE = "cifar100-712868", "cifar100-5735844"
UNFAMILIAR_BOUND = 0.01  # the bucket rules.yml reads (le="0.01": at or below)
UNFAMILIAR_ALERT = "CIFAR100UnfamiliarInputs"
# Grafana's variables, as a query is sent with every model selected.
PANEL_VARIABLES = {"$model": ".*", "$__rate_interval": "1m"}


def _tool(path: str) -> str:
    if not Path(path).is_file():
        pytest.fail(
            f"no {path}: the monitoring tests need Debian's Prometheus and promtool "
            "(`apt-get install -y prometheus`, as .ci/run does)",
            pytrace=False,
        )
    return path


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_tool(PROMTOOL), *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def rules() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def alert_expr(name: str) -> str:
    (rule,) = [rule for rule in rules() if rule.get("alert") == name]
    return rule["expr"]


def panel_queries(dashboard: dict | None = None) -> list[tuple[dict, str]]:
    """(panel, expr with Grafana's variables filled in) for every query of every panel."""
    dashboard = dashboard or json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in PANEL_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel, expr))
    return queries


# --- which metric names a PromQL expression reads -----------------------------------------

KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects: a small lexer, enough for our rules and panels
    (strings, label matchers, ranges and grouping lists removed first; a name followed by
    `(` is a function or an aggregation). `{__name__=~"a|b"}` names a and b."""
    names = {
        name
        for pattern in re.findall(r'__name__\s*=~?\s*"([^"]*)"', expr)
        for name in pattern.split("|")
    }
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    for match in re.finditer(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)\s*(\()?", text):
        if match[2] is None and match[1] not in KEYWORDS:
            names.add(match[1])
    return names


def test_metric_names_lexer():
    expr = (
        'histogram_quantile(0.99, sum by (route, le) (rate(a_bucket{route=~"/x|{y}", '
        'le="0.1"}[5m]))) > 1e3 and on (route) b:c:rate5m offset 5m / ignoring (le) '
        'group_left sum without (x) (d) or e{__name__=~"f|g"} unless bool h'
    )
    assert metric_names(expr) == {"a_bucket", "b:c:rate5m", "d", "e", "f", "g", "h"}


def exported_metric_names(monkeypatch, tmp_path) -> set[str]:
    """What /metrics can hold, from service/metrics.py in multi-worker mode (as served)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }


# --- the rules ------------------------------------------------------------------------------


def test_rules_pass_promtool_check():
    result = promtool("check", "rules", "--lint=all", "--lint-fatal", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_rules_unit_tests_pass():
    result = promtool("test", "rules", RULES_TEST.name, cwd=MONITORING)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# Each a plausible mistake, and the rules_test.yml case that must catch it.
BROKEN_RULES = {
    "wrong bucket": ('le="0.01"', 'le="0.025"'),
    "per-pod quantile": ("sum by (route, le) (", "sum by (route, le, instance) ("),
    "4xx kept": (
        ', status!~"4.."}[5m])\n            )\n          )',
        "}[5m])\n            )\n          )",
    ),
    "threshold": ("ratio_rate1h > 0.05", "ratio_rate1h > 0.08"),
    "no zero when nothing shed": (
        "            or\n            model_version:images_received:rate5m * 0\n",
        "",
    ),
    "no volume guard": (
        "          and on (model, version)\n"
        "          model_version:prediction_familiarity:increase1h >= 200\n",
        "",
    ),
    "shorter for": ("for: 15m", "for: 5m"),
    "drops not received": (
        '{__name__=~"images_classified_total|images_dropped_total"}',
        "images_classified_total",
    ),
    "p95": ("histogram_quantile(0.99,", "histogram_quantile(0.95,"),
    "per-pod agreement": (
        "sum by (model, version, candidate) (rate(shadow_images_agreed_total[30m]))\n"
        "          /\n"
        "          sum by (model, version, candidate) (rate(shadow_images_compared_total[30m]))",
        "sum by (model, version, candidate) (rate(shadow_images_agreed_total[30m])\n"
        "          /\n"
        "          rate(shadow_images_compared_total[30m]))",
    ),
    "door refusals not arrivals": (
        '{__name__=~"requests_shed_at_door_total|http_requests_total", route=~',
        "http_requests_total{route=~",
    ),
}
# Each threshold, volume guard and `for:` moved a little either way: rules_test.yml has a
# case just inside and just outside each bound, and reads the alert at both ends of `for:`.
FOR_15, FOR_10 = "\n        for: 15m", "\n        for: 10m"  # each guard's line, then its for:
UNFAMILIAR, GUARD_200 = "ratio_rate1h > 0.05", "increase1h >= 200" + FOR_15
SHED, SHED_GUARD = "images_shed:ratio_rate5m > 0.01", "images_received:rate5m >= 1" + FOR_10
DOOR, DOOR_GUARD = "at_door:ratio_rate5m > 0.01", "inference_requests:rate5m >= 1" + FOR_10
P99, P99_GUARD = "p99_rate5m > 0.25", "route:http_requests:rate5m >= 1" + FOR_10
AGREE, AGREE_GUARD = "ratio_rate30m < 0.8", "compared:increase30m >= 200" + FOR_10
NEAR_BOUNDS = {
    "unfamiliar share 0.05 -> 0.06": (UNFAMILIAR, UNFAMILIAR.replace("0.05", "0.06")),
    "unfamiliar share 0.05 -> 0.04": (UNFAMILIAR, UNFAMILIAR.replace("0.05", "0.04")),
    "unfamiliar guard 200 -> 300": (GUARD_200, GUARD_200.replace("200", "300")),
    "unfamiliar guard 200 -> 190": (GUARD_200, GUARD_200.replace("200", "190")),
    "unfamiliar for 15m -> 17m": (GUARD_200, GUARD_200.replace("15m", "17m")),
    "unfamiliar for 15m -> 14m": (GUARD_200, GUARD_200.replace("15m", "14m")),
    "shed share 0.01 -> 0.015": (SHED, SHED.replace("0.01", "0.015")),
    "shed share 0.01 -> 0.005": (SHED, SHED.replace("0.01", "0.005")),
    "shed guard 1 -> 1.1": (SHED_GUARD, SHED_GUARD.replace(">= 1", ">= 1.1")),
    "shed guard 1 -> 0.9": (SHED_GUARD, SHED_GUARD.replace(">= 1", ">= 0.9")),
    "shed guard >= 1 -> > 1": (SHED_GUARD, SHED_GUARD.replace(">= 1", "> 1")),
    "shed for 10m -> 12m": (SHED_GUARD, SHED_GUARD.replace("10m", "12m")),
    "shed for 10m -> 9m": (SHED_GUARD, SHED_GUARD.replace("10m", "9m")),
    "door share 0.01 -> 0.015": (DOOR, DOOR.replace("0.01", "0.015")),
    "door share 0.01 -> 0.005": (DOOR, DOOR.replace("0.01", "0.005")),
    "door guard 1 -> 1.1": (DOOR_GUARD, DOOR_GUARD.replace(">= 1", ">= 1.1")),
    "door guard 1 -> 0.9": (DOOR_GUARD, DOOR_GUARD.replace(">= 1", ">= 0.9")),
    "door guard >= 1 -> > 1": (DOOR_GUARD, DOOR_GUARD.replace(">= 1", "> 1")),
    "door for 10m -> 12m": (DOOR_GUARD, DOOR_GUARD.replace("10m", "12m")),
    "door for 10m -> 9m": (DOOR_GUARD, DOOR_GUARD.replace("10m", "9m")),
    "p99 0.25 -> 0.3": (P99, P99.replace("0.25", "0.3")),
    "p99 0.25 -> 0.2": (P99, P99.replace("0.25", "0.2")),
    "p99 guard 1 -> 1.1": (P99_GUARD, P99_GUARD.replace(">= 1", ">= 1.1")),
    "p99 guard 1 -> 0.9": (P99_GUARD, P99_GUARD.replace(">= 1", ">= 0.9")),
    "p99 guard >= 1 -> > 1": (P99_GUARD, P99_GUARD.replace(">= 1", "> 1")),
    "p99 for 10m -> 12m": (P99_GUARD, P99_GUARD.replace("10m", "12m")),
    "p99 for 10m -> 9m": (P99_GUARD, P99_GUARD.replace("10m", "9m")),
    "agreement 0.8 -> 0.79": (AGREE, AGREE.replace("0.8", "0.79")),
    "agreement 0.8 -> 0.81": (AGREE, AGREE.replace("0.8", "0.81")),
    "agreement guard 200 -> 220": (AGREE_GUARD, AGREE_GUARD.replace("200", "220")),
    "agreement guard 200 -> 170": (AGREE_GUARD, AGREE_GUARD.replace("200", "170")),
    "agreement for 10m -> 11m": (AGREE_GUARD, AGREE_GUARD.replace("10m", "11m")),
    "agreement for 10m -> 9m": (AGREE_GUARD, AGREE_GUARD.replace("10m", "9m")),
}
BROKEN_RULES |= NEAR_BOUNDS


@pytest.mark.parametrize("mistake", BROKEN_RULES)
def test_rules_unit_tests_catch_broken_rules(mistake, tmp_path):
    old, new = BROKEN_RULES[mistake]
    text = RULES.read_text()
    assert old in text, f"rules.yml changed: update the {mistake!r} mutation"
    (tmp_path / "rules.yml").write_text(text.replace(old, new))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    assert promtool("check", "rules", "rules.yml", cwd=tmp_path).returncode == 0  # still valid
    result = promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr, result.stdout


def test_rules_read_only_what_the_service_exports(monkeypatch, tmp_path):
    exported = exported_metric_names(monkeypatch, tmp_path)
    recorded: set[str] = set()
    for rule in rules():  # a rule may read the series recorded before it, in its group
        assert metric_names(rule["expr"]) <= exported | recorded, rule
        if "record" in rule:
            recorded.add(rule["record"])
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts == {
        UNFAMILIAR_ALERT,
        "CIFAR100SheddingLoad",
        "CIFAR100SheddingAtTheDoor",
        "CIFAR100InferenceLatencyHigh",
        "CIFAR100ShadowDisagreement",
    }


# --- the dashboard -------------------------------------------------------------------------


def _generator():
    spec = importlib.util.spec_from_file_location(
        "dashboard_generator", MONITORING / "dashboard.py"
    )
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        pytest.fail(
            f"{e}: the dashboard generator needs grafana-foundation-sdk (the dev extra: "
            "`make setup`)",
            pytrace=False,
        )
    return module


def test_dashboard_json_is_what_the_generator_writes():
    assert DASHBOARD.read_text() == _generator().render(), (
        "dashboard.json is out of date: .venv/bin/python deploy/monitoring/dashboard.py"
    )


def test_dashboard_queries_parse_as_promql(tmp_path):
    queries = panel_queries()
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    assert len(panels) >= 6 and all(panel.get("targets") for panel in panels)
    # promtool has no PromQL command here (Debian's 2.42): each query becomes a rule.
    groups = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{panel['id']}_{i}", "expr": expr}
        for i, (panel, expr) in enumerate(queries)
    ]}]}  # fmt: skip
    (tmp_path / "panels.yml").write_text(yaml.safe_dump(groups))
    result = promtool("check", "rules", "panels.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_dashboard_parse_check_bites(tmp_path):
    """A broken query fails the same check: promtool parses every expression."""
    groups = {"groups": [{"name": "d", "rules": [{"record": "r", "expr": "sum by (le (x)"}]}]}
    (tmp_path / "panels.yml").write_text(yaml.safe_dump(groups))
    assert promtool("check", "rules", "panels.yml", cwd=tmp_path).returncode != 0


def test_dashboard_reads_only_exported_or_recorded_series(monkeypatch, tmp_path):
    exported = exported_metric_names(monkeypatch, tmp_path)
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = set()
    for panel, expr in panel_queries():
        names = metric_names(expr)
        assert names and names <= exported | recorded, (panel["title"], names - exported)
        used |= names
    # The alerts' series are all on it; and the model picker lists served models.
    assert {
        "model_version:prediction_unfamiliar:ratio_rate1h",
        "model_version:images_shed:ratio_rate5m",
        "job:requests_shed_at_door:ratio_rate5m",
        "route:http_request_duration_seconds:p99_rate5m",
    } <= used
    dashboard = json.loads(DASHBOARD.read_text())
    (model,) = [v for v in dashboard["templating"]["list"] if v["name"] == "model"]
    assert re.fullmatch(r"label_values\((\w+), model\)", model["query"])[1] in exported


# --- a real Prometheus scraping a real service ---------------------------------------------


def familiarity(path: Path, images: np.ndarray) -> np.ndarray:
    """What the exported file says each image's familiarity is, asked directly."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [output.name for output in session.get_outputs()]
    assert FAMILIARITY_NAME in outputs, f"{path.name} has no familiarity output: {outputs}"
    (values,) = session.run([FAMILIARITY_NAME], {INPUT_NAME: images})
    return values[:, 0].astype(np.float64)  # as the service observes them (Python floats)


def predict(port: int, model: str, images: np.ndarray) -> None:
    body, content_type = multipart_form([(f"{i}.png", encode(im)) for i, im in enumerate(images)])
    request = urllib.request.Request(
        f"http://{HOST}:{port}/predict?model={model}",
        data=body,
        headers={"Content-Type": content_type},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        assert len(json.load(response)["predictions"]) == len(images)


class PrometheusAPI:
    def __init__(self, port: int, log: Path) -> None:
        self.base, self.log = f"http://{HOST}:{port}", log

    def get(self, path: str, **params: str) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def values(self, expr: str, key: str = "model") -> dict[str, float]:
        return {s["metric"][key]: float(s["value"][1]) for s in self.query(expr)}

    def wait(self, what: str, check, timeout: float = 90):
        """check() once it is truthy; fails with its last value and Prometheus's log."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(0.5)
        pytest.fail(
            f"{what}: not within {timeout} s; last {last!r}\n{self.log.read_text()[-3000:]}"
        )


def prometheus(tmp_path: Path, target_port: int):
    """Debian's Prometheus on a free loopback port: scrapes the service and evaluates
    rules.yml (the shipped file, unchanged) every second, storage in tmp_path."""
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "cifar100-api", "static_configs": [{"targets": [f"{HOST}:{target_port}"]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    command = [
        _tool(PROMETHEUS),
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address={HOST}:{port}",
    ]
    # Its log to a file, for the failure messages (server_process redirects nothing).
    shell = ["sh", "-c", 'exec "$@" >"$LOG" 2>&1', "sh", *command]
    process = server_process(shell, {"LOG": str(log)}, port, "/-/ready", timeout=60, cwd=tmp_path)
    return port, log, process


def test_prometheus_records_and_alerts_on_a_real_service(models_dir, cifar_dir, tmp_path):
    """Unfamiliar images sent to a real two-worker service reach the rules through real
    scrapes: Prometheus records the share that was sent, and the alert goes pending.

    Time, honestly: the alert has `for: 15m` and the share a 1-hour window, and this test
    runs for seconds. The window is no obstacle: rate() over 1h of a series that began
    seconds ago uses the samples there are. So the recorded value is checked exactly. The
    `for` is: the alert can only be pending here, so the test checks it is pending (its
    expression held on real data at a real evaluation) and evaluates the alert's own
    expression through the API; that it fires after 15 minutes, not before, is
    rules_test.yml's job (promtool runs the clock there).

    Exactly how: rate() counts only what arrives after a series' first sample, and
    extrapolates to the window's start by an amount that depends on the first value
    (never below zero). So the service gets a first round of images before Prometheus
    starts (its first scrape sees that round, complete), then a second round in the same
    proportions, 1 in 4 unfamiliar: both series (le="0.01" and the count) start at the
    same fraction of their growth, are extrapolated alike, and their ratio is exactly
    the share sent, 0.25. The other model gets familiar images only: 0, and no alert.
    """
    small_file, large_file = models_dir / f"{SMALL}.onnx", models_dir / f"{LARGE}.onnx"
    # Familiar: the dataset's own test images (the training distribution, never trained
    # on); unfamiliar: uniform noise. Each image's class is what the file itself says.
    candidates = cifar_data.test_split(cifar_dir).images
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(200, 32, 32, 3), dtype=np.uint8)
    small_known, small_noise = familiarity(small_file, candidates), familiarity(small_file, noise)
    large_known = familiarity(large_file, candidates)
    familiar = candidates[(small_known > UNFAMILIAR_BOUND) & (large_known > UNFAMILIAR_BOUND)]
    unfamiliar = noise[small_noise <= UNFAMILIAR_BOUND]
    assert len(familiar) >= 0.9 * len(candidates), np.sort(small_known)[:20]
    assert len(unfamiliar) >= 16, (
        f"only {len(unfamiliar)} of 200 noise images have familiarity <= {UNFAMILIAR_BOUND} "
        f"on {SMALL}: {np.sort(small_noise)[:20]}"
    )

    def take(pool: np.ndarray, count: int, start: int) -> np.ndarray:
        return pool[np.arange(start, start + count) % len(pool)]

    def mixed(familiar_count: int, unfamiliar_count: int, start: int) -> np.ndarray:
        images = np.concatenate(
            [take(familiar, familiar_count, start), take(unfamiliar, unfamiliar_count, start)]
        )
        return images[rng.permutation(len(images))]

    small_version, large_version = file_version(small_file), file_version(large_file)
    # A second version of the small model (its card's date changed: the same answers)
    # shadows the first on every request, so the rollout rules and panels read real series.
    models = tmp_path / "models"
    models.mkdir()
    for file in (small_file, large_file):
        shutil.copy(file, models / file.name)
    another_version(small_file, models / "small-candidate.onnx")
    candidate = file_version(models / "small-candidate.onnx")
    plan = {"serving": small_version, "candidate": candidate, "mode": "shadow", "share": 1.0}
    (models / "rollout.json").write_text(json.dumps({"models": {SMALL: plan}}))
    with service_process(tmp_path / "metrics", models_dir=models, workers=2, log_json=False) as (
        service_port,
        _,
    ):
        # Round 1, before Prometheus: 16 images each (4 unfamiliar for the small model).
        predict(service_port, SMALL, mixed(12, 4, 0))
        predict(service_port, LARGE, take(familiar, 16, 0))
        prometheus_port, log, process = prometheus(tmp_path, service_port)
        with process:
            api = PrometheusAPI(prometheus_port, log)
            api.wait(
                "the first scrape of round 1",
                lambda: (
                    api.values("sum by (model) (prediction_familiarity_count)")
                    == {SMALL: 16, LARGE: 16}
                ),
            )
            # Round 2: 256 images each (the alert wants 200 in the hour), 64 per request.
            for i in range(4):
                predict(service_port, SMALL, mixed(48, 16, 16 + 64 * i))
                predict(service_port, LARGE, take(familiar, 64, 16 + 64 * i))
            metrics_text = urllib.request.urlopen(
                f"http://{HOST}:{service_port}/metrics", timeout=10
            ).read().decode()  # fmt: skip

            # Read the rules once they have been evaluated on the last round's scrape:
            # the share is 0.25 at every request boundary, the volume only at the end.
            api.wait(
                "a scrape of round 2, complete",
                lambda: (
                    api.values("sum by (model) (prediction_familiarity_count)")
                    == {SMALL: 272, LARGE: 272}
                ),
            )
            (scraped,) = api.query("max(timestamp(prediction_familiarity_count))")
            settled = float(scraped["value"][1]) + 2  # two evaluations after that scrape
            share = "model_version:prediction_unfamiliar:ratio_rate1h"

            def evaluated_since() -> bool:
                stamps = [float(s["value"][1]) for s in api.query(f"timestamp({share})")]
                return len(stamps) == 2 and min(stamps) > settled

            api.wait("an evaluation of the rules after it", evaluated_since)
            assert api.values(share) == {SMALL: 0.25, LARGE: 0.0}  # exactly what was sent
            recorded = api.query(share)
            assert {(s["metric"]["model"], s["metric"]["version"]) for s in recorded} == {
                (SMALL, small_version),
                (LARGE, large_version),
            }
            assert api.values("model_version:prediction_familiarity:increase1h")[SMALL] >= 256

            def unfamiliar_alerts() -> list[dict]:
                alerts = api.get("/api/v1/alerts")["alerts"]
                return [a for a in alerts if a["labels"]["alertname"] == UNFAMILIAR_ALERT]

            (alert,) = api.wait(f"{UNFAMILIAR_ALERT} pending", unfamiliar_alerts)
            assert alert["state"] == "pending"  # for: 15m; firing is rules_test.yml's
            assert alert["labels"] == {
                "alertname": UNFAMILIAR_ALERT,
                "model": SMALL,
                "version": small_version,
                "severity": "warning",
            }
            assert float(alert["value"]) == 0.25
            assert alert["annotations"]["summary"].startswith(f"{SMALL} {small_version}: 25%")
            (fired,) = api.query(alert_expr(UNFAMILIAR_ALERT))  # the expression itself
            assert fired["metric"] == {"__name__": share, "model": SMALL, "version": small_version}
            assert float(fired["value"][1]) == 0.25

            # The other rules, on the same real series: nothing shed (recorded as 0, not
            # missing), and the inference routes' p99 is a number.
            shed = api.values("model_version:images_shed:ratio_rate5m")
            assert shed == {SMALL: 0.0, LARGE: 0.0}
            door = api.values("job:requests_shed_at_door:ratio_rate5m", "job")
            assert door == {"cifar100-api": 0.0}
            p99 = api.values("route:http_request_duration_seconds:p99_rate5m", "route")
            assert set(p99) == {"/predict"} and math.isfinite(p99["/predict"])
            assert api.values("route:http_requests:rate5m", "route")["/predict"] > 0

            # The candidate gave the serving version's answers: agreement 1, from copies.
            agreement = api.query("model_version_candidate:shadow_agreement:ratio_rate30m")
            assert [(a["metric"]["model"], a["metric"]["version"], a["metric"]["candidate"],
                     float(a["value"][1])) for a in agreement] == [
                (SMALL, small_version, candidate, 1.0)
            ]  # fmt: skip

            # Every dashboard query runs on the real data, and every panel shows some.
            dashboard = json.loads(DASHBOARD.read_text())
            queries = panel_queries(dashboard)
            for panel in dashboard["panels"]:
                if panel["type"] != "row":
                    results = [api.query(expr) for p, expr in queries if p is panel]
                    assert any(results), f"panel {panel['title']!r} shows nothing"
            models = api.get("/api/v1/label/model/values", **{"match[]": "images_classified_total"})
            assert set(models) == {SMALL, LARGE}

    # The names the rules and panels read are in the real /metrics, but for the drops:
    # nothing was dropped, and a labelled counter appears with its first value (the
    # door's is created at startup, so it is there at 0).
    exposed = {line.split("{")[0].split(" ")[0] for line in metrics_text.splitlines()}
    read = set().union(*(metric_names(rule["expr"]) for rule in rules()))
    read |= set().union(*(metric_names(expr) for _, expr in panel_queries()))
    recorded_names = {rule["record"] for rule in rules() if "record" in rule}
    assert read - recorded_names - exposed == {"images_dropped_total"}
