"""Tie integrity: expected ties hold at init, recorded ties stay, checkpoints do not conflict with ties.

Functions hold the logic (framework-free); :class:`TieCheck` is the thin stateful class the engine runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from callbacks.checks.base import Check, CheckConfig, ReportedOnce
from callbacks.events import EventContext
from callbacks.facts import ORIGINAL_MODULE, DeclaredNames
from callbacks.findings import Finding
from callbacks.hashing import is_wrapper_subclass
from callbacks.primitives.checkpoints import list_checkpoint, read_tensors
from callbacks.primitives.naming import named_parameters_all, storage_key, user_name
from callbacks.primitives.tiemap import ExpectedTie, TieMap, build_tie_map
from callbacks.primitives.values import bitwise_equal
from callbacks.primitives.zero import any_partitioned, gathered


class TiesConfig(CheckConfig):
    """Recipe section checks.ties: declared ties and how often the ties are looked at."""

    declare: list[list[str]] = Field(default_factory=list,
                                     description="groups of parameter names that must share one tensor")
    every_n_steps: int = Field(1, ge=1, description="steps between two looks at the ties during training")

    @field_validator("declare")
    @classmethod
    def _groups_have_two_names(cls, value: list[list[str]]) -> list[list[str]]:
        for group in value:
            if len(set(group)) < 2:
                raise ValueError(f"each tie group needs at least two different names, got {group}")
        return value


HINTS = {
    "config": ("the model's config promises this tie (tie_word_embeddings / _tied_weights_keys): call "
               "model.tie_weights() after loading or replacing the head, or set tie_word_embeddings=False in "
               "the config if separate weights are intended"),
    "declared": ("re-tie after materialising or loading (to_empty() and load_state_dict(assign=True) give each "
                 "name its own Parameter): assign the shared Parameter again, e.g. `model.output.weight = "
                 "model.tok_embeddings.weight`"),
    "recorded": ("something replaced one side of a tie during training (a new nn.Parameter, a "
                 "load_state_dict(assign=True), a module swap); re-tie, or if intended, declare the model untied"),
}


def tie_values_equal(params: Sequence[torch.Tensor]) -> bool | None:
    """Whether tensors hold equal values (None when they cannot be compared: meta, shape or dtype differ).

    DeepSpeed ZeRO-3 placeholders are gathered (read-only, these tensors only) to be compared whole: a
    collective, reached alike on every rank because which ties are broken is decided from parameter identities
    that every rank's copy of the model shares."""
    if any_partitioned(params):
        with gathered(params):
            return tie_values_equal([p.data for p in params])
    first = params[0]
    if any(p.device.type == "meta" for p in params):
        return None
    if any(is_wrapper_subclass(p) for p in params):
        return None  # a quantised weight (torchao): its values are not those of a plain tensor
    for other in params[1:]:
        if other.shape != first.shape or other.dtype != first.dtype:
            return None
        if not bitwise_equal(first.detach().cpu(), other.detach().cpu()):
            return False
    return True


def raw_names(model: nn.Module) -> dict[str, str]:
    """user name -> raw name (the first raw name seen), for fetching parameters again by name."""
    out: dict[str, str] = {}
    for raw, name, _ in named_parameters_all(model):
        out.setdefault(name, raw)
    return out


def fetch(model: nn.Module, raw: str) -> torch.Tensor | None:
    """The parameter under ``raw`` now, or None if that name no longer exists."""
    try:
        return model.get_parameter(raw)
    except AttributeError:
        return None


#: how :func:`broken_ties` describes a tie whose parameter names are gone
MISSING = "no parameter named"
#: how :func:`broken_ties` describes a tie one side of which was replaced by a quantised copy
QUANTISED = "quantised"


def broken_ties(
    model: nn.Module, ties: Iterable[ExpectedTie], names: Mapping[str, str]
) -> list[tuple[ExpectedTie, str]]:
    """Ties whose parameters do not alias one tensor now, each with a description of what was found."""
    out = []
    for tie in ties:
        params, missing = [], []
        for name in tie.names:
            param = fetch(model, names[name]) if name in names else None
            (missing.append(name) if param is None else params.append(param))
        if missing:
            out.append((tie, f"{MISSING} {', '.join(missing)} any more"))
            continue
        if len({storage_key(p) for p in params}) > 1:
            quantised = [f"{name} ({type(p).__name__})" for name, p in zip(tie.names, params, strict=True)
                         if is_wrapper_subclass(p)]
            if quantised:
                out.append((tie, f"{QUANTISED}: {', '.join(quantised)}"))
                continue
            equal = tie_values_equal(params)
            state = {True: "equal values", False: "different values", None: "values not comparable"}[equal]
            out.append((tie, f"they are {len(params)} separate tensors ({state})"))
    return out


