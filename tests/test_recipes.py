"""Every recipe in ``recipes/`` is a test: ``run`` on it ends with the expected exit code, and each gallery
recipe prints the finding it reproduces (code, parameters, event@step) with its fix.

A recipe without an entry in :data:`EXPECTED` fails :func:`test_every_recipe_has_an_expectation`.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from callbacks.findings import Finding
from callbacks.runner.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "callbacks", "recipes")

#: recipe (relative to recipes/) -> (exit code, [(code, event, step, params)] that must be among the findings).
#: A finding matches when code, event and step are equal and each expected parameter name is the end of one of
#: its parameter names (a LightningModule prefixes its attribute name). Gallery recipes must find exactly their
#: failure's codes among the error findings.
EXPECTED: dict[str, tuple[int, list[tuple[str, str, int | None, tuple[str, ...]]]]] = {
    "quickstart.yaml": (0, []),
    "failures/meta_init_tie.yaml": (
        1, [("TIE_BROKEN", "init", 0, ("output.weight", "tok_embeddings.weight"))]),
    "failures/untied_checkpoint_resume.yaml": (
        1, [("TIE_CHECKPOINT_CONFLICT", "load", 2, ("lm_head.weight", "transformer.wte.weight"))]),
    "failures/frozen_weight_moves.yaml": (
        1, [("FROZEN_CHANGED", "step", 1, ("tok_embeddings.weight",))]),
    "failures/replicas_diverge.yaml": (
        1, [("GRAD_REPLICA_MISMATCH", "step", 1, ("tok_embeddings.weight", "layers.0.1.weight")),
            ("PARAM_REPLICA_MISMATCH", "step", 1, ("tok_embeddings.weight", "layers.0.1.weight"))]),
    "failures/tied_lm_head_merge.yaml": (
        1, [("MERGE_SIDE_EFFECT", "merge", 2, ("model.embed_tokens.weight",)),
            ("MERGE_MISMATCH", "merge", 2, ("model.embed_tokens.weight",)),
            ("TIE_BROKEN", "merge", 2, ("lm_head.weight", "model.embed_tokens.weight"))]),
    "failures/vit_unsaved_position_embeddings.yaml": (
        1, [("UNSAVED_TRAINABLE", "init", 0, ("vit.embeddings.position_embeddings",)),
            ("UNSAVED_TRAINABLE", "checkpoint", 2, ("vit.embeddings.position_embeddings",))]),
    "failures/reinit_adapter.yaml": (
        1, [("ADAPTER_INIT_WRONG", "init", 0, ("transformer.h.0.attn.c_attn.lora_B.default.weight",)),
            ("ADAPTER_NOT_IDENTITY", "init", 0, ("transformer.h.0.attn.c_attn.lora_B.default.weight",))]),
    "failures/dead_adapter.yaml": (
        1, [("ADAPTER_DEAD", "step", 1, ("transformer.h.0.attn.c_attn.lora_A.default.weight",
                                         "transformer.h.0.attn.c_attn.lora_B.default.weight"))]),
    "failures/mam_adapter_ln_before.yaml": (
        1, [("ADAPTER_INIT_WRONG", "init", 0, ("bert.encoder.layer.0.output.adapters.bn.adapter_norm_before.weight",
                                               "bert.encoder.layer.1.output.adapters.bn.adapter_norm_before.weight"))]),
}

#: recipes that need the `adapters` library (transformers 4.x): run by test_recipes_adapters_lib.py in the
#: second environment
ADAPTERS_LIB: set[str] = {"failures/mam_adapter_ln_before.yaml"}

#: recipes that launch several processes (torchrun): run as a subprocess, not in-process
MULTI_PROCESS: set[str] = {"failures/replicas_diverge.yaml"}


def all_recipes() -> list[str]:
    """Every recipe file under recipes/, relative to it."""
    paths = glob.glob(os.path.join(RECIPES, "**", "*.yaml"), recursive=True)
    return sorted(os.path.relpath(p, RECIPES) for p in paths)


def test_every_recipe_has_an_expectation():
    assert set(all_recipes()) == set(EXPECTED), "add the new recipe to EXPECTED (or remove a stale entry)"


def _report(tmp_path) -> dict:
    paths = glob.glob(str(tmp_path / "out" / "**" / "integrity.json"), recursive=True)
    assert len(paths) == 1, paths
    with open(paths[0], encoding="utf-8") as fh:
        return json.load(fh)


def _matches(finding: Finding, code: str, event: str, step: int | None, params: tuple[str, ...]) -> bool:
    if (finding.code, finding.event, finding.step) != (code, event, step):
        return False
    return all(any(p == want or p.endswith("." + want) for p in finding.params) for want in params)


def check_recipe(name: str, tmp_path, monkeypatch, capsys) -> None:
    """Run recipe ``name`` and assert its exit code, findings, console table with fixes and HTML report."""
    monkeypatch.chdir(tmp_path)  # recipes write under out/ relative to the working directory
    path = os.path.join(RECIPES, name)
    exit_code, expected = EXPECTED[name]
    if name in MULTI_PROCESS:
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-m", "callbacks", "run", path], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=240)
        code, out = result.returncode, result.stdout
        assert code == exit_code, result.stdout[-3000:] + result.stderr[-3000:]
        assert out.count("integrity report") == 1 and out.count("error finding(s); exit") == 1, \
            "the summary is printed by rank 0 only"
    else:
        code = main(["run", path])
        out = capsys.readouterr().out
        assert code == exit_code, out[-3000:]
    report = _report(tmp_path)
    findings = [Finding.from_dict(d) for d in report["findings"]]
    for item in expected:
        assert any(_matches(f, *item) for f in findings), \
            f"{item} not among {sorted((f.code, f.event, f.step, f.params) for f in findings)}"
    # the console table names each expected code and prints its fix; nothing else is an error
    error_codes = {f.code for f in findings if f.severity == "error"}
    assert error_codes == {item[0] for item in expected}
    for f in findings:
        if f.severity == "error":
            assert f.code in out and f.hint and f.hint in out
    if not expected:
        assert "no findings" in out
    html_paths = glob.glob(str(tmp_path / "out" / "**" / "integrity.html"), recursive=True)
    assert len(html_paths) == 1
    with open(html_paths[0], encoding="utf-8") as fh:
        page = fh.read()
    for code, event, step, _ in expected:  # a timeline row per code, a column per moment
        assert f'<td class="code">{code}</td>' in page and f"<th>{event}@{step}</th>" in page


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in MULTI_PROCESS else n
                                  for n in sorted(set(EXPECTED) - ADAPTERS_LIB)])
def test_recipe_runs_with_expected_findings(name, tmp_path, monkeypatch, capsys):
    check_recipe(name, tmp_path, monkeypatch, capsys)
