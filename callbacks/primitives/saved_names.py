"""Saved keys <-> live parameter names: the one place that says which key of a checkpoint holds which parameter.

Both sides are brought to a *saved name* by :func:`saved_name`:

- wrapper prefixes and PEFT's ``base_layer`` segment go (:func:`callbacks.primitives.naming.user_name`: DDP
  ``module.``, compile ``_orig_mod.``, FSDP, PEFT's ``base_model.model.``);
- PEFT adapter names go: live ``q_proj.lora_A.default.weight`` is saved as ``q_proj.lora_A.weight``
  (``get_peft_model_state_dict`` removes ``.<adapter>``);
- ``modules_to_save`` wrappers go: the trainable copy ``classifier.modules_to_save.default.weight`` is saved as
  ``classifier.weight``; the frozen ``original_module`` copy keeps its own name and never stands in for it.

A checkpoint may nest the model's keys under a prefix (accelerate FSDP's DCP ``model.``, a custom
``{"model": state_dict}``): :func:`match_saved_keys` picks the prefix under which most keys name live parameters.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from callbacks.primitives.naming import named_parameters_all, user_name

#: PEFT's wrapper of a module listed in ``modules_to_save``: ``<module>.modules_to_save.<adapter>.<param>``
MODULES_TO_SAVE = "modules_to_save"


def find_peft_model(model: Any) -> Any | None:
    """The ``peft.PeftModel`` at or inside ``model``'s wrappers (DDP, compile, FSDP), or None."""
    peft = sys.modules.get("peft")
    peft_cls = getattr(peft, "PeftModel", None) if peft is not None else None
    if peft_cls is None:
        return None
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, peft_cls):
            return model
        for attr in ("module", "_orig_mod", "_fsdp_wrapped_module"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return None
    return None


def adapter_names(model: Any) -> tuple[str, ...]:
    """Names of the PEFT adapters of ``model`` (empty for a model without PEFT)."""
    peft_model = find_peft_model(model)
    config = getattr(peft_model, "peft_config", None)
    return tuple(config) if isinstance(config, Mapping) else ()


def saved_name(name: str, adapters: Iterable[str] = ()) -> str:
    """The name under which a checkpoint stores parameter ``name`` (a live name or a saved key).

    ``adapters`` are the PEFT adapter names whose path segments are removed (PEFT removes ``.<adapter>``).
    """
    name = user_name(name)
    adapters = set(adapters)
    if not adapters and f".{MODULES_TO_SAVE}." not in name:
        return name
    parts = name.split(".")
    out = []
    i = 0
    while i < len(parts):
        part = parts[i]
        if part == MODULES_TO_SAVE and i + 1 < len(parts) and (not adapters or parts[i + 1] in adapters):
            i += 2  # <module>.modules_to_save.<adapter>.<param> -> <module>.<param>
            continue
        if part in adapters and out:
            i += 1
            continue
        out.append(part)
        i += 1
    return ".".join(out)


def live_saved_names(model: nn.Module, adapters: Iterable[str] = ()) -> dict[str, str]:
    """Every live parameter's saved name -> its user name (duplicates of tied tensors included)."""
    adapters = tuple(adapters)
    out: dict[str, str] = {}
    for raw, name, _ in named_parameters_all(model):
        out.setdefault(saved_name(raw, adapters), name)
    return out


def _prefixes(keys: Iterable[str]) -> list[str]:
    found = {""}
    for key in keys:
        first, dot, _ = key.partition(".")
        if dot:
            found.add(first + ".")
    return sorted(found, key=len)


def match_saved_keys(keys: Iterable[str], live: Iterable[str], adapters: Iterable[str] = ()) -> tuple[
        str, dict[str, str]]:
    """The prefix under which ``keys`` name the model's parameters, and saved name -> key under it.

    ``live`` are the live parameters' saved names (:func:`live_saved_names`). The prefix (``""`` or a first
    path segment such as ``model.``) is the one whose keys name the most live parameters; ties go to the
    shorter prefix.
    """
    keys, live_set, adapters = list(keys), set(live), tuple(adapters)
    best_prefix, best_map, best_hits = "", {}, -1
    for prefix in _prefixes(keys):
        mapping: dict[str, str] = {}
        for key in keys:
            if key.startswith(prefix):
                mapping.setdefault(saved_name(key[len(prefix):], adapters), key)
        hits = len(live_set.intersection(mapping))
        if hits > best_hits:
            best_prefix, best_map, best_hits = prefix, mapping, hits
    return best_prefix, best_map


def owner_module(name: str) -> tuple[str, str]:
    """``(module path, attribute)`` of a dotted parameter name (``"vit.embeddings"``, ``"position_embeddings"``)."""
    module, _, attr = name.rpartition(".")
    return module, attr