def checkpoint_conflicts(tie_map: TieMap, state_dict: Mapping[str, Any]) -> list[tuple[tuple[str, ...], float]]:
    """Tie groups for which ``state_dict`` holds two or more keys with different values, with the max diff."""
    by_name: dict[str, list[torch.Tensor]] = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            by_name.setdefault(user_name(key), []).append(value)
    out = []
    for group in tie_map.groups:
        present = [(n, by_name[n][0]) for n in group.names if n in by_name]
        if len(present) < 2:
            continue
        first = present[0][1].detach().to("cpu")
        worst = 0.0
        for _, other in present[1:]:
            other = other.detach().to("cpu")
            if other.shape != first.shape:
                worst = float("inf")
            elif not bitwise_equal(first, other):
                worst = max(worst, (first.double() - other.double()).abs().max().item())
        if worst > 0:
            out.append((tuple(n for n, _ in present), worst))
    return out


def undeclared_groups(tie_map: TieMap, expected: Iterable[ExpectedTie]) -> list[tuple[str, ...]]:
    """Tie groups not covered by expected ties (every name of the group must be in some expected tie of it)."""
    expected = list(expected)
    out = []
    for group in tie_map.groups:
        covered = set()
        for tie in expected:
            if set(tie.names) <= set(group.names):
                covered |= set(tie.names)
        if covered != set(group.names):
            out.append(group.names)
    return out


