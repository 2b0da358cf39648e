"""Saved keys <-> live parameter names: the one place that says which key of a checkpoint holds which parameter.

Both sides are brought to a *saved name* by :func:`saved_name`:

- wrapper prefixes and PEFT's ``base_layer`` segment go (:func:`callbacks.primitives.naming.user_name`: DDP
  ``module.``, compile ``_orig_mod.``, FSDP, PEFT's ``base_model.model.``);
- PEFT adapter names go: live ``q_proj.lora_A.default.weight`` is saved as ``q_proj.lora_A.weight``
  (``get_peft_model_state_dict`` removes ``.<adapter>``);
- ``modules_to_save`` wrappers go: the trainable copy ``classifier.modules_to_save.default.weight`` is saved as
  ``classifier.weight``; the frozen ``original_module`` copy keeps its own name and never stands in for it.

A checkpoint may nest the model's keys under a prefix (accelerate FSDP's DCP ``model.``, a custom
``{"model": state_dict}``): :func:`choose_prefix` picks the prefix under which most keys name live parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from callbacks.primitives.naming import find_peft_model, user_name

#: PEFT's wrapper of a module listed in ``modules_to_save``: ``<module>.modules_to_save.<adapter>.<param>``
MODULES_TO_SAVE = "modules_to_save"
#: DoRA's magnitude: live ``<layer>.lora_magnitude_vector.<adapter>.weight``, saved ``<layer>.lora_magnitude_vector``
DORA_MAGNITUDE = "lora_magnitude_vector"
#: PEFT prompt learning: every ``prompt_encoder.<adapter>.*`` parameter is saved as the one ``prompt_embeddings``
PROMPT_ENCODER, PROMPT_EMBEDDINGS = "prompt_encoder", "prompt_embeddings"


def adapter_names(model: Any) -> tuple[str, ...]:
    """Names of the PEFT adapters of ``model`` (empty for a model without PEFT)."""
    peft_model = find_peft_model(model)
    config = getattr(peft_model, "peft_config", None)
    return tuple(config) if isinstance(config, Mapping) else ()


def saved_name(name: str, adapters: Iterable[str] = ()) -> str:
    """The name under which a checkpoint stores parameter ``name`` (a live name or a saved key).

    ``adapters`` are the PEFT adapter names whose path segments are removed (PEFT removes ``.<adapter>``).
    """
    return _saved_name(name, tuple(adapters))


@functools.lru_cache(maxsize=1 << 17)
def _saved_name(name: str, adapters: tuple[str, ...]) -> str:
    # cached: every checkpoint event maps the same few thousand names again
    name = user_name(name)
    adapters = set(adapters)
    if adapters and name.split(".", 1)[0] == PROMPT_ENCODER:
        return PROMPT_EMBEDDINGS  # prompt learning saves the encoder's output under one key
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
    if out[-2:] == [DORA_MAGNITUDE, "weight"] and adapters:
        out.pop()  # PEFT saves DoRA's lora_magnitude_vector.<adapter>.weight without ".weight"
    return ".".join(out)


def adapter_of(name: str, adapters: Iterable[str]) -> str | None:
    """The PEFT adapter a live name belongs to (its first path segment that is an adapter name), or None."""
    adapters = set(adapters)
    return next((part for part in name.split(".") if part in adapters), None) if adapters else None


def _prefixes(keys: Iterable[str]) -> list[str]:
    found = {""}
    for key in keys:
        first, dot, _ = key.partition(".")
        if dot:
            found.add(first + ".")
    return sorted(found, key=len)


def choose_prefix(keys: Iterable[str], live: Iterable[str], adapters: Iterable[str] = ()) -> str:
    """The prefix under which ``keys`` name the model's parameters (``""`` or a first segment like ``model.``).

    ``live`` are the live parameters' saved names. The prefix whose keys name the most live parameters wins;
    ties go to the shorter prefix.
    """
    keys, live_set, adapters = list(keys), set(live), tuple(adapters)
    best_prefix, best_hits = "", -1
    for prefix in _prefixes(keys):
        names = {saved_name(k[len(prefix):], adapters) for k in keys if k.startswith(prefix)}
        hits = len(live_set & names)
        if hits > best_hits:
            best_prefix, best_hits = prefix, hits
        if best_hits == len(live_set):
            break  # every live name found (the usual case, prefix ""): no other prefix can do better
    return best_prefix


#: a parameter's identity in a checkpoint: (adapter tag, saved name). The tag is the PEFT adapter the tensor
#: belongs to ("" for parameters of no adapter), because every adapter saves ``...lora_A.weight`` alike.
SavedKey = tuple[str, str]

#: PEFT's ``save_pretrained`` writes adapter ``default`` into the folder itself, others into ``<folder>/<name>``
DEFAULT_ADAPTER = "default"


def live_key(raw: str, adapters: Sequence[str]) -> SavedKey:
    """The (adapter tag, saved name) of a live parameter name."""
    return adapter_of(raw, adapters) or "", saved_name(raw, adapters)


def checkpoint_key(key: str, group: str, adapters: Sequence[str]) -> SavedKey:
    """The (adapter tag, saved name) of a checkpoint key read from sub-checkpoint ``group``.

    The tag is the adapter named inside the key (full state dicts keep ``.lora_A.<adapter>.``), else the
    sub-folder's adapter (PEFT writes adapter ``x`` to ``<folder>/x`` without its name in the keys), else
    ``default`` for the folder itself when the model has that adapter.
    """
    tag = adapter_of(key, adapters)
    if tag is None:
        if group in adapters:
            tag = group
        elif group == "" and DEFAULT_ADAPTER in adapters:
            tag = DEFAULT_ADAPTER
        else:
            tag = ""
    return tag, saved_name(key, adapters)


class SavedIndex:
    """The keys of a checkpoint (group -> keys) indexed by :data:`SavedKey`, after stripping the chosen prefix.

    ``lookup((tag, name))`` finds the key that saves a live parameter: the same tag and name, or for a
    parameter of no adapter (tag ``""``) the name under any tag (PEFT files tag every root key ``default``).
    """

    def __init__(self, groups: Mapping[str, Iterable[str]], live_names: Iterable[str], adapters: Sequence[str]):
        self.adapters = tuple(adapters)
        live_names = set(live_names)
        self.exact: dict[SavedKey, tuple[str, str]] = {}
        self.by_name: dict[str, tuple[str, str]] = {}
        self.prefixes: dict[str, str] = {}
        for group, keys in groups.items():
            keys = list(keys)
            prefix = self.prefixes[group] = choose_prefix(keys, live_names, self.adapters)
            for key in keys:
                if not key.startswith(prefix):
                    continue
                tag, name = checkpoint_key(key[len(prefix):], group, self.adapters)
                self.exact.setdefault((tag, name), (group, key))
                self.by_name.setdefault(name, (group, key))

    def lookup(self, key: SavedKey) -> tuple[str, str] | None:
        """``(group, checkpoint key)`` saving the live parameter ``key``, or None."""
        found = self.exact.get(key)
        if found is None and key[0] == "":
            found = self.by_name.get(key[1])
        return found

    def __len__(self) -> int:
        return len(self.exact)


def owner_module(name: str) -> tuple[str, str]:
    """``(module path, attribute)`` of a dotted parameter name (``"vit.embeddings"``, ``"position_embeddings"``)."""
    module, _, attr = name.rpartition(".")
    return module, attr
