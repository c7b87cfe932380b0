"""Where every mode's results go: `<out>/<name>.json` and `.md`, and the Markdown on
stdout."""

import json
from collections.abc import Callable
from pathlib import Path


def write(results: dict, out: Path, name: str, markdown_of: Callable[[dict], str]) -> None:
    """`out/NAME.json` and `out/NAME.md` (`markdown_of(results)`), and the Markdown printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    markdown = markdown_of(results)
    (out / f"{name}.md").write_text(markdown)
    print(markdown)


def cell(value: object) -> str:
    """A table cell: `-` for a value not measured."""
    return "-" if value is None else str(value)
