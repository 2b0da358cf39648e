"""Facts about the model that checks share, established once by the engine and handed to checks typed.

At the first event the :class:`~callbacks.monitor.Monitor` sees a model, :func:`establish_facts` resolves every
name the configuration gives against the model's user names (``NAME_NOT_FOUND`` comes from here and nowhere
else) and builds the one expected-tie registry: ties the HF config promises, ties PEFT keeps or replaces on
purpose, ties declared by ``declare_ties=`` or ``checks.ties.declare`` (one source of truth), and the ties
recorded in the tie map. Checks read :class:`ModelFacts` from ``ctx.facts``; they never recompute these.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from callbacks.findings import Finding
from callbacks.primitives.naming import named_parameters_all, user_name
from callbacks.primitives.tiemap import ExpectedTie, TieMap, build_tie_map, hf_expected_ties

#: segment of PEFT's ``ModulesToSaveWrapper``: the frozen original module (still tied where the model ties)
ORIGINAL_MODULE = "original_module"
#: segment of PEFT's ``ModulesToSaveWrapper``: the trained copies, one per adapter
MODULES_TO_SAVE = "modules_to_save"


@dataclasses.dataclass(frozen=True)
class DeclaredNames:
    """Names one configuration entry gives: ``where`` says which (``declare_ties``, ``checks.ties.declare``...);
    ``kind`` is ``parameter`` (exact or unique-suffix match on parameter names) or ``module_pattern`` (fnmatch on
    module names)."""

    where: str
    names: tuple[str, ...]
    kind: str = "parameter"


@dataclasses.dataclass(frozen=True)
class UnknownName:
    """A configured name that matches nothing (or several things) in the model, with the closest names."""

    name: str
    where: str
    why: str
    closest: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ReplacedTie:
    """A tie PEFT deliberately replaces: ``names`` are tied by the config, but ``module`` is wrapped by
    ``modules_to_save``, so training updates the copies (``copies``) while the tied original stays frozen."""

    names: tuple[str, ...]
    module: str
    copies: tuple[str, ...]


@dataclasses.dataclass
class ModelFacts:
    """What the engine established about the model at its first event.

    Attributes:
        names: user name -> raw name (the first raw name of each user name), to fetch parameters again.
        tie_map: the tie map at that event.
        expected_ties: every tie that must hold, one entry per name set (sources: ``config``, ``declared``,
            ``recorded``), names resolved to user names.
        replaced_ties: config ties PEFT replaced by trained copies (``modules_to_save`` on a tied module).
        module_patterns: ``adapter_init.modules`` patterns that match at least one module.
        unknown: configured names that match nothing; the engine reports each as ``NAME_NOT_FOUND``.
        model_id: ``id`` of the model they were established for.
    """

    names: dict[str, str]
    tie_map: TieMap
    expected_ties: list[ExpectedTie]
    replaced_ties: list[ReplacedTie]
    module_patterns: dict[str, str]
    unknown: list[UnknownName]
    model_id: int

    def declared_ties(self) -> list[ExpectedTie]:
        """Expected ties that come from the config or a declaration (not merely recorded)."""
        return [t for t in self.expected_ties if t.source != "recorded"]


def resolve_name(name: str, names: Sequence[str]) -> tuple[str | None, str]:
    """``name`` as one of the model's user names: exact, its user name, or the one name ending in ``.<name>``
    (a recipe may name the inner model's parameters when a trainer wraps it). Returns (resolved, why-not)."""
    known = set(names)
    for candidate in (name, user_name(name)):
        if candidate in known:
            return candidate, ""
    spelled = user_name(name)
    matches = [n for n in names if n.endswith("." + spelled)]
    if len(matches) == 1:
        return matches[0], ""
    if matches:
        return None, "matches several parameters: " + ", ".join(matches[:4])
    return None, "is not a parameter of the model"


def closest_names(name: str, names: Sequence[str]) -> tuple[str, ...]:
    """Up to three of ``names`` closest to ``name`` (for the fix in a NAME_NOT_FOUND)."""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if not close:  # a long path with one wrong segment: compare the last segments
        tail = name.rsplit(".", 2)[-2:]
        close = [n for n in names if n.rsplit(".", 2)[-2:] == tail][:3]
    return tuple(close)


def _replaced(name: str, names: Mapping[str, str]) -> tuple[str, tuple[str, ...]] | None:
    """For a config-tied ``<module>.<param>`` that PEFT wrapped in ``modules_to_save``: (module, copies)."""
    module, _, param = name.rpartition(".")
    if f"{module}.{ORIGINAL_MODULE}.{param}" not in names:
        return None
    prefix = f"{module}.{MODULES_TO_SAVE}."
    copies = tuple(n for n in names if n.startswith(prefix) and n.endswith("." + param))
    return module, copies


def establish_facts(model: nn.Module, declared: Iterable[DeclaredNames] = (),
                    recorded: Iterable[ExpectedTie] = ()) -> ModelFacts:
    """Resolve the configured names against ``model`` and build the expected-tie registry.

    ``recorded``: expected ties restored from an earlier run (resume); they are kept where their names exist.
    """
    triples = list(named_parameters_all(model))
    names: dict[str, str] = {}
    for raw, name, _ in triples:
        names.setdefault(name, raw)
    name_list = list(names)
    tie_map = build_tie_map(model, triples)
    unknown: list[UnknownName] = []
    declared_ties: list[ExpectedTie] = []
    module_patterns: dict[str, str] = {}
    module_names: list[str] | None = None
    for entry in declared:
        if entry.kind == "module_pattern":
            if module_names is None:
                module_names = [user_name(n) for n, _ in model.named_modules() if n]
            for pattern in entry.names:
                if any(fnmatch.fnmatchcase(m, pattern) for m in module_names):
                    module_patterns[pattern] = entry.where
                else:
                    unknown.append(UnknownName(pattern, entry.where, "matches no module of the model",
                                               closest_names(pattern, module_names)))
            continue
        resolved = []
        for name in entry.names:
            found, why = resolve_name(name, name_list)
            if found is None:
                unknown.append(UnknownName(name, entry.where, why, closest_names(user_name(name), name_list)))
            else:
                resolved.append(found)
        group = tuple(sorted(set(resolved)))
        if len(group) < 2:
            continue
        declared_ties.append(ExpectedTie(names=group, source="declared"))

    replaced: list[ReplacedTie] = []
    from_config: list[ExpectedTie] = []
    for tie in hf_expected_ties(model):
        wrapped = [(n, _replaced(n, names)) for n in tie.names if n not in names]
        if not wrapped:
            from_config.append(tie)
        elif all(r is not None for _, r in wrapped):
            for _, (module, copies) in wrapped:
                replaced.append(ReplacedTie(names=tie.names, module=module, copies=copies))
        # a promised name the model does not have at all: transformers' tie_weights skips it too

    recorded_now = []
    for group in tie_map.groups:
        kept = tuple(n for n in group.names if f".{ORIGINAL_MODULE}." not in n)
        if len(kept) >= 2:  # PEFT's frozen original goes away at merge by design: it is no tie member
            recorded_now.append(ExpectedTie(names=kept, source="recorded"))
    restored = [t for t in recorded if all(n in names for n in t.names)]
    merged: dict[tuple[str, ...], ExpectedTie] = {}
    for tie in [*from_config, *declared_ties, *restored, *recorded_now]:
        merged.setdefault(tie.names, tie)  # the most specific source first
    return ModelFacts(names=names, tie_map=tie_map, expected_ties=list(merged.values()), replaced_ties=replaced,
                      module_patterns=module_patterns, unknown=unknown,
                      model_id=id(model))


def declared_names(declare_ties: Sequence[Sequence[str]], checks: Any) -> list[DeclaredNames]:
    """Every name the configuration gives, with where it was given (``checks``: the validated checks section)."""
    out = [DeclaredNames("declare_ties", tuple(g)) for g in declare_ties]
    ties = getattr(checks, "ties", None)
    if ties is not None and ties.enabled:
        out += [DeclaredNames("checks.ties.declare", tuple(g)) for g in ties.declare]
    # hashes.tied_copies is resolved by the hash check itself: its names may live on other pipeline stages,
    # known only after its all-gather
    adapter_init = getattr(checks, "adapter_init", None)
    if adapter_init is not None and adapter_init.enabled and adapter_init.modules:
        out.append(DeclaredNames("checks.adapter_init.modules", tuple(adapter_init.modules), "module_pattern"))
    return out


def name_not_found(unknown: UnknownName, *, event: str, step: int | None, check: str) -> Finding:
    """The ``NAME_NOT_FOUND`` finding for one configured name that matches nothing."""
    closest = f"; closest: {', '.join(unknown.closest)}" if unknown.closest else ""
    return Finding.make(
        "NAME_NOT_FOUND", event=event, step=step, check=check, params=(unknown.name,),
        message=f"{unknown.name!r} given in {unknown.where} {unknown.why}{closest}; the checks go on without it",
        hint=f"correct the name in {unknown.where} (names are the model's parameter names as named_parameters() "
             "prints them, without wrapper prefixes such as module. or base_model.model.; module patterns are "
             "fnmatch patterns over module names)",
        name=unknown.name, where=unknown.where, closest=list(unknown.closest))
