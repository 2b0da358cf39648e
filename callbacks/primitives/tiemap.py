"""The tie map: which parameters share storage, under every name, and which ties are expected.

A *tie group* is a set of parameter names that alias the same memory (one ``Parameter`` object registered
under several names, or views of one storage with the same offset, shape and stride). Names are user names
(see :mod:`callbacks.primitives.naming`).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from callbacks.primitives.naming import named_parameters_all, storage_key, unwrap_model, user_name, user_namer
from callbacks.primitives.zero import true_numel, true_shape


@dataclasses.dataclass(frozen=True)
class TieGroup:
    """Names (sorted) that alias one tensor; ``same_object`` when they are one ``Parameter`` object."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    numel: int
    same_object: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"names": list(self.names), "shape": list(self.shape), "numel": self.numel,
                "same_object": self.same_object}


@dataclasses.dataclass(frozen=True)
class TieMap:
    """Tie groups of a model, and its parameter counts with and without duplicates.

    ``count_with_duplicates`` counts every name (what ``named_parameters(remove_duplicate=False)`` sums);
    ``count_unique`` counts each tensor once (what ``model.parameters()`` sums). Their difference is the
    "133 vs 134 parameters" confusion of tied models.
    """

    groups: tuple[TieGroup, ...]
    names: tuple[str, ...]
    tensors_with_duplicates: int
    tensors_unique: int
    count_with_duplicates: int
    count_unique: int

    def group_of(self, name: str) -> TieGroup | None:
        """The tie group containing ``name``, if it is tied."""
        for group in self.groups:
            if name in group.names:
                return group
        return None

    def shares(self, names: Iterable[str]) -> bool:
        """Whether all ``names`` are in one tie group."""
        names = list(names)
        group = self.group_of(names[0]) if names else None
        return group is not None and all(n in group.names for n in names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the report."""
        return {
            "groups": [g.to_dict() for g in self.groups],
            "tensors_with_duplicates": self.tensors_with_duplicates,
            "tensors_unique": self.tensors_unique,
            "parameters_with_duplicates": self.count_with_duplicates,
            "parameters_unique": self.count_unique,
        }


def build_tie_map(model: nn.Module, parameters: Iterable[tuple[str, str, Any]] | None = None) -> TieMap:
    """Group ``model``'s parameters by the memory they alias. Reads identities and pointers only.

    ``parameters``: the (raw name, user name, parameter) triples of :func:`named_parameters_all`, when the
    caller already walked the model (a walk of a large model costs more than the grouping). Shapes and counts
    are the full tensors' (a DeepSpeed ZeRO-3 placeholder counts its ``ds_numel``, not its empty ``data``); ties of
    such placeholders are one ``Parameter`` object under several names, which is what DeepSpeed keeps tied.
    """
    by_key: dict[tuple[Any, ...], list[tuple[str, Any]]] = {}
    all_names: list[str] = []
    count_dup = 0
    for _raw, name, param in (named_parameters_all(model) if parameters is None else parameters):
        all_names.append(name)
        count_dup += true_numel(param)
        by_key.setdefault(storage_key(param), []).append((name, param))
    groups = []
    count_unique = 0
    for members in by_key.values():
        count_unique += true_numel(members[0][1])
        names = tuple(sorted({n for n, _ in members}))
        if len(names) < 2:
            continue
        first = members[0][1]
        groups.append(TieGroup(names=names, shape=true_shape(first), numel=true_numel(first),
                               same_object=all(p is first for _, p in members)))
    groups.sort(key=lambda g: g.names)
    return TieMap(groups=tuple(groups), names=tuple(all_names), tensors_with_duplicates=len(all_names),
                  tensors_unique=len(by_key), count_with_duplicates=count_dup, count_unique=count_unique)


@dataclasses.dataclass(frozen=True)
class ExpectedTie:
    """Names (user names) that should share one tensor, and where that expectation comes from."""

    names: tuple[str, ...]
    source: str  # "config", "declared", "recorded"


def _module_name(root: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for name, sub in root.named_modules(remove_duplicate=False):
        if sub is module:
            return name
    return None


def _is_hf_model(module: Any) -> bool:
    return getattr(module, "config", None) is not None and hasattr(module, "get_input_embeddings")


def hf_models(model: Any) -> list[tuple[str, Any]]:
    """The HF models in ``model`` with their module paths: the model itself through its wrappers (DDP,
    compile, PEFT), else the outermost HF models among its submodules (a LightningModule's ``self.model``)."""
    if not isinstance(model, nn.Module):
        return []
    inner = unwrap_model(model)
    if _is_hf_model(inner):
        return [(_module_name(model, inner) or "", inner)]
    found: list[tuple[str, Any]] = []
    outer: list[str] = []  # paths of the modules found, to skip what lies inside them (PEFT's tuner model)
    for path, module in model.named_modules():
        if path and _is_hf_model(module) and not any(path.startswith(p + ".") for p in outer):
            outer.append(path)
            inner = unwrap_model(module)
            found.append((path, inner) if inner is module else (_module_name(model, inner) or path, inner))
    return found


def hf_expected_ties(model: Any) -> list[ExpectedTie]:
    """Ties the HF ``PreTrainedModel`` (s) in ``model`` promise through their config.

    transformers 5: every sub-model's ``_tied_weights_keys`` where its config has ``tie_word_embeddings``,
    expanded over user names (see :func:`_hf_tied_pairs`). transformers 4: ``tie_word_embeddings`` of the text
    config, the output embeddings tied to the input embeddings. Names relative to the HF model are made raw
    names of ``model`` (its path inside wrappers or a LightningModule) and then user names: the path the tie
    map's names take, so both always agree.
    """
    ties: dict[tuple[str, ...], ExpectedTie] = {}
    name = user_namer(model) if isinstance(model, nn.Module) else user_name
    for path, inner in hf_models(model):
        for a, b in _hf_tied_pairs(inner):
            names = tuple(sorted({name(f"{path}.{a}" if path else a), name(f"{path}.{b}" if path else b)}))
            if len(names) == 2:
                ties[names] = ExpectedTie(names=names, source="config")
    return list(ties.values())


def _hf_tied_pairs(inner: Any) -> list[tuple[str, str]]:
    """(target, source) parameter names, relative to the HF model ``inner``, that its config ties.

    transformers 5: each ``PreTrainedModel`` inside ``inner`` whose config has ``tie_word_embeddings`` ties its
    ``_tied_weights_keys`` (``{target: source}``, plain names or regexes). They are expanded here against user
    names (what :func:`~callbacks.primitives.naming.user_name` makes of each parameter), the same way
    transformers' ``get_expanded_tied_weights_keys`` expands them against current names, which breaks once PEFT
    renamed a tied layer's weight to ``<layer>.base_layer.weight``. A pattern that matches nothing promises
    nothing here (never raises). transformers 4: ``tie_word_embeddings`` and the input/output embeddings.
    """
    pairs: list[tuple[str, str]] = []
    found_v5 = False
    for prefix, sub in inner.named_modules(remove_duplicate=False):
        mapping = getattr(sub, "_tied_weights_keys", None)
        if not isinstance(mapping, dict) or getattr(sub, "config", None) is None:
            continue
        found_v5 = True
        if not getattr(sub.config, "tie_word_embeddings", False) or not mapping:
            continue
        names = sorted({user_name(raw) for raw, _ in sub.named_parameters(remove_duplicate=False)})
        at = f"{prefix}." if prefix else ""
        for target, source in _expand_tied_keys(mapping, names):
            pairs.append((at + target, at + source))
    if found_v5:
        return list(dict.fromkeys(pairs))
    return _hf4_tied_pairs(inner)


#: a tied-weights key that names one parameter (no regex): letters, digits, ``_`` and dots, ending in a leaf
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+\.(weight|bias)$")


def _expand_tied_keys(mapping: dict[str, str], names: Sequence[str]) -> list[tuple[str, str]]:
    """``{target pattern: source pattern}`` expanded over ``names`` as transformers does (prefix regexes; several
    targets cycle over the sources), skipping patterns that match nothing."""
    present = set(names)
    out: list[tuple[str, str]] = []
    for target, source in mapping.items():
        if (target in present and source in present) or (PLAIN_NAME.match(target) and PLAIN_NAME.match(source)):
            out.append((target, source))  # plain names are promised as they are; the engine looks them up
            continue
        try:
            targets = [n for n in names if re.match(target, n)]
            sources = [n for n in names if re.match(source, n)]
        except re.error:
            continue
        if not targets or not sources or len(targets) % len(sources):
            continue
        out.extend(zip(targets, itertools.cycle(sources)))
    return out


def _hf4_tied_pairs(inner: Any) -> list[tuple[str, str]]:
    """transformers 4.x: ``tie_word_embeddings`` of the text config ties the output to the input embeddings."""
    config = inner.config
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)):
        return []
    try:
        in_emb, out_emb = inner.get_input_embeddings(), inner.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        return []
    in_name, out_name = _module_name(inner, in_emb), _module_name(inner, out_emb)
    if in_name is None or out_name is None or in_name == out_name:
        return []
    return [(user_name(f"{out_name}.weight".lstrip(".")), user_name(f"{in_name}.weight".lstrip(".")))]


def normalise_declared(groups: Sequence[Sequence[str]], source: str = "declared") -> list[ExpectedTie]:
    """Declared groups (user or wrapper names) as :class:`ExpectedTie`, names mapped to user names."""
    out = []
    for group in groups:
        names = tuple(sorted({user_name(n) for n in group}))
        if len(names) >= 2:
            out.append(ExpectedTie(names=names, source=source))
    return out
