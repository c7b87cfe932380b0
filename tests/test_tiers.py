"""The tiers tests/conftest.py sorts tests into: what `make check` leaves out is found by
a test's name or a fixture's, so a renamed test or fixture must not quietly drop a slow
test into the quick tier."""

import ast
from functools import cache
from pathlib import Path

import pytest

from tests import conftest

TESTS = Path(__file__).resolve().parent


@cache
def definitions(path: Path) -> dict[str, list[str]]:
    """Each function defined in `path` -> its decorators, as source."""
    source = path.read_text()
    return {
        node.name: [ast.get_source_segment(source, d) or "" for d in node.decorator_list]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef)
    }


@pytest.mark.parametrize("name", sorted(conftest.TIERS_BY_NAME))
def test_each_test_named_for_a_tier_exists(name):
    file, function = name.split("::")
    assert function.startswith("test_") and function in definitions(TESTS / file), name


@pytest.mark.parametrize("fixture", sorted(conftest.TIERS_BY_FIXTURE))
def test_each_fixture_named_for_a_tier_exists(fixture):
    decorators = [definitions(path).get(fixture, []) for path in sorted(TESTS.glob("*.py"))]
    assert any(d.startswith("pytest.fixture") for found in decorators for d in found), fixture
