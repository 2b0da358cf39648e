"""Recipe loading: the ``integrity:`` section of a training recipe, validated with pydantic.

Every problem with a recipe (missing file, malformed YAML, unknown key, wrong type, bad value) becomes one
:class:`~callbacks.errors.RecipeError` naming the file, the key path and what is allowed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from callbacks.checks import REGISTRY
from callbacks.errors import RecipeError

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

    policy: Literal["raise", "warn", "log"] = "raise"
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
        problem = f"{first['msg']} (got {first.get('input')!r})"
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


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a recipe file as a mapping; a missing file or malformed YAML is a :class:`RecipeError`."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise RecipeError(path, "", "file not found") from None
    except IsADirectoryError:
        raise RecipeError(path, "", "is a directory, expected a YAML file") from None
    except UnicodeDecodeError as err:
        raise RecipeError(path, "", f"not UTF-8 text ({err.reason})") from None
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
