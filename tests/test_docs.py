"""The documentation: the strict build passes, and fails when it should (a setting renamed
in service/config.py, a dead link or anchor); the README's and the docs' request examples
answer against a real server."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.servers import free_port
from tests.service_helpers import live_server
from training import scores
from training.processes import run_python
from training.scores import evidence

ROOT = Path(__file__).resolve().parent.parent
# What the build reads: the site's sources, and the code and files it generates pages from.
SOURCES = ("mkdocs.yml", "docs", "service", "bench", "training", "bench-results/published",
           "README.md", "CHANGELOG.md")  # fmt: skip
FENCE = re.compile(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of the tree at `root`, in a fresh interpreter run from there,
    so the hooks import that tree's service/ and bench/."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=root, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip


@pytest.fixture
def copy(tmp_path) -> Path:
    """A copy of everything the documentation build reads, to break one thing in."""
    root = tmp_path / "repo"
    for name in SOURCES:
        source, target = ROOT / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    return root


def test_the_documentation_builds_strictly(tmp_path):
    result = build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    settings = (site / "settings/index.html").read_text()
    # The reference is generated: every field of the class is there, with its anchor.
    from service.config import Settings

    for name in Settings.model_fields:
        assert f'id="{name}"' in settings, name
    schema = json.loads((site / "openapi.json").read_text())
    assert "/predict" in schema["paths"] and "/v2/models/{model_name}/infer" in schema["paths"]
    benchmarks = (site / "benchmarks/index.html").read_text()
    published = json.loads((ROOT / "bench-results/published/results.json").read_text())
    ceiling = published["models"]["cifar100-5735844"]["ceiling"]["all_cpus"]["128"]
    assert str(ceiling["images_per_s"]) in benchmarks  # the table came from results.json
    assert (site / "published/latency-curve.png").read_bytes() == (
        ROOT / "bench-results/published/latency-curve.png"
    ).read_bytes()


def test_a_renamed_setting_fails_the_build(copy, tmp_path):
    config = copy / "service/config.py"
    text = config.read_text()
    assert "    min_familiarity: float" in text
    config.write_text(text.replace("    min_familiarity: float", "    familiarity_floor: float"))
    result = build(copy, tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "MIN_FAMILIARITY" in output and "not a setting" in output, output[-3000:]


@pytest.mark.parametrize(
    ("link", "complaint"),
    [
        ("[gone](no-such-page.md)", "no-such-page.md"),
        ("[gone](settings.md#no_such_setting)", "no_such_setting"),
    ],
)
def test_a_dead_link_fails_the_build(copy, tmp_path, link, complaint):
    page = copy / "docs/serving.md"
    page.write_text(page.read_text() + f"\nSee also {link}.\n")
    result = build(copy, tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert complaint in output, output[-3000:]


def examples() -> tuple[list[str], list[str]]:
    """Every `curl` line against localhost:8000 in a bash block, and every Python block,
    of the README and the docs (each once)."""
    curls, programs = [], []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in FENCE.finditer(page.read_text()):
            if block["lang"] == "bash":
                for line in block["body"].splitlines():
                    if line.startswith("curl ") and "localhost:8000" in line:
                        curls.append(line)
            elif block["lang"] == "python":
                programs.append(block["body"])
    return list(dict.fromkeys(curls)), list(dict.fromkeys(programs))


def test_the_examples_answer_against_a_real_server(models_dir, triton_grpc_python,
                                                   kserve_python):  # fmt: skip
    curls, programs = examples()
    http = [p for p in programs if "localhost:8000" in p]
    grpc = {p: triton_grpc_python if "tritonclient" in p else kserve_python
            for p in programs if "localhost:8081" in p}  # fmt: skip
    # Every example talks to one of the two ports: none is left untested.
    assert curls and http and grpc and len(http) + len(grpc) == len(programs)
    grpc_port = free_port()
    with live_server(models_dir, grpc_port=str(grpc_port)) as port:
        for line in curls:
            command = line.replace("localhost:8000", f"127.0.0.1:{port}")
            result = subprocess.run(
                ["bash", "-c", f"curl --silent --show-error --fail {command[5:]}"],
                cwd=ROOT, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert result.returncode == 0, (line, result.stderr)
            answer = json.loads(result.stdout)
            sent = line.count("@")
            assert len(answer["predictions"]) == sent, line
            k = int(re.search(r"top_k=(\d+)", line)[1]) if "top_k=" in line else 5
            assert all(len(p["top_k"]) == k for p in answer["predictions"]), line
        for program in http:
            source = program.replace("localhost:8000", f"127.0.0.1:{port}")
            result = run_python("-c", source, timeout=60)
            # tritonclient's classification extension: three "score:index:label" strings.
            found = re.findall(r"b'(\d\.\d+):(\d+):(\w+)'", result.stdout)
            assert len(found) == 3, result.stdout
        # The gRPC examples, each with its client in the environment it needs (their
        # protobuf pins clash with ours): they print the probabilities' shape.
        for program, python in grpc.items():
            source = program.replace("localhost:8081", f"127.0.0.1:{grpc_port}")
            result = subprocess.run([python, "-c", source], cwd=ROOT, capture_output=True,
                                    text=True, timeout=120)  # fmt: skip
            assert result.returncode == 0, (program, result.stderr)
            assert re.search(r"\((1|2), 100\)", result.stdout), result.stdout


# How the work was organised is no part of the product's documentation.
ORGANISATION = re.compile(
    r"\b(this|that|the previous|the next|the last) (stop|session|turn)\b|\bstop's\b"
    r"|\bissue\b|#\d+\b",
    re.IGNORECASE,
)


def test_the_readmes_familiarity_table_is_the_published_measurement():
    """The README's tables are `python -m training ood`'s published result for each model,
    to the digit: the default score and the others evidence.HEADLINE names."""
    published = json.loads((ROOT / "bench-results/published/familiarity.json").read_text())
    readme = (ROOT / "README.md").read_text()
    for result in published["models"].values():
        assert evidence.table(result, list(evidence.HEADLINE)) in readme
    assert evidence.HEADLINE[0] == scores.DEFAULT


def test_the_documentation_speaks_of_the_product_only():
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")]
    pages += (ROOT / "bench-results/published").glob("*.md")
    found = [
        f"{page.relative_to(ROOT)}:{n}: {line.strip()}"
        for page in pages
        for n, line in enumerate(page.read_text().splitlines(), 1)
        if ORGANISATION.search(line)
    ]
    assert not found, "\n".join(found)