class TieCheck(Check):
    """TIE_BROKEN, TIE_CHECKPOINT_CONFLICT and TIE_UNDECLARED. Keeps the tie map for the report."""

    name = "ties"
    Config = TiesConfig

    def __init__(self, config: TiesConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.tie_map: TieMap | None = None
        self.expected: list[ExpectedTie] = []
        self.names: dict[str, str] = {}
        #: broken ties already reported (again only after they hold again)
        self.reported = ReportedOnce()

    def declared_names(self) -> list[DeclaredNames]:
        """``checks.ties.declare`` (the engine adds ``declare_ties=`` and reports unknown names)."""
        return [DeclaredNames("checks.ties.declare", tuple(g)) for g in self.config.declare]

    # -- events -----------------------------------------------------------------------------------------------
    def on_init(self, ctx: EventContext) -> Iterable[Finding]:
        facts = self.facts_of(ctx)
        self.tie_map = facts.tie_map
        self.names = dict(facts.names)
        self.expected = facts.expected_ties  # the engine's registry (ties restored on resume included)
        findings = list(self._broken(ctx))
        for replaced in facts.replaced_ties:
            others = [n for n in replaced.names if not n.startswith(replaced.module + ".")]
            findings.append(self.finding(
                "TIE_REPLACED", ctx, params=(*replaced.names, *replaced.copies),
                message=f"the config ties {' and '.join(replaced.names)}, but PEFT's modules_to_save wraps "
                        f"{replaced.module!r}: training updates its copy ({', '.join(replaced.copies) or 'none'}) "
                        f"while {', '.join(others)} keeps the tied original; the saved adapter holds the trained "
                        f"{replaced.module}, and a merged model has a head separate from the embedding",
                hint="nothing to fix during training; when saving the merged model set "
                     "config.tie_word_embeddings=False (otherwise loading re-ties the head to the embedding and "
                     "the trained head is lost); leave the module out of modules_to_save to keep the tie",
                module=replaced.module, copies=list(replaced.copies)))
        for names in undeclared_groups(self.tie_map, facts.declared_ties()):
            names = tuple(n for n in names if f".{ORIGINAL_MODULE}." not in n)
            if len(names) < 2:
                continue  # PEFT's frozen original of a modules_to_save module shares the tied weight on purpose
            findings.append(self.finding(
                "TIE_UNDECLARED", ctx, params=names,
                message=f"{len(names)} names share one tensor without any declaration",
                hint="declare the tie (checks.ties.declare or declare_ties=...) so that breaking it is caught; "
                     "count parameters with named_parameters(remove_duplicate=False) in mind"))
        return findings

    def on_step(self, ctx: EventContext) -> Iterable[Finding]:
        if ctx.step is not None and ctx.step % self.config.every_n_steps:
            return ()
        return self._broken(ctx)

    def on_checkpoint(self, ctx: EventContext) -> Iterable[Finding]:
        return self._broken(ctx)

    def on_end(self, ctx: EventContext) -> Iterable[Finding]:
        return self._broken(ctx)

    def on_merge(self, ctx: EventContext) -> Iterable[Finding]:
        return self._broken(ctx)

    def on_load(self, ctx: EventContext) -> Iterable[Finding]:
        tie_map = build_tie_map(ctx.model)
        state_dict = ctx.state_dict
        if state_dict is None and ctx.checkpoint_dir:
            # list keys from headers, then read only the tied ones (never the whole checkpoint)
            tied = {n for g in tie_map.groups for n in g.names}
            keys = [k for k in list_checkpoint(ctx.checkpoint_dir).keys if user_name(k) in tied]
            state_dict = read_tensors(ctx.checkpoint_dir, keys) if keys else {}
        if not state_dict:
            return ()
        source = ctx.checkpoint_dir or "the loaded state dict"
        return [
            self.finding(
                "TIE_CHECKPOINT_CONFLICT", ctx, params=names,
                message=f"{source} holds different values under {', '.join(names)} (max |diff| {diff:.3g}), which "
                        "the model ties: loading keeps only one of them, silently",
                hint="decide which value is right: untie the model before loading (clone the head), or drop "
                     "one key from the checkpoint so the kept value is explicit",
                source=source, max_abs_diff=diff)
            for names, diff in checkpoint_conflicts(tie_map, state_dict)
        ]

    # -- logic ------------------------------------------------------------------------------------------------
    def _broken(self, ctx: EventContext) -> list[Finding]:
        if ctx.facts is not None:
            self.expected = ctx.facts.expected_ties
        if not self.expected:
            return []
        findings = []
        broken = broken_ties(ctx.model, self.expected, self.names)
        if any(what.startswith(MISSING) for _, what in broken):
            # raw names can change while user names do not (merge_and_unload drops ``.base_layer``, a re-wrap
            # adds a prefix): look the parameters up as the model spells them now before calling them gone
            self.names = {**self.names, **raw_names(ctx.model)}
            broken = broken_ties(ctx.model, self.expected, self.names)
        newly_broken = set(self.reported.new("TIE_BROKEN", [tie.names for tie, _ in broken]))
        for tie, what in broken:
            if tie.names not in newly_broken:
                continue  # reported once until it holds again
            if what.startswith(QUANTISED):
                findings.append(self.finding(
                    "TIE_REPLACED", ctx, params=tie.names,
                    message=f"the {tie.source} tie {' and '.join(tie.names)} was replaced by a quantised copy "
                            f"({what.split(': ', 1)[1]}): quantising one side gives it its own tensor, so the two "
                            "no longer share one; frozen, each keeps its value",
                    hint="nothing to fix while both stay frozen; to keep the tie leave the tied layer out of "
                         "quantisation (torchao quantize_(..., filter_fn=...), as transformers leaves tied heads "
                         "out of bitsandbytes), and do not save the quantised model as tied", source=tie.source))
                continue
            findings.append(self.finding(
                "TIE_BROKEN", ctx, params=tie.names,
                message=f"{' and '.join(tie.names)} should share one tensor ({tie.source} tie) but {what}",
                hint=HINTS[tie.source], source=tie.source))
        return findings

    def report_section(self) -> dict[str, Any] | None:
        if self.tie_map is None:
            return None
        return {"tie_map": self.tie_map.to_dict(),
                "expected": [{"names": list(t.names), "source": t.source} for t in self.expected]}

    def state_dict(self) -> dict[str, Any]:
        """The ties reported broken (reported once until they hold again)."""
        return {"reported": self.reported.state_dict().get("TIE_BROKEN", [])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        # expected ties are the engine's (it restores the recorded ones); only what was reported is ours
        self.reported.load_state_dict({"TIE_BROKEN": state.get("reported", [])})
