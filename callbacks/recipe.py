"""Recipe loading: the ``integrity:`` section of a training recipe, validated with pydantic.

Every problem with a recipe (missing file, malformed YAML, unknown key, wrong type, bad value) becomes one
:class:`~callbacks.errors.RecipeError` naming the file, the key path and what is allowed.
"""

from __future__ import annotations

import os
import reprlib
import stat
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from callbacks.checks import REGISTRY
from callbacks.errors import RecipeError

#: what happens at an error finding: raise ``IntegrityError``, issue a warning, or only log it
Policy = Literal["raise", "warn", "log"]

#: the top-level section of a recipe this package reads; other top-level keys belong to the training job
SECTION = "integrity"

#: ``checks:`` section: one optional sub-model per registered check family
ChecksConfig: type[BaseModel] = create_model(
    "ChecksConfig",
    __config__=ConfigDict(extra="forbid", frozen=True),
    **{name: (cls.Config, Field(default_factory=cls.Config)) for name, cls in REGISTRY.items()},
)


class IntegrityConfig(BaseModel):
    """The validated ``integrity:`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Policy = "raise"
    report: str | None = None
    checks: ChecksConfig = Field(default_factory=ChecksConfig)  # type: ignore[valid-type]


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of ``loc`` (for listing allowed keys)."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = field.annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def describe_validation_error(model: type[BaseModel], err: ValidationError, prefix: str) -> tuple[str, str]:
    """Turn the first pydantic error into (key path, problem with what is allowed)."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in (prefix, *loc) if p != "")
    if first["type"] == "extra_forbidden":
        owner = _model_at(model, loc)
        allowed = sorted(owner.model_fields) if owner else []
        problem = f"unknown key {loc[-1]!r}; allowed keys: {', '.join(allowed)}"
    elif first["type"] in ("model_type", "dict_type") :
        problem = f"expected a mapping, got {type(first.get('input')).__name__}"
    else:
        problem = f"{first['msg']} (got {_short_repr(first.get('input'))})"
    count = len(err.errors())
    if count > 1:
        problem += f" (and {count - 1} more problem(s))"
    return key, problem


def parse_integrity_section(data: Any, *, source: str = "<arguments>", prefix: str = SECTION) -> IntegrityConfig:
    """Validate an ``integrity:`` mapping; raise :class:`RecipeError` naming ``source`` and the key path."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RecipeError(source, prefix, f"expected a mapping, got {type(data).__name__}")
    try:
        return IntegrityConfig.model_validate(dict(data))
    except ValidationError as err:
        key, problem = describe_validation_error(IntegrityConfig, err, prefix)
        raise RecipeError(source, key, problem) from None


#: bounds on a recipe file, so that hostile input (alias bombs, deep nesting, huge files) fails fast
MAX_RECIPE_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_DEPTH = 100

_REPR = reprlib.Repr()
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlevel = 3


def _short_repr(value: Any) -> str:
    """A repr bounded in size whatever the input (an alias bomb's full repr is gigabytes)."""
    return _REPR.repr(value)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and bounds node count (aliases expanded) and depth before constructing."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:  # type: ignore[override]
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_short_repr(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_bounds(root: yaml.Node) -> None:
    """Count nodes with aliases expanded (memoised per node) and the nesting depth; raise past the bounds."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    active: set[int] = set()
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_DEPTH:
            raise RecipeError("", "", f"nesting deeper than {MAX_DEPTH} levels")
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            active.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_NODES:
                raise RecipeError("", "", f"more than {MAX_NODES} nodes once aliases are expanded (alias bomb?)")
            continue
        if id(node) in sizes:
            continue
        if id(node) in active:
            raise RecipeError("", "", "recursive alias (a node contains itself)")
        active.add(id(node))
        stack.append((node, depth, True))
        for child in children:
            if id(child) in active:
                raise RecipeError("", "", "recursive alias (a node contains itself)")
            if id(child) not in sizes:
                stack.append((child, depth + 1, False))


def _read_text(path: str) -> str:
    """Read at most :data:`MAX_RECIPE_BYTES` from a regular file (a FIFO, device or symlink loop is refused)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise RecipeError(path, "", "file not found") from None
    except OSError as err:
        raise RecipeError(path, "", f"cannot read: {err.strerror or err}") from None
    if stat.S_ISDIR(info.st_mode):
        raise RecipeError(path, "", "is a directory, expected a YAML file")
    if not stat.S_ISREG(info.st_mode):
        raise RecipeError(path, "", "not a regular file (a FIFO, socket or device), expected a YAML file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_RECIPE_BYTES + 1)
    except OSError as err:
        raise RecipeError(path, "", f"cannot read: {err.strerror or err}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(path, "", f"larger than {MAX_RECIPE_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(path, "", f"not UTF-8 text ({err.reason})") from None


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a recipe file as a mapping; any unreadable, oversized, hostile or malformed file is a RecipeError."""
    path = os.fspath(path)
    text = _read_text(path)
    try:
        loader = _BoundedLoader(text)
        try:
            root = loader.get_single_node()
            if root is not None:
                try:
                    _check_bounds(root)
                except RecipeError as err:
                    raise RecipeError(path, "", err.problem) from None
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except RecursionError:
        raise RecipeError(path, "", f"nesting deeper than {MAX_DEPTH} levels") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(path, "", f"malformed YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(path, "", f"the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_recipe(path: str | os.PathLike[str]) -> IntegrityConfig:
    """Read ``path`` and validate its ``integrity:`` section (absent means every check at its defaults)."""
    data = read_yaml(path)
    return parse_integrity_section(data.get(SECTION), source=os.fspath(path))
