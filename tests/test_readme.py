"""The README's first snippets are the ones tested: the Quickstart command, the HF ``Trainer`` snippet (run as
written, with a tiny model, its arguments and a dataset in scope) and the ``LightningCLI`` config."""

from __future__ import annotations

import contextlib
import io
import os
import re

import pytest
import yaml
from models import TokenDataset, tiny_gpt2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as _fh:
    README = _fh.read()


def block_after(heading: str, language: str) -> str:
    """The first fenced ``language`` block after ``heading`` in the README."""
    start = README.index(heading)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(README, start)
    assert match is not None, f"no {language} block after {heading!r}"
    return match.group(1)


def test_quickstart_runs_a_shipped_recipe_by_name():
    commands = block_after("## Quickstart", "bash")
    (setup_and_run,) = [line for line in commands.splitlines() if "callbacks run" in line]
    assert setup_and_run.endswith("-m callbacks run quickstart")  # what tests/test_cli.py runs from an empty folder
    assert "bash scripts/test.sh" in commands  # the README's test command, which .ci/run calls
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as fh:
        assert "bash scripts/test.sh" in fh.read()


def test_hf_snippet_runs_as_written(tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments

    from callbacks.runner.packaged import copy_recipe

    monkeypatch.chdir(tmp_path)
    copy_recipe("quickstart", "recipe.yaml")
    snippet = block_after("### HF `transformers.Trainer`", "python")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    scope = {"Trainer": Trainer, "model": tiny_gpt2(), "args": args, "ds": TokenDataset()}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    assert scope["trainer"].state.global_step == 2
    assert [f for f in scope["cb"].findings if f.severity != "info"] == []
    assert "integrity report" in printed.getvalue()


def test_lightning_cli_config_snippet_trains(tmp_path):
    pytest.importorskip("jsonargparse")
    from test_lightning_cli import run_cli

    snippet = yaml.safe_load(block_after("`LightningCLI` (either package", "yaml"))
    (entry,) = snippet["trainer"]["callbacks"]
    config = {"trainer": {"max_steps": 2, "accelerator": "cpu", "devices": 1, "logger": False,
                          "enable_checkpointing": False, "enable_progress_bar": False,
                          "enable_model_summary": False, "default_root_dir": str(tmp_path), "callbacks": [entry]}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = run_cli("pytorch_lightning", ["fit", "--config", str(path)])
    (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "IntegrityCallback"]
    assert cli.trainer.global_step == 2 and callback.monitor.config.checks.hashes.every_n_steps == 1
