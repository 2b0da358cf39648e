"""Hostile recipe files: each is a clear RecipeError (exit 2 from the CLI) in bounded time, never a hang."""

from __future__ import annotations

import os
import time

import pytest

from callbacks.errors import RecipeError
from callbacks.recipe import load_recipe, read_yaml

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(9)
) + "integrity: {policy: *j}\n"


def _write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_alias_bomb_is_refused_fast(tmp_path):
    path = _write(tmp_path, BOMB)
    start = time.monotonic()
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert time.monotonic() - start < 10
    assert str(path) in str(info.value) and "alias" in info.value.problem


def test_deep_nesting_is_refused(tmp_path):
    path = _write(tmp_path, "integrity: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RecipeError) as info:
        read_yaml(path)
    assert "nesting" in info.value.problem


def test_duplicate_key_is_refused(tmp_path):
    path = _write(tmp_path, "integrity:\n  policy: warn\n  policy: raise\n")
    with pytest.raises(RecipeError) as info:
        read_yaml(path)
    assert "duplicate key 'policy'" in info.value.problem and "line 3" in info.value.problem


def test_recursive_alias_is_refused(tmp_path):
    path = _write(tmp_path, "integrity: &a {checks: *a}\n")
    with pytest.raises(RecipeError) as info:
        read_yaml(path)
    assert "recursive alias" in info.value.problem


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "recipe.yaml"
    os.mkfifo(path)
    with pytest.raises(RecipeError) as info:
        read_yaml(path)
    assert "not a regular file" in info.value.problem


def test_symlink_loop_is_refused(tmp_path):
    path = tmp_path / "recipe.yaml"
    os.symlink(path, path)
    with pytest.raises(RecipeError) as info:
        read_yaml(path)
    assert str(path) in str(info.value)


def test_oversized_file_is_refused(tmp_path):
    path = _write(tmp_path, "# " + "x" * (2 << 20) + "\n")
    with pytest.raises(RecipeError) as info:
        read_yaml(path)
    assert "larger than" in info.value.problem


def test_healthy_recipe_with_aliases_loads(tmp_path):
    path = _write(tmp_path, "base: &p warn\nintegrity:\n  policy: *p\n")
    assert load_recipe(path).policy == "warn"


@pytest.mark.parametrize("text", [BOMB, "model: {a: 1, a: 2}\n", "integrity: &a {checks: *a}\n"])
def test_cli_run_exits_2_naming_the_file(tmp_path, capsys, text):
    from callbacks.runner.cli import main

    path = _write(tmp_path, text)
    start = time.monotonic()
    assert main(["run", str(path)]) == 2
    assert time.monotonic() - start < 10
    assert str(path) in capsys.readouterr().err


QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "callbacks", "recipes",
                          "quickstart.yaml")


def _quickstart_with(tmp_path, **changes):
    import yaml

    with open(QUICKSTART) as fh:
        recipe = yaml.safe_load(fh)
    for dotted, value in changes.items():
        node = recipe
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    recipe.setdefault("trainer", {})["output_dir"] = recipe.get("trainer", {}).get("output_dir") or "out"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(("changes", "key"), [
    ({"seed": -1}, "seed"),
    ({"seed": 2**97}, "seed"),
    ({"data__rows": 10**11}, "data.rows"),
    ({"trainer__resume_from": "no/such/checkpoint-3"}, "trainer.resume_from"),
])
def test_cli_run_exits_2_on_out_of_bounds_values(tmp_path, capsys, changes, key):
    from callbacks.runner.cli import main

    path = _quickstart_with(tmp_path, **changes)
    start = time.monotonic()
    assert main(["run", str(path)]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert str(path) in err and key in err, err


def test_cli_run_exits_2_when_the_output_folder_cannot_be_written(tmp_path, capsys):
    from callbacks.runner.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder's parent should be")
    path = _quickstart_with(tmp_path, trainer__output_dir=str(blocker / "out"))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "trainer.output_dir" in err, err


def test_a_typo_in_model_args_names_the_closest_arguments(tmp_path, capsys):
    from callbacks.runner.cli import main

    path = _quickstart_with(tmp_path, model__config="GPT2Config", model__args={"n_layers": 2, "n_embd": 32})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "model.args" in err and "'n_layers'" in err and "'n_layer'" in err, err


def test_model_args_by_alias_are_accepted():
    from transformers import GPT2Config

    from callbacks.runner.job import config_arguments

    known = config_arguments(GPT2Config)
    assert {"n_layer", "n_embd", "hidden_size", "num_hidden_layers", "tie_word_embeddings", "vocab_size"} <= known


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_cli_run_exits_2_when_the_report_path_cannot_be_written(tmp_path, capsys, where):
    from callbacks.runner.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    report = tmp_path if where == "folder" else blocker / "integrity.json"
    path = _quickstart_with(tmp_path, integrity__report=str(report), trainer__output_dir=str(tmp_path / "out"))
    start = time.monotonic()
    assert main(["run", str(path)]) == 2
    assert time.monotonic() - start < 10  # refused before any training
    err = capsys.readouterr().err
    assert str(path) in err and "integrity.report" in err, err
