"""MkDocs hooks: the pages' reference parts are generated from the code at build time.

A page asks for one with a marker line, `<!-- generated: NAME -->`:

- `settings`: the service's settings, from `service/config.py`'s `Settings` fields (name,
  environment variable, default, bounds, description);
- `openapi`: the endpoints of the app `service.main.create_app` builds (with an empty
  models folder: the schema needs no model file), and the whole schema, also written to
  the site as `openapi.json`;
- `benchmark`: the published run's tables, from `bench-results/published/results.json`,
  by the same `bench.tables.to_markdown` that wrote `results.md`;
- `familiarity`: the familiarity scores measured by `python -m training ood`, from
  `bench-results/published/familiarity.json`, by the `training.scores.evidence.table`
  that printed them.

Every environment-variable-like name in backticks (`MAX_QUEUE_IMAGES`) on any page or in
README.md must be a setting or one of OTHER_VARIABLES below, so a renamed setting fails the
build instead of leaving the documentation describing a variable the service ignores.
"""

import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

MARKER = re.compile(r"^<!-- generated: (?P<name>[a-z]+) -->$", re.MULTILINE)
# `NAME` or `NAME=value` in backticks, NAME with at least one underscore (single words such
# as `DEVICE` are too often something else: `UINT8`, `HEURISTIC`).
VARIABLE = re.compile(r"`(?P<name>[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)(?:=[^`]*)?`")
# Environment variables the documentation names that are not service settings.
OTHER_VARIABLES = {
    "CIFAR100_DIR": "training: a local copy of the dataset",
    "CIFAR100_CACHE": "training: where the download is kept",
    "PROMETHEUS_MULTIPROC_DIR": "prometheus_client: where workers add up their metrics",
    "CUDA_CACHE_PATH": "CUDA: the PTX compile cache of the training image",
    "TRAIN_FLAGS": "Makefile: extra flags for make train-export",
    "SOAK_SECONDS": "Makefile: length of make bench-faults' soak",
    "API_PORT": "docker compose: the published port",
    "HOST_UID": "docker compose: who the training files belong to",
    "HOST_GID": "docker compose: who the training files belong to",
    "HOST_MODELS_DIR": "docker compose: the host's models folder",
    "HOST_RUNS_DIR": "docker compose: the host's runs folder",
    "HOST_REPORTS_DIR": "docker compose: the host's reports folder",
    "IMAGE_TAG": "docker compose: the images' tag",
    "CPU_BASE": "docker compose: api-cpu's base image",
    "HINT_BF16": "Triton's OpenVINO backend: its bfloat16 parameter",
    "API_KEY": "the page's curl examples: the key you hold",
    "RAY_ADDRESS": "Ray: the cluster the score job joins",
    "RAY_AUTH_TOKEN": "Ray: the token a driver joining a cluster presents",
    "RAY_AUTH_TOKEN_PATH": "Ray: a file holding that token",
    "SCORE_FLAGS": "Makefile: extra flags for make score",
    "SIGNING_KEY": "training: the private key export and sign sign with",
    "HOST_TRUSTED_KEYS": "docker compose: the host's public key(s), a secret for the service",
    "HOST_SIGNING_KEY": "docker compose: the host's private key, a secret for training",
}
# Names in the same shape that are no variables: gRPC's status codes.
NOT_VARIABLES = {
    "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED",
    "FAILED_PRECONDITION", "PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE",
    "UNIMPLEMENTED", "ALREADY_EXISTS", "OUT_OF_RANGE", "DATA_LOSS", "INTERNAL", "CANCELLED",
}  # fmt: skip

_used: set[str] = set()
_schema: dict[str, Any] = {}


def _repo(config) -> Path:
    root = Path(config.config_file_path).parent
    # This checkout's code, not whatever an editable install points at.
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def _settings_class(config):
    _repo(config)
    from service.config import Settings

    return Settings


def environment_names(name: str, field) -> list[str]:
    """The variables pydantic-settings reads a field from."""
    alias = field.validation_alias
    choices = getattr(alias, "choices", None)
    if choices:
        return [str(choice).upper() for choice in choices]
    return [str(alias or name).upper()]


def _prose(text: str) -> str:
    """A description as a table cell: Markdown and HTML characters outside code spans
    escaped (`reports/<id>/` is text, `*.onnx` is not emphasis)."""
    parts = text.replace("\n", " ").replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    return "`".join(parts)


def _default(name: str, value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, Path):
        return f"`{value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`[]`" if not value else f"`{json.dumps(value)}`"
    if isinstance(value, str):
        return f"`{value}`" if value else "empty"
    if name.endswith("_bytes") and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"{value} ({value >> 20} MiB)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _bounds(field) -> str:
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    parts = []
    for item in field.metadata:
        for attribute, sign in signs.items():
            bound = getattr(item, attribute, None)
            if bound is not None:
                parts.append(f"{sign} {bound:g}")
    annotation = field.annotation
    if getattr(annotation, "__origin__", None) is not None and "Literal" in str(annotation):
        parts.append(" \\| ".join(f"`{a}`" for a in annotation.__args__))
    return ", ".join(parts)


