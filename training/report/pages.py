"""The pages: a report's numbers and sentences rendered to HTML from templates/.

Rendering reads only the report dict, the same one written to report.json, so a page shows
nothing its JSON lacks. Autoescaping is on for everything: class names, model ids and labels
come from files a user may supply.
"""

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from training.report.sentences import pct

TEMPLATES = Path(__file__).parent / "templates"

environment = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=True,
    undefined=StrictUndefined,  # a misspelt key fails the render instead of printing nothing
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
# `pct` as the sentences write percentages; `fmt` as an f-string would: {{ x|fmt(".3f") }}.
environment.filters.update(pct=pct, fmt=format)


def render(report: dict) -> str:
    """One model's index.html."""
    return environment.get_template("report.html").render(report=report)


def render_compare(comparison: dict) -> str:
    """The comparison's index.html."""
    return environment.get_template("compare.html").render(comparison=comparison)
