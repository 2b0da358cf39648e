"""The gallery recipes that need the ``adapters`` library (it pins transformers 4.x, so this file runs in the
second environment; the main environment skips it)."""

import pytest
from test_recipes import ADAPTERS_LIB, check_recipe

pytest.importorskip("adapters")


@pytest.mark.parametrize("name", sorted(ADAPTERS_LIB))
def test_adapters_library_recipe_runs_with_expected_findings(name, tmp_path, monkeypatch, capsys):
    check_recipe(name, tmp_path, monkeypatch, capsys)


def test_mam_adapter_without_the_legacy_init_is_clean(tmp_path, monkeypatch, capsys):
    from test_recipes_cli import _drop_faults, _twin, findings_of

    from callbacks.runner.cli import main

    monkeypatch.chdir(tmp_path)
    path = _twin(tmp_path, "mam_adapter_ln_before.yaml", _drop_faults)
    assert main(["run", path]) == 0, capsys.readouterr().out[-3000:]
    report = tmp_path / "out" / "failures" / "mam_adapter_ln_before" / "integrity.json"
    assert not [f for f in findings_of(report) if f.severity != "info"]
