"""``python -m callbacks run``: the quickstart ends clean (exit 0), findings exit 1, bad input exit 2."""

import os
import subprocess
import sys
import textwrap

import pytest

from callbacks.runner.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "callbacks", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_quickstart_recipe_runs_clean_by_name_from_an_empty_folder(tmp_path):
    result = run_cli("run", "quickstart", cwd=tmp_path)  # the README Quickstart: a shipped recipe by name
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no findings" in result.stdout
    assert (tmp_path / "out" / "quickstart" / "integrity.json").exists()
    assert (tmp_path / "out" / "quickstart" / "checkpoint-3" / "model.safetensors").exists()


def recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


BROKEN_TIE = """
    model:
      config: GPT2Config
      args: {vocab_size: 256, n_positions: 32, n_embd: 32, n_layer: 1, n_head: 2}
    data: {source: synthetic, seq_len: 16, rows: 16}
    trainer:
      type: TRAINER
      output_dir: OUT
      args: ARGS
    integrity:
      policy: POLICY
      checks:
        ties: {declare: [["transformer.wte.weight", "transformer.h.0.mlp.c_fc.bias"]]}
"""


@pytest.mark.parametrize("policy", ["raise", "log"])
def test_error_findings_exit_1(tmp_path, policy):
    text = (BROKEN_TIE.replace("POLICY", policy).replace("TRAINER", "hf").replace("OUT", str(tmp_path / "o"))
            .replace("ARGS", "{max_steps: 1, save_steps: 10}"))
    assert main(["run", recipe(tmp_path, text)]) == 1


def test_lightning_job_runs(tmp_path, capsys):
    text = (BROKEN_TIE.replace("POLICY", "log").replace("TRAINER", "lightning").replace("OUT", str(tmp_path / "o"))
            .replace("ARGS", "{max_steps: 1, accelerator: cpu}"))
    assert main(["run", recipe(tmp_path, text)]) == 1
    assert "TIE_BROKEN" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: {config: GPT2Config}\nintegrity: {policy: sometimes}\n", "integrity.policy"),
        ("model: {config: NotAConfig}\n", "model.config"),
        ("model: {config: GPT2Config, path: x}\n", "exactly one of"),
        ("model: {config: GPT2Config}\ntrainer: {type: hf, args: {max_stepz: 3}}\n", "trainer.args"),
        ("model: {config: GPT2Config}\ntrainr: {}\n", "unknown key 'trainr'"),
        ("model: {config: GPT2Config, args: {vocab_size: 100}}\n", "model.args.vocab_size"),
    ],
)
def test_bad_input_exits_2_with_file_and_key(tmp_path, capsys, text, message):
    path = recipe(tmp_path, text)
    assert main(["run", path]) == 2
    err = capsys.readouterr().err
    assert path in err and message in err


def test_missing_recipe_exits_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err
