"""The recipes ship inside the package: ``run NAME`` finds them, ``recipes`` lists them, ``recipes copy`` writes one
out; a wheel built from this tree and installed into a fresh virtual environment runs ``run quickstart`` from an
empty folder."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import sysconfig

import pytest

from callbacks.runner.cli import EXIT_BAD_INPUT, EXIT_CLEAN, main
from callbacks.runner.packaged import packaged_recipes, recipes_folder, resolve_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_recipe_file_is_listed_by_name(capsys):
    files = glob.glob(os.path.join(ROOT, "callbacks", "recipes", "**", "*.yaml"), recursive=True)
    expected = sorted(os.path.relpath(f, os.path.join(ROOT, "callbacks", "recipes"))[:-5] for f in files)
    shipped = packaged_recipes()
    assert sorted(r.name for r in shipped) == expected and shipped[0].name == "quickstart"
    assert "failures/dead_adapter" in expected
    assert main(["recipes"]) == EXIT_CLEAN
    out = capsys.readouterr().out
    for name in expected:
        assert f"  {name} " in out
    assert all(len(line) <= 130 for line in out.splitlines()[1:])  # one short line each


@pytest.mark.parametrize("argument", ["failures/dead_adapter", "failures/dead_adapter.yaml",
                                      "recipes/failures/dead_adapter.yaml"])
def test_a_name_resolves_to_the_shipped_file(tmp_path, monkeypatch, argument):
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe(argument) == os.path.join(recipes_folder(), "failures", "dead_adapter.yaml")


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("seed: 1\n")
    assert resolve_recipe("quickstart") == "quickstart"


def test_an_unknown_name_is_bad_input_listing_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "quickstrat"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "quickstrat: file not found, and no shipped recipe has that name" in err
    assert "quickstart, failures/dead_adapter" in err


def test_copy_writes_a_starting_point_and_never_overwrites_unasked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "copy", "quickstart"]) == EXIT_CLEAN
    copied = tmp_path / "quickstart.yaml"
    with open(os.path.join(recipes_folder(), "quickstart.yaml"), encoding="utf-8") as fh:
        assert copied.read_text() == fh.read()
    assert f"wrote {copied}" in capsys.readouterr().out
    copied.write_text("# mine\n")
    assert main(["recipes", "copy", "quickstart"]) == EXIT_BAD_INPUT
    assert "exists already" in capsys.readouterr().err and copied.read_text() == "# mine\n"
    assert main(["recipes", "copy", "quickstart", "--force"]) == EXIT_CLEAN
    assert copied.read_text() != "# mine\n"
    (tmp_path / "mine").mkdir()
    assert main(["recipes", "copy", "failures/dead_adapter", "mine"]) == EXIT_CLEAN
    assert (tmp_path / "mine" / "dead_adapter.yaml").is_file()
    assert main(["recipes", "copy", "failures/nope", "x.yaml"]) == EXIT_BAD_INPUT
    assert "no shipped recipe of that name" in capsys.readouterr().err and not (tmp_path / "x.yaml").exists()
    assert main(["recipes", "copy", "quickstart", "no/such/folder/q.yaml"]) == EXIT_BAD_INPUT


@pytest.mark.slow  # builds a wheel, makes a virtual environment, trains the quickstart in a fresh interpreter
def test_wheel_installed_in_a_fresh_venv_runs_quickstart_from_an_empty_folder(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(dist), ROOT], check=True, capture_output=True, timeout=300)
    (wheel,) = glob.glob(str(dist / "integrity_callbacks-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", wheel],
                   check=True, capture_output=True, timeout=300)
    # the dependencies (torch, transformers, ...) come from this environment, appended after the fresh
    # environment's own site-packages; a plain path entry does not run this environment's .pth files, so the
    # editable install of this tree stays out and `callbacks` is the wheel's
    fresh_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(fresh_site, "dependencies.pth"), "w", encoding="utf-8") as fh:
        fh.write(sysconfig.get_paths()["purelib"] + "\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([python, "-c", "import callbacks; print(callbacks.__file__)"], cwd=empty, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(fresh_site), where
    listed = subprocess.run([python, "-m", "callbacks", "recipes"], cwd=empty, env=env, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0 and "failures/vit_unsaved_position_embeddings" in listed.stdout
    result = subprocess.run([python, "-m", "callbacks", "run", "quickstart"], cwd=empty, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out_dir = empty / "out" / "quickstart"
    assert (out_dir / "integrity.json").is_file() and (out_dir / "integrity.html").is_file()
    assert result.stdout.strip().splitlines()[-2:] == [f"integrity: training outputs in {out_dir}",
                                                       "integrity: 0 error finding(s); exit 0"]