def settings_reference(config) -> str:
    settings = _settings_class(config)
    lines = [
        '<div class="settings-reference" markdown>',
        "",
        "| variable | default | allowed | what it does |",
        "|---|---|---|---|",
    ]
    for name, field in settings.model_fields.items():
        variables = " or ".join(f"`{v}`" for v in environment_names(name, field))
        lines.append(
            f'| <a id="{name}"></a>{variables} | {_default(name, field.default)} | '
            f"{_bounds(field)} | {_prose(field.description or '')} |"
        )
    return "\n".join([*lines, "", "</div>"])


def setting_names(config) -> set[str]:
    settings = _settings_class(config)
    return {v for name, f in settings.model_fields.items() for v in environment_names(name, f)}


def openapi_schema(config) -> dict[str, Any]:
    if not _schema:
        _repo(config)
        from service.config import Settings
        from service.main import create_app

        with tempfile.TemporaryDirectory() as empty:  # no model is loaded for the schema
            app = create_app(Settings(models_dir=Path(empty), reports_dir=Path(empty)))
            _schema.update(app.openapi())
    return _schema


def first_sentence(operation: dict) -> str:
    """An operation's docstring's first sentence, else FastAPI's summary."""
    text = " ".join((operation.get("description") or "").split())
    return re.split(r"(?<=\.)\s", text, maxsplit=1)[0] or operation.get("summary", "")


def openapi_reference(config) -> str:
    schema = openapi_schema(config)
    lines = [
        f"Version {schema['info']['version']} of the API, {len(schema['paths'])} paths.",
        "",
        "| method | path | what it does |",
        "|---|---|---|",
    ]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            lines.append(f"| `{method.upper()}` | `{path}` | {_prose(first_sentence(operation))} |")
    whole = json.dumps(schema, indent=2)
    lines += [
        "",
        '??? note "The whole schema (also at [openapi.json](openapi.json))"',
        "",
        "    ```json",
        *("    " + line for line in whole.splitlines()),
        "    ```",
    ]
    return "\n".join(lines)


def _int_keys(pairs: list[tuple[str, Any]]) -> dict:
    """JSON wrote the results' integer keys (batch sizes) as strings: read them back."""
    return {int(k) if k.isdigit() else k: v for k, v in pairs}


def published_markdown(root: Path) -> str:
    """The published run as `bench.tables.to_markdown` writes it, from its results.json."""
    from bench.tables import to_markdown

    text = (root / "bench-results/published/results.json").read_text()
    return to_markdown(json.loads(text, object_pairs_hook=_int_keys))


def benchmark_tables(config) -> str:
    # The tables' headings sit under the page's own "The run's tables" heading.
    return published_markdown(_repo(config)).replace("\n### ", "\n#### ")


def familiarity_table(config) -> str:
    from training.scores.evidence import HEADLINE, judged_table, table

    published = (_repo(config) / "bench-results/published/familiarity.json").read_text()
    parts = []
    for model_id, result in json.loads(published)["models"].items():
        runs = ", ".join(f"without {' and '.join(r['held_out'])} (seed {r['seed']})"
                         for r in result["runs"])  # fmt: skip
        parts.append(
            f"#### `{model_id}`\n\n"
            + table(result, list(HEADLINE))
            + f"\n\nAUROC / FPR@95, in %, every family, means over {len(result['runs'])} "
            f"run(s) of `{model_id}` ({runs}); {result['images_per_family']} images per family. "
            "Chosen on half the families, judged on the other half (the exportable score "
            "chosen on each split, its AUROC in % on each judging family, MSP's in brackets):"
            "\n\n" + judged_table(result) + f"\n\nMeasured {result['measured_at']} on "
            f"{result['machine']['cpu']} by `{result['command']}`."
        )
    return "\n\n".join(parts)


GENERATORS = {
    "settings": settings_reference,
    "openapi": openapi_reference,
    "benchmark": benchmark_tables,
    "familiarity": familiarity_table,
}


def check_variables(text: str, where: str, known: set[str]) -> None:
    named = {m["name"] for m in VARIABLE.finditer(text)}
    unknown = sorted(named - known - set(OTHER_VARIABLES) - NOT_VARIABLES)
    if unknown:
        raise PluginError(
            f"{where} names {', '.join(unknown)}: not a setting of service/config.py's Settings "
            "(renamed or removed?) nor one of docs/hooks/generated.py's OTHER_VARIABLES"
        )


def on_pre_build(config) -> None:
    _used.clear()
    _schema.clear()
    readme = Path(config.config_file_path).parent / "README.md"
    check_variables(readme.read_text(), "README.md", setting_names(config))


def on_files(files, config):
    root = _repo(config)
    # The published curve is shown as it is, not copied into docs/; at the path the tables
    # of bench.tables link it from.
    curve = root / "bench-results/published/latency-curve.png"
    files.append(File.generated(config, "published/latency-curve.png", abs_src_path=str(curve)))
    schema = json.dumps(openapi_schema(config), indent=2)
    files.append(File.generated(config, "openapi.json", content=schema))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    check_variables(markdown, page.file.src_uri, setting_names(config))

    def generate(match: re.Match) -> str:
        name = match["name"]
        if name not in GENERATORS:
            raise PluginError(f"{page.file.src_uri}: no generator called {name!r}")
        _used.add(name)
        return GENERATORS[name](config)

    return MARKER.sub(generate, markdown)


def on_post_build(config) -> None:
    missing = set(GENERATORS) - _used
    if missing:
        raise PluginError(f"no page asks for the generated {', '.join(sorted(missing))}")
