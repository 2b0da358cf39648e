"""The gallery recipes that need the ``adapters`` library (it pins transformers 4.x, so this file runs in the
second environment; the main environment skips it)."""

import pytest
from test_recipes import ADAPTERS_LIB, check_recipe

pytest.importorskip("adapters")


@pytest.mark.parametrize("name", sorted(ADAPTERS_LIB))
def test_adapters_library_recipe_runs_with_expected_findings(name, tmp_path, monkeypatch, capsys):
    check_recipe(name, tmp_path, monkeypatch, capsys)
