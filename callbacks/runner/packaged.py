"""The recipes shipped inside the package (``callbacks/recipes/``): the quickstart and the failure gallery.

``python -m callbacks run quickstart`` and ``run failures/dead_adapter`` find them by name, ``recipes`` lists them,
``recipes copy NAME`` writes one out as a starting point. A recipe argument that names an existing file is that
file; otherwise it is looked up here by name (with or without ``.yaml``). Relative paths inside any recipe
(``trainer.output_dir``, ``integrity.report``, ``trainer.resume_from``, ...) are read from the current folder,
the way HF's ``output_dir`` is: a packaged recipe run from an empty folder writes ``out/<name>/`` there.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from importlib import resources

from callbacks.errors import RecipeError

SUFFIX = ".yaml"


@dataclasses.dataclass(frozen=True)
class PackagedRecipe:
    """One shipped recipe: ``name`` (``quickstart``, ``failures/dead_adapter``), its file, its first comment line."""

    name: str
    path: str
    summary: str


def recipes_folder() -> str:
    """The folder of the shipped recipes (inside the installed package)."""
    return os.fspath(resources.files("callbacks") / "recipes")


def _summary(path: str) -> str:
    """The recipe's opening comment, as one line: what it reproduces."""
    lines = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    first = text.split(". ")[0].rstrip(".")
    return first if len(first) <= 72 else first[:69] + "..."


def packaged_recipes() -> list[PackagedRecipe]:
    """Every shipped recipe, sorted by name (the quickstart first)."""
    root = recipes_folder()
    found = []
    for folder, _, files in os.walk(root):
        for file in files:
            if file.endswith(SUFFIX):
                path = os.path.join(folder, file)
                name = os.path.relpath(path, root)[: -len(SUFFIX)].replace(os.sep, "/")
                found.append(PackagedRecipe(name, path, _summary(path)))
    return sorted(found, key=lambda r: (r.name != "quickstart", r.name))


def packaged_recipe(name: str) -> PackagedRecipe | None:
    """The shipped recipe called ``name`` (``failures/dead_adapter`` or ``failures/dead_adapter.yaml``), if any."""
    wanted = name.replace(os.sep, "/").removesuffix(SUFFIX).removeprefix("recipes/")
    return next((r for r in packaged_recipes() if r.name == wanted), None)


def resolve_recipe(argument: str) -> str:
    """The recipe file ``argument`` means: an existing file as given, else the shipped recipe of that name.

    Neither is a :class:`RecipeError` listing the shipped names."""
    if os.path.isfile(argument):
        return argument
    shipped = packaged_recipe(argument)
    if shipped is not None:
        return shipped.path
    if os.path.exists(argument):
        return argument  # a folder or a FIFO: reading it gives the precise error
    names = ", ".join(r.name for r in packaged_recipes())
    raise RecipeError(argument, "", f"file not found, and no shipped recipe has that name; shipped recipes: {names} "
                                    "(python -m callbacks recipes lists them)")


def copy_recipe(name: str, destination: str | None = None, *, overwrite: bool = False) -> str:
    """Write the shipped recipe ``name`` to ``destination`` (a file, or a folder to put ``<base name>.yaml`` in;
    default the current folder) and return the path written. An existing file is kept unless ``overwrite``."""
    shipped = packaged_recipe(name)
    if shipped is None:
        names = ", ".join(r.name for r in packaged_recipes())
        raise RecipeError(name, "", f"no shipped recipe of that name; shipped recipes: {names}")
    target = destination or os.curdir
    if os.path.isdir(target):
        target = os.path.join(target, os.path.basename(shipped.path))
    if os.path.exists(target) and not overwrite:
        raise RecipeError(target, "", "exists already; choose another path or pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise RecipeError(target, "", f"the folder {parent} does not exist")
    shutil.copyfile(shipped.path, target)
    return target
