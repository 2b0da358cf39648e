"""Checked merge (issue 6): adapters merged into base weights change exactly what they should, and nothing else.

Neither HF Trainer nor Lightning has a merge event, and merging is where tied weights bite: PEFT LoRA on a tied
``lm_head`` rewrites ``embed_tokens`` on ``merge_and_unload()`` and only warns. :func:`checked_merge` runs the
merge the user asked for between two observations of the model:

* before: a hash of every parameter (one per tensor, by storage), the tie map, the merge targets (the base
  weights of the layers whose adapters are merged) and a probe output with exactly those adapters active;
* after: the same hashes, tie map and probe on the merged model.

It then dispatches the ``merge`` event with the observation, so every check runs: the tie check reports expected
ties that broke, and :class:`MergeCheck` turns the observation into findings (``MERGE_SIDE_EFFECT``,
``MERGE_MISMATCH``, ``UNMERGE_MISMATCH``, ``TIE_BROKEN``) with :func:`evaluate_merge`.

Supported merges: PEFT ``merge_and_unload``, ``merge_adapter`` and ``unmerge_adapter`` (``safe_merge``,
``adapter_names``, several adapters) and the ``adapters`` library's ``merge_adapter(name)`` / ``reset_adapter()``.
:func:`install_merge_watch` wraps those methods on a model instance so that a user's own merge is checked.

Read-only apart from the merge itself: hashes and probes read parameters; probes restore RNG state and modes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import gc
import inspect
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from callbacks.checks.base import Check, CheckConfig
from callbacks.errors import ConfigError, IntegrityError
from callbacks.events import EventContext
from callbacks.findings import Finding
from callbacks.hashing import hash_tensors, resolve_backend
from callbacks.hashing.digest import change_digest
from callbacks.primitives.naming import buffer_key, named_parameters_all, storage_key, user_name
from callbacks.primitives.probe import build_probe_batch, run_probe
from callbacks.primitives.tiemap import TieMap, build_tie_map

# -- configuration ------------------------------------------------------------------------------------------------

#: relative tolerance of the probe output comparison (max |merged - adapter| / max |adapter|), by the dtype of the
#: merged base weights: merging rounds W + BA once per weight, the error grows through the layers
OUTPUT_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2,
}
#: relative tolerance of unmerged vs original base weights (max |diff| / max |original|): one rounding of
#: W + BA and one of (W + BA) - BA
WEIGHT_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2,
}


class MergeConfig(CheckConfig):
    """Recipe section ``checks.merge``.

    ``tolerance``: relative tolerance of the probe output comparison (None: per dtype, :data:`OUTPUT_TOLERANCE`);
    ``weight_tolerance``: relative tolerance of unmerged base weights (None: :data:`WEIGHT_TOLERANCE`);
    ``probe``: run the synthetic probe batch; ``watch``: wrap the model's merge methods (see
    :func:`install_merge_watch`); ``backend``: hash backend; ``unmerge_sample``: elements per base weight kept
    (strided) to compare after an unmerge.
    """

    tolerance: float | None = Field(None, ge=0)
    weight_tolerance: float | None = Field(None, ge=0)
    probe: bool = True
    watch: bool = False
    backend: Literal["auto", "torch", "triton"] = "auto"
    unmerge_sample: int = Field(4096, ge=1)


def output_tolerance(config: MergeConfig, dtype: torch.dtype | None) -> float:
    """The probe tolerance for base weights of ``dtype`` (the configured one when set)."""
    if config.tolerance is not None:
        return config.tolerance
    return OUTPUT_TOLERANCE.get(dtype or torch.float32, OUTPUT_TOLERANCE[torch.float32])


def weight_tolerance(config: MergeConfig, dtype: torch.dtype | None) -> float:
    """The unmerge tolerance for base weights of ``dtype`` (the configured one when set)."""
    if config.weight_tolerance is not None:
        return config.weight_tolerance
    return WEIGHT_TOLERANCE.get(dtype or torch.float32, WEIGHT_TOLERANCE[torch.float32])


# -- observations -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamSnapshot:
    """Every parameter of a model at one moment, by user name: its hash and the identity of its memory."""

    hashes: dict[str, int]
    storage: dict[str, tuple[Any, ...]]
    memory: dict[str, tuple[Any, ...]]  # naming.buffer_key: views of one buffer share it
    dtypes: dict[str, torch.dtype]
    ties: TieMap
    #: names measured with :func:`change_digest` instead of the spec hash
    digested: frozenset[str] = frozenset()
    #: the parameters themselves (for sampling and NaN counts right after the snapshot; not compared)
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, compare=False, repr=False)


#: tensors off the CPU smaller than this (bytes) get the spec hash instead of the torch digest (cheaper for them,
#: in a batch)
DIGEST_MIN_BYTES = 1 << 18
#: the same for CPU tensors, whose XXH3 digest costs a few microseconds even for the smallest (the batched spec
#: hash about 10)
HOST_DIGEST_MIN_BYTES = 0


def worth_digesting(tensor: torch.Tensor) -> bool:
    """Whether the change digest costs less than the batched spec hash for ``tensor``."""
    limit = HOST_DIGEST_MIN_BYTES if tensor.device.type == "cpu" else DIGEST_MIN_BYTES
    return tensor.numel() * tensor.element_size() >= limit


def snapshot_parameters(model: nn.Module, backend: str = "auto", skip: set[int] | None = None, *,
                        spec: Collection[str] | None = None, digest: Collection[str] | None = None) -> ParamSnapshot:
    """Hash every parameter of ``model`` once per tensor (tied names share one hash).

    ``skip``: ids of parameters left out (adapter weights that ``merge_and_unload`` removes: nothing after the
    merge could be compared with them). By default every tensor gets the spec hash (:mod:`callbacks.hashing`).
    ``spec``: only these names, every name sharing memory with one of them and every tensor for which the digest
    costs more (:func:`worth_digesting`) get it, the others :func:`change_digest` (a change detector for two
    snapshots in this process); ``digest``: these names get the digest where it is worth it (pass the
    ``digested`` names of the snapshot to compare with, so each name is measured alike: a name's size only
    changes with its shape).
    """
    storage: dict[str, tuple[Any, ...]] = {}
    memory: dict[str, tuple[Any, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    tensors: dict[str, torch.Tensor] = {}
    unique: dict[tuple[Any, ...], torch.Tensor] = {}
    parameters = list(named_parameters_all(model))  # one walk, shared with the tie map
    for _raw, name, param in parameters:
        if name in storage or (skip and id(param) in skip):
            continue
        tensors[name] = param
        key = storage_key(param)
        storage[name] = key
        dtypes[name] = param.dtype
        memory[name] = buffer_key(param)
        unique.setdefault(key, param)
    if spec is not None:
        spec_memory = {memory[n] for n in spec if n in memory}
        digested = frozenset(n for n, m in memory.items() if n not in spec and m not in spec_memory)
    else:
        digested = frozenset(n for n in storage if n in digest) if digest is not None else frozenset()
    # small tensors off the CPU get the spec hash even where the digest would do: batched, it costs less there
    digested = frozenset(n for n in digested if worth_digesting(tensors[n]))
    # a storage is hashed once per kind its names need (a tie the merge made may join a digested name to a
    # hashed one: each keeps the kind it was measured with before)
    spec_keys = list(dict.fromkeys(k for n, k in storage.items() if n not in digested))
    spec_keys = [k for k in spec_keys if unique[k].device.type != "meta"]
    values = hash_tensors([unique[k].detach() for k in spec_keys], backend=backend) if spec_keys else []
    by_key = dict(zip(spec_keys, values, strict=True))
    digests = {k: change_digest(unique[k]) for k in dict.fromkeys(storage[n] for n in digested)
               if unique[k].device.type != "meta"}
    hashes = {name: (digests if name in digested else by_key).get(key, -1) for name, key in storage.items()}
    return ParamSnapshot(hashes=hashes, storage=storage, memory=memory, dtypes=dtypes,
                         ties=build_tie_map(model, parameters), tensors=tensors, digested=digested)


@dataclasses.dataclass(frozen=True)
class MergeTarget:
    """A layer whose adapters are merged (or unmerged): its user name, the adapters, its base parameters."""

    layer: str
    adapters: tuple[str, ...]
    params: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class WeightSample:
    """What unmerge must restore of one base weight: its hash and a strided sample of its values."""

    hash: int
    sample: torch.Tensor
    dtype: torch.dtype


def strided_view(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """About ``count`` evenly spaced elements of ``tensor``, on its device (a view where the tensor allows)."""
    flat = tensor.detach().reshape(-1)
    step = max(1, -(-flat.numel() // count))
    return flat[::step]


@dataclasses.dataclass
class MergeRecord:
    """What a merge that keeps the adapters (``merge_adapter``) leaves for the unmerge to be judged against."""

    weights: dict[str, WeightSample] = dataclasses.field(default_factory=dict)
    hashes: dict[str, int] = dataclasses.field(default_factory=dict)
    probe: torch.Tensor | None = None
    batch_key: tuple[int, ...] | None = None
    adapters: tuple[str, ...] = ()

    def add(self, obs: MergeObservation) -> None:
        """Record a merge; the first merge's values stand (they are what the last unmerge must restore)."""
        if not self.hashes:
            self.probe, self.batch_key, self.adapters = obs.probe_before, obs.batch_key, obs.adapters
        for name, value in obs.before.hashes.items():
            self.hashes.setdefault(name, value)
        for name, sample in obs.samples.items():
            self.weights.setdefault(name, sample)


@dataclasses.dataclass
class MergeObservation:
    """Everything :func:`checked_merge` saw around one merge; the input of :func:`evaluate_merge`."""

    library: str
    method: str
    kind: Literal["merge", "unmerge"]
    adapters: tuple[str, ...]
    targets: list[MergeTarget]
    before: ParamSnapshot
    after: ParamSnapshot
    probe_before: torch.Tensor | None = None
    probe_after: torch.Tensor | None = None
    probe_skipped: str | None = None
    #: hashes of the probe batch's tensors: a recorded probe output is reused only for the same batch
    batch_key: tuple[int, ...] | None = None
    error: BaseException | None = None
    #: merge: the target weights as they were (kept for a later unmerge); unmerge: the target weights now
    samples: dict[str, WeightSample] = dataclasses.field(default_factory=dict)
    #: unmerge: the target weights while merged (their magnitude scales the rounding error of the unmerge)
    samples_merged: dict[str, WeightSample] = dataclasses.field(default_factory=dict)
    nonfinite_after: dict[str, int] = dataclasses.field(default_factory=dict)
    ties_covered: frozenset[tuple[str, ...]] = frozenset()

    @property
    def target_params(self) -> set[str]:
        """User names of every base parameter the merge may change."""
        return {p for t in self.targets for p in t.params}

    def changed(self) -> list[str]:
        """Parameters present before and after whose hash differs."""
        after = self.after.hashes
        return sorted(n for n, h in self.before.hashes.items() if n in after and after[n] != h)

    def target_of(self, name: str) -> MergeTarget | None:
        """The target whose base parameters include ``name``."""
        return next((t for t in self.targets if name in t.params), None)


@dataclasses.dataclass(frozen=True)
class MergeProblem:
    """One finding of :func:`evaluate_merge`, before it is attributed to an event."""

    code: str
    params: tuple[str, ...]
    message: str
    hint: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


# -- hints ---------------------------------------------------------------------------------------------------------

UNTIE_HINT = ("untie before adding the adapter so the merge writes its target alone: "
              "`model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())` and "
              "config.tie_word_embeddings=False; or leave the tied layer out of target_modules. PEFT's "
              "ensure_weight_tying=True adapts both sides with one adapter (check its merge too: peft 0.21.2 adds "
              "the delta twice)")
HINTS = {
    "side_effect_tie": UNTIE_HINT,
    "side_effect_other": ("the merge wrote a weight it does not own: do not use or save this merged model; merge "
                          "a copy (copy.deepcopy) or reload the base model, and report it to the adapter library"),
    "double_merge": ("one tensor is the base weight of several merged layers, so its delta was added once per "
                     "layer: merge one of them only (clone/untie before merging, or drop one layer from "
                     "target_modules)"),
    "nonfinite": ("the adapter holds NaN/Inf: merge with safe_merge=True (it refuses to write NaN), and find why "
                  "the adapter diverged (GRAD_NONFINITE / ADAPTER_INIT_WRONG findings, lower the learning rate)"),
    "formula": ("the merged weights do not compute what the adapter computed, far beyond rounding for this dtype: "
                "the library's merge formula differs from its forward for this adapter type; keep the adapter "
                "unmerged for inference and report it to the adapter library"),
    "numeric": ("the merged weights lose precision: merge on float32 weights (model.float() before merging, cast "
                "afterwards), or raise checks.merge.tolerance if this difference is acceptable for the dtype"),
    "partial": ("the merge raised midway and left some layers merged: reload the base model, fix the error "
                "(safe_merge reports NaN adapters layer by layer) and merge again"),
    "nothing_merged": ("the adapter has no layer the library can merge into weights (the adapters library merges "
                       "only LoRA/(IA)^3; bottleneck and prefix adapters are not linear): keep the adapter active "
                       "at inference, or train a LoRA when a merged model is needed"),
    "unmerge_weights": ("unmerge subtracted a different delta than merge added: do not train or edit adapter or "
                        "base weights while merged (unmerge first), merge in float32, or reload the base weights"),
    "tie_lost": ("the merge replaced one side of a tie: re-tie afterwards (model.tie_weights(), or assign the shared "
                 "Parameter again), or if separate weights are intended set config.tie_word_embeddings=False"),
    "tie_binds": UNTIE_HINT,
}


# -- evaluation ---------------------------------------------------------------------------------------------------

def _fmt(names: Iterable[str], limit: int = 4) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def side_effect_path(obs: MergeObservation, name: str) -> tuple[list[str], str]:
    """The targets ``name`` changed through (tied, or sharing its buffer), and the path in words."""
    before = obs.before
    tied = sorted(t for t in obs.target_params if before.storage.get(t) == before.storage.get(name))
    if tied:
        layers = sorted({obs.target_of(t).layer for t in tied if obs.target_of(t)})
        adapters = sorted({a for t in tied if obs.target_of(t) for a in obs.target_of(t).adapters})
        return tied, (f"tied to {_fmt(tied)} (base weight of merged layer {_fmt(layers)}, adapter "
                      f"{_fmt(repr(a) for a in adapters)})")
    shared = sorted(t for t in obs.target_params if before.memory.get(t) == before.memory.get(name))
    if shared:
        return shared, f"a view of the same buffer as {_fmt(shared)} (merged target)"
    return [], "no tie or shared buffer with any merged target (written by the merge code itself)"


def double_merged(obs: MergeObservation) -> list[tuple[str, ...]]:
    """Groups of target names that are one tensor and the base weight of two or more merged layers."""
    by_storage: dict[tuple[Any, ...], dict[str, str]] = {}
    for target in obs.targets:
        for name in target.params:
            by_storage.setdefault(obs.before.storage.get(name), {})[name] = target.layer
    return [tuple(sorted(names)) for names in by_storage.values() if len(set(names.values())) > 1]


def output_difference(reference: torch.Tensor, other: torch.Tensor) -> dict[str, Any]:
    """Relative max difference of two probe outputs, with their non-finite counts."""
    if reference.shape != other.shape:
        return {"relative": float("inf"), "absolute": float("inf"), "nonfinite_reference": 0,
                "nonfinite_other": 0, "shape": [list(reference.shape), list(other.shape)]}
    ref, oth = reference.detach().double().cpu(), other.detach().double().cpu()
    finite = torch.isfinite(ref) & torch.isfinite(oth)
    absolute = (ref - oth)[finite].abs().max().item() if finite.any() else 0.0
    scale = ref[finite].abs().max().item() if finite.any() else 0.0
    return {"relative": absolute / max(scale, 1e-12), "absolute": absolute,
            "nonfinite_reference": int((~torch.isfinite(ref)).sum()),
            "nonfinite_other": int((~torch.isfinite(oth)).sum())}


def _dtype_of(obs: MergeObservation) -> torch.dtype | None:
    for name in sorted(obs.target_params):
        if name in obs.before.dtypes:
            return obs.before.dtypes[name]
    dtypes = list(obs.before.dtypes.values())
    return dtypes[0] if dtypes else None


def _tie_problems(obs: MergeObservation, changed: set[str]) -> list[MergeProblem]:
    out = []
    after_names = set(obs.after.hashes)
    targets = obs.target_params
    for group in obs.before.ties.groups:
        present = [n for n in group.names if n in after_names]
        if len(present) < 2:
            continue  # adapter weights unloaded with their layer
        if not obs.after.ties.shares(present):
            if tuple(sorted(present)) in obs.ties_covered or group.names in obs.ties_covered:
                continue  # the tie check reports this expected tie itself
            out.append(MergeProblem(
                "TIE_BROKEN", tuple(present),
                f"{_fmt(present)} shared one tensor before {obs.method}() and are separate tensors after it",
                HINTS["tie_lost"], {"cause": "tie_lost", "method": obs.method}))
            continue
        merged = [n for n in present if n in targets and n in changed]
        unmerged = [n for n in present if n not in targets]
        if merged and unmerged and obs.kind == "merge":  # an unmerge moves both back: judged by its weights
            out.append(MergeProblem(
                "TIE_BROKEN", tuple(present),
                f"the tie of {_fmt(present)} now binds the merged weight {_fmt(merged)} to {_fmt(unmerged)}, which "
                f"no merged adapter targets: {obs.method}() gave both the adapter's delta",
                HINTS["tie_binds"], {"cause": "tie_binds", "merged": merged, "unmerged": unmerged,
                                     "method": obs.method}))
    return out


def evaluate_merge(obs: MergeObservation, config: MergeConfig, record: MergeRecord | None = None) -> list[MergeProblem]:
    """Findings of one observed merge or unmerge (framework-free).

    ``record``: for an unmerge, what the merge of the same adapters recorded (base weights, hashes, probe).
    An unmerge is judged against the state before the merge: a parameter it changes back to its pre-merge
    value is restored (a side effect of the merge, reported then), not a side effect of the unmerge.
    """
    record = record or MergeRecord()
    problems: list[MergeProblem] = []
    changed = obs.changed()
    changed_set = set(changed)
    targets = obs.target_params
    verb = "merge" if obs.kind == "merge" else "unmerge"

    # parameters changed outside the targets
    side_effects = []
    for name in changed:
        if name in targets:
            continue
        if obs.kind == "unmerge" and restored(obs, config, record, name):
            continue  # back to its value before the merge (the merge's side effect was reported then)
        via, path = side_effect_path(obs, name)
        side_effects.append(name)
        problems.append(MergeProblem(
            "MERGE_SIDE_EFFECT", (name,),
            f"{obs.method}() changed {name}, which is outside the base weights of the {verb}d adapters' target "
            f"layers; it changed through: {path}",
            HINTS["side_effect_tie" if via else "side_effect_other"],
            {"via": via, "path": path, "method": obs.method, "adapters": list(obs.adapters)}))

    nonfinite = sorted(n for n, count in obs.nonfinite_after.items() if count)
    if nonfinite:
        problems.append(MergeProblem(
            "MERGE_MISMATCH" if obs.kind == "merge" else "UNMERGE_MISMATCH", tuple(nonfinite),
            f"{obs.method}() wrote NaN/Inf into {_fmt(nonfinite)} "
            f"({sum(obs.nonfinite_after[n] for n in nonfinite)} elements)",
            HINTS["nonfinite"], {"cause": "nonfinite", "counts": {n: obs.nonfinite_after[n] for n in nonfinite}}))

    if obs.error is not None:
        changed_targets = [n for n in changed if n in targets]
        if changed_targets:
            problems.append(MergeProblem(
                "MERGE_MISMATCH", tuple(changed_targets),
                f"{obs.method}() raised {type(obs.error).__name__} ({obs.error}) after changing "
                f"{len(changed_targets)} base weights: the model is partially {verb}d",
                HINTS["partial"], {"cause": "partial", "error": repr(obs.error), "changed": changed_targets}))
        problems.extend(_tie_problems(obs, changed_set))
        return problems

    dtype = _dtype_of(obs)
    if obs.kind == "unmerge":
        problems.extend(_unmerge_weight_problems(obs, config, record, dtype))

    # the probe: merged vs adapter model (merge); unmerged vs adapter model before the merge (unmerge), or vs
    # the merged model when that merge was not recorded
    reference = obs.probe_before
    if (obs.kind == "unmerge" and record.probe is not None and record.batch_key == obs.batch_key
            and record.adapters == obs.adapters):
        reference = record.probe
    if reference is not None and obs.probe_after is not None:
        diff = output_difference(reference, obs.probe_after)
        tol = output_tolerance(config, dtype)
        nonfinite_out = diff["nonfinite_other"] > 0 or diff["nonfinite_reference"] > 0
        weight_problem = next((i for i, p in enumerate(problems) if p.details.get("cause") in
                               ("nonfinite", "unmerge_weights")), None)
        if weight_problem is not None:  # the weights at fault are reported: add what the probe saw to that
            problem = problems[weight_problem]
            problems[weight_problem] = dataclasses.replace(problem, details={**problem.details, "probe": diff})
        elif nonfinite_out or diff["relative"] > tol:
            problems.append(_probe_problem(obs, diff, tol, dtype, side_effects, changed))
    return problems + _tie_problems(obs, changed_set)


def _probe_problem(obs: MergeObservation, diff: dict[str, Any], tol: float, dtype: torch.dtype | None,
                   side_effects: list[str], changed: list[str]) -> MergeProblem:
    details = {**diff, "tolerance": tol, "dtype": str(dtype), "method": obs.method, "adapters": list(obs.adapters)}
    if obs.kind == "unmerge":
        what = "the unmerged model (adapters active) and the adapter model before the merge"
    elif obs.targets:
        what = "the merged model and the adapter model"
    else:
        what = "the model without the adapter and the adapter model"
    measured = (f"{diff['nonfinite_other']} non-finite outputs (adapter model: {diff['nonfinite_reference']})"
                if diff["nonfinite_other"] or diff["nonfinite_reference"]
                else f"max relative difference {diff['relative']:.3g} > tolerance {tol:.3g} ({dtype})")
    message = f"{what} give different outputs on the probe batch after {obs.method}(): {measured}"
    doubles = double_merged(obs)
    if side_effects:
        params, cause, hint = tuple(side_effects), "side_effect", HINTS["side_effect_tie"]
        message += f"; caused by the change of {_fmt(side_effects)} (see MERGE_SIDE_EFFECT)"
    elif doubles and obs.kind == "merge":
        params, cause, hint = tuple(n for g in doubles for n in g), "double_merge", HINTS["double_merge"]
        message += (f"; {' / '.join(_fmt(g) for g in doubles)} is one tensor and the base weight of several merged "
                    f"layers, so the delta was added once per layer")
    elif not obs.targets and obs.kind == "merge":
        params, cause, hint = (), "nothing_merged", HINTS["nothing_merged"]
        message += f"; no base weight changed: {obs.method}() merged nothing of adapter {_fmt(obs.adapters)}"
    else:
        params = tuple(n for n in changed if n in obs.target_params)
        if obs.kind == "unmerge":
            cause, hint = "numeric", HINTS["unmerge_weights"]
        elif dtype in (torch.float32, torch.float64) and diff["relative"] > OUTPUT_TOLERANCE[dtype]:
            cause, hint = "formula", HINTS["formula"]  # full precision: rounding cannot explain it
        else:
            cause, hint = "numeric", HINTS["numeric"]
    details["cause"] = cause
    code = "MERGE_MISMATCH" if obs.kind == "merge" else "UNMERGE_MISMATCH"
    return MergeProblem(code, params, message, hint, details)


def restore_error(obs: MergeObservation, config: MergeConfig, record: MergeRecord, name: str) -> float | None:
    """How far an unmerge left ``name`` from its value before the merge (relative to the weight's magnitude).

    0.0 when bitwise restored, ``inf`` for a changed shape or NaN, None when the merge recorded no sample of it.
    """
    before, now = record.weights.get(name), obs.samples.get(name)
    if before is None or now is None:
        return None
    if before.hash == now.hash:
        return 0.0
    ref, cur = before.sample.double(), now.sample.double()
    if ref.shape != cur.shape:
        return float("inf")
    if not ref.numel():
        return 0.0
    # rounding W + BA and then (W + BA) - BA errs by an ulp of the larger of the two magnitudes
    scale = ref.abs().max().item()
    merged = obs.samples_merged.get(name)
    if merged is not None and merged.sample.shape == ref.shape:
        scale = max(scale, merged.sample.double().abs().max().item())
    relative = (ref - cur).abs().max().item() / max(scale, 1e-12)
    return relative if relative == relative else float("inf")


def restored(obs: MergeObservation, config: MergeConfig, record: MergeRecord, name: str) -> bool:
    """Whether an unmerge brought ``name`` back to its value before the merge (bitwise, or within tolerance)."""
    if record.hashes.get(name) == obs.after.hashes.get(name):
        return True
    error = restore_error(obs, config, record, name)
    return error is not None and error <= weight_tolerance(config, record.weights[name].dtype)


def _unmerge_weight_problems(obs: MergeObservation, config: MergeConfig, record: MergeRecord,
                             dtype: torch.dtype | None) -> list[MergeProblem]:
    wrong: dict[str, float] = {}
    unrecorded = []
    for name in sorted(obs.target_params):
        error = restore_error(obs, config, record, name)
        if error is None:
            unrecorded.append(name)
        elif error > weight_tolerance(config, record.weights[name].dtype):
            wrong[name] = error
    if not wrong:
        return []
    worst = max(wrong.values())
    tol = weight_tolerance(config, dtype)
    return [MergeProblem(
        "UNMERGE_MISMATCH", tuple(wrong),
        f"{obs.method}() did not restore the base weights {_fmt(wrong)}: max difference {worst:.3g} (relative to "
        f"the weights' magnitude) from their values before the merge (tolerance {tol:.3g}, {dtype})",
        HINTS["unmerge_weights"], {"cause": "unmerge_weights", "relative": wrong, "tolerance": tol,
                                   "not_recorded": unrecorded, "method": obs.method})]


# -- the check -----------------------------------------------------------------------------------------------------

class MergeCheck(Check):
    """MERGE_SIDE_EFFECT, MERGE_MISMATCH, UNMERGE_MISMATCH and TIE_BROKEN at ``merge`` events.

    The event's ``extra["merge"]`` holds the :class:`MergeObservation` made by :func:`checked_merge`; a merge
    event without one (dispatched by hand) has nothing to judge. Keeps the base weights of merged (not
    unloaded) adapters until they are unmerged.
    """

    name = "merge"
    Config = MergeConfig

    def __init__(self, config: MergeConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        #: the state before a merge_adapter, until its unmerge
        self.record = MergeRecord()
        self.merges: list[dict[str, Any]] = []

    def on_merge(self, ctx: EventContext) -> Iterable[Finding]:
        if ctx.extra.get("merge_check_error"):  # the engine turns this into CHECK_FAILED; the merge itself ran
            raise RuntimeError(f"{ctx.extra['merge_check_error']} (the {ctx.extra.get('merge_method')} ran unchecked)")
        obs = ctx.extra.get("merge")
        if not isinstance(obs, MergeObservation):
            return ()
        problems = evaluate_merge(obs, self.config, self.record)
        if obs.kind == "merge" and obs.error is None and obs.method != "merge_and_unload":
            self.record.add(obs)
        elif obs.kind == "unmerge" and obs.error is None:
            self.record = MergeRecord()
        self.merges.append({"method": obs.method, "library": obs.library, "adapters": list(obs.adapters),
                            "layers": len(obs.targets), "changed": len(obs.changed()),
                            "probe": obs.probe_skipped or "compared", "findings": [p.code for p in problems]})
        return [self.finding(p.code, ctx, params=p.params, message=p.message, hint=p.hint, **p.details)
                for p in problems]

    def report_section(self) -> dict[str, Any] | None:
        return {"merges": list(self.merges)} if self.merges else None

    def state_dict(self) -> dict[str, Any]:
        return {"merges": [dict(m) for m in self.merges]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.merges = [dict(m) for m in state.get("merges", [])]


# -- libraries ----------------------------------------------------------------------------------------------------

#: merge methods per library, and whether each merges or unmerges
MERGE_METHODS: dict[str, dict[str, str]] = {
    "peft": {"merge_and_unload": "merge", "merge_adapter": "merge", "unmerge_adapter": "unmerge"},
    "adapters": {"merge_adapter": "merge", "reset_adapter": "unmerge"},
}


def detect_library(model: Any) -> str | None:
    """``peft`` for a PeftModel or PEFT tuner model, ``adapters`` for an ``adapters``-library model, else None."""
    peft = sys.modules.get("peft")
    if peft is not None:
        from peft.tuners.tuners_utils import BaseTuner

        if isinstance(model, (peft.PeftModel, BaseTuner)):
            return "peft"
    if hasattr(model, "adapters_config") and callable(getattr(type(model), "merge_adapter", None)):
        return "adapters"
    return None


def _peft_layers(model: nn.Module, named_modules: Iterable[tuple[str, nn.Module]] | None = None
                 ) -> Iterator[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for raw, module in model.named_modules() if named_modules is None else named_modules:
        if isinstance(module, BaseTunerLayer):
            yield raw, module


def _peft_layer_adapters(layer: Any) -> set[str]:
    names: set[str] = set()
    for attr in getattr(layer, "adapter_layer_names", ()):
        container = getattr(layer, attr, None)
        if hasattr(container, "keys"):
            names |= set(container.keys())
    return names


def _base_params(raw: str, layer: nn.Module, attr: str | None) -> tuple[str, ...]:
    """User names of the parameters of ``layer``'s base (``attr``: PEFT's ``base_layer``; None: the layer)."""
    path, base = raw, layer
    while attr is not None and isinstance(getattr(base, attr, None), nn.Module):
        path, base = f"{path}.{attr}", getattr(base, attr)
    params = base.named_parameters(recurse=attr is not None)
    return tuple(sorted({user_name(f"{path}.{pname}".lstrip(".")) for pname, _ in params}))


def unloaded_parameters(library: str, model: nn.Module, layers: Sequence[tuple[str, Any]] | None = None) -> set[int]:
    """ids of the adapter weights an unload removes (every tuner-layer parameter that is not a base weight).

    ``layers``: the model's PEFT tuner layers when already listed (``(name, layer)`` pairs).
    """
    if library != "peft":
        return set()
    out: set[int] = set()
    for _raw, layer in layers if layers is not None else _peft_layers(model):
        base = {id(p) for p in layer.get_base_layer().parameters()}
        out |= {id(p) for p in layer.parameters()} - base
    return out


def _as_list(names: Any) -> list[str] | None:
    if names is None:
        return None
    return [names] if isinstance(names, str) else list(names)


def discover_targets(library: str, model: nn.Module, kind: str, arguments: Mapping[str, Any],
                     layers: Sequence[tuple[str, Any]] | None = None) -> tuple[tuple[str, ...], list[MergeTarget]]:
    """The adapters a merge call acts on and the layers (with their base parameters) it will write.

    ``layers``: the model's PEFT tuner layers when already listed (``(name, layer)`` pairs).
    """
    targets = []
    if library == "peft":
        layers = list(_peft_layers(model)) if layers is None else layers
        if kind == "unmerge":
            for raw, layer in layers:
                merged = tuple(getattr(layer, "merged_adapters", ()))
                if merged:
                    targets.append(MergeTarget(user_name(raw), merged, _base_params(raw, layer, "base_layer")))
            adapters = tuple(sorted({a for t in targets for a in t.adapters}))
            return adapters, targets
        adapters = _as_list(arguments.get("adapter_names"))
        if adapters is None:
            active = getattr(model, "active_adapters", None)
            adapters = _as_list(active() if callable(active) else active) or []
        for raw, layer in layers:
            here = _peft_layer_adapters(layer)
            merging = tuple(a for a in adapters if a in here and a not in getattr(layer, "merged_adapters", ()))
            if merging:
                targets.append(MergeTarget(user_name(raw), merging, _base_params(raw, layer, "base_layer")))
        return tuple(adapters), targets
    # the adapters library: LoRA layers hold `loras` and the name of the merged one in `merged`
    name = arguments.get("name")
    for raw, module in model.named_modules():
        loras = getattr(module, "loras", None)
        if not isinstance(loras, nn.ModuleDict) or not hasattr(module, "merged"):
            continue
        if kind == "unmerge" and module.merged:
            targets.append(MergeTarget(user_name(raw), (module.merged,), _base_params(raw, module, None)))
        elif kind == "merge" and name in loras and not module.merged:
            targets.append(MergeTarget(user_name(raw), (name,), _base_params(raw, module, None)))
    if kind == "unmerge":
        return tuple(sorted({a for t in targets for a in t.adapters})), targets
    return ((name,) if name else ()), targets


@contextlib.contextmanager
def probe_adapters(library: str, model: nn.Module, adapters: Sequence[str] | None) -> Iterator[None]:
    """Activate exactly ``adapters`` for a probe (None: no adapter), without touching ``requires_grad``.

    PEFT's ``set_adapter`` marks the active adapters trainable and the ``adapters`` library's
    ``set_active_adapters`` unmerges LoRA first, so both are bypassed: the layers' active lists (PEFT) or the
    active setup (adapters) are set directly and restored afterwards.
    """
    saved: list[tuple[Any, str, Any]] = []
    try:
        model_active = getattr(model, "active_adapters", None) if library == "peft" else None
        if isinstance(model_active, (list, tuple, str)) and _as_list(model_active) == _as_list(adapters):
            pass  # already the active set (PEFT keeps its layers in step with the model's active adapters)
        elif library == "peft" and adapters is not None:
            for _raw, layer in _peft_layers(model):
                if list(layer.active_adapters) != list(adapters):
                    saved.append((layer, "_active_adapter", layer.__dict__.get("_active_adapter", _MISSING)))
                    layer._active_adapter = list(adapters)
        elif library == "adapters" and hasattr(model, "adapters_config"):
            from adapters.composition import Stack

            config = model.adapters_config
            saved.append((config, "active_setup", config.active_setup))
            config.active_setup = Stack(*adapters) if adapters else None
        yield
    finally:
        for owner, attr, value in reversed(saved):
            if value is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, value)


_MISSING = object()


# -- the checked merge --------------------------------------------------------------------------------------------

#: set while a checked merge runs: watch wrappers reached from inside it call straight through
_IN_CHECKED_MERGE: contextvars.ContextVar[bool] = contextvars.ContextVar("in_checked_merge", default=False)


def original_method(owner: Any, method: str) -> Callable[..., Any]:
    """``owner.method`` as the class (or ``__getattr__``) provides it, skipping any watch wrapper on the instance."""
    attr = inspect.getattr_static(type(owner), method, None)
    if attr is not None:
        return attr.__get__(owner, type(owner)) if hasattr(attr, "__get__") else attr
    getattr_hook = getattr(type(owner), "__getattr__", None)
    if getattr_hook is None:
        raise AttributeError(f"{type(owner).__name__} has no method {method!r}")
    return getattr_hook(owner, method)


def _bind(call: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    try:
        bound = inspect.signature(call).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return dict(kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    for key, value in list(out.items()):  # flatten **kwargs of wrappers that forward them
        if inspect.signature(call).parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
            out.pop(key)
            out.update(value)
    return out


def _resolve_step(step: int | Callable[[], int | None] | None) -> int | None:
    return step() if callable(step) else step


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration (as it was afterwards).

    An observation allocates thousands of small objects (names, storage keys, the probe's forward), which
    triggers full collections that walk every object of the process: on a 100-layer model these took as long
    as the hashing itself. Reference counting still frees everything; cycles wait for the next collection.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def checked_merge(monitor: Any, model: Any, method: str | None = None, *,
                  step: int | Callable[[], int | None] | None = None, probe_inputs: Mapping[str, Any] | None = None,
                  **merge_kwargs: Any) -> Any:
    """Merge (or unmerge) ``model``'s adapters and check the merge; returns the merged model.

    Args:
        monitor: the :class:`~callbacks.monitor.Monitor` whose checks run at the ``merge`` event.
        model: a PEFT model (``PeftModel`` or tuner model) or an ``adapters``-library model.
        method: PEFT ``merge_and_unload`` (default), ``merge_adapter`` or ``unmerge_adapter``; ``adapters``
            ``merge_adapter`` (default) or ``reset_adapter``.
        step: the optimizer step to attribute findings to (or a callable returning it).
        probe_inputs: the probe batch (keyword arguments of the forward); built from the config when omitted.
        merge_kwargs: passed to the merge method (``safe_merge``, ``adapter_names``, ``name``, ...).

    Returns ``merge_and_unload``'s result, and ``model`` itself for the other methods. If the merge raises, the
    partial merge is checked and the error re-raised.
    """
    library = detect_library(model)
    if library is None:
        raise ConfigError(f"checked_merge needs a PEFT model or an adapters-library model, got {type(model).__name__}")
    if method is None:
        method = "merge_and_unload" if library == "peft" else "merge_adapter"
    if method not in MERGE_METHODS[library]:
        raise ConfigError(f"{library} merge method must be one of {sorted(MERGE_METHODS[library])}, got {method!r}")
    call = original_method(model, method)
    return run_checked_merge(monitor, model, library, method, call, (), merge_kwargs, step=_resolve_step(step),
                             probe_inputs=probe_inputs)


def run_checked_merge(monitor: Any, model: Any, library: str, method: str, call: Callable[..., Any],
                      args: Sequence[Any], kwargs: Mapping[str, Any], *, step: int | None = None,
                      probe_inputs: Mapping[str, Any] | None = None) -> Any:
    """Observe ``call(*args, **kwargs)`` (the merge method ``method`` of ``model``) and dispatch ``merge``.

    The user's merge always runs: if observing the model fails, the merge runs unchecked and the failure is
    reported as ``CHECK_FAILED`` (the merge check raises at the event).
    """
    kind = MERGE_METHODS[library][method]
    check = monitor.check("merge")
    token = _IN_CHECKED_MERGE.set(True)
    try:
        if check is None:  # merge check disabled: merge, and let the other checks (ties) see the event
            result = call(*args, **kwargs)
            merged = result if isinstance(result, nn.Module) else model
            monitor.dispatch("merge", model, step=step, extra={"merge_method": method})
            return merged
        config: MergeConfig = check.config
        try:
            with gc_paused():
                state = _observe_before(library, model, kind, method, call, args, kwargs, config, probe_inputs)
        except Exception as err:  # noqa: BLE001 - the user's merge must not fail because the check did
            result = call(*args, **kwargs)
            merged = result if isinstance(result, nn.Module) else model
            monitor.dispatch("merge", model, step=step, extra={
                "merge_method": method, "merge_check_error": f"observing the model before the merge: "
                                                             f"{type(err).__name__}: {err}"})
            return merged

        error: BaseException | None = None
        result = None
        try:
            result = call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - checked below, then re-raised
            error = err
        merged = result if isinstance(result, nn.Module) else model
        extra: dict[str, Any] = {"merge_method": method, "merged_model": merged}
        try:
            with gc_paused():
                extra["merge"] = _observe_after(library, monitor, merged, kind, method, state, error, config)
        except Exception as err:  # noqa: BLE001 - reported as CHECK_FAILED by the merge check
            extra["merge_check_error"] = f"observing the model after the merge: {type(err).__name__}: {err}"
        try:
            monitor.dispatch("merge", model, step=step, extra=extra)
        except IntegrityError as integrity:
            if error is not None:
                raise integrity from error
            raise
        if error is not None:
            raise error
        return merged
    finally:
        _IN_CHECKED_MERGE.reset(token)


def _observe_before(library: str, model: Any, kind: str, method: str, call: Callable[..., Any],
                    args: Sequence[Any], kwargs: Mapping[str, Any], config: MergeConfig,
                    probe_inputs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Targets, hashes, samples and the probe output before the merge."""
    # one walk of the modules for the targets, the unloaded weights and the probe's mode switch
    modules = list(model.named_modules())
    layers = list(_peft_layers(model, modules)) if library == "peft" else None
    adapters, targets = discover_targets(library, model, kind, _bind(call, args, kwargs), layers)
    target_names = {p for t in targets for p in t.params}
    if method == "merge_and_unload":
        # nothing is kept for a later unmerge: every parameter needs only change detection within this process.
        # On CPU the XXH3 digest does that at memory speed (the torch reference of the spec hash is ~15x slower);
        # the fused kernel hashes every tensor in one launch, faster than per-tensor digests.
        first = next(iter(model.parameters()), None)
        fused = first is not None and resolve_backend(config.backend, [first]) == "triton"
        before = snapshot_parameters(model, config.backend, unloaded_parameters(library, model, layers),
                                     spec=None if fused else ())
    else:
        before = snapshot_parameters(model, config.backend)
    target_memory = {before.memory[n] for n in target_names if n in before.memory}
    # targets and the names sharing their memory (tied): what an unmerge must bring back
    sampled = target_names | {n for n, m in before.memory.items() if m in target_memory}
    state: dict[str, Any] = {
        "adapters": tuple(adapters), "targets": targets, "before": before, "sampled": sampled, "samples": {},
        "samples_merged": {}, "batch": None, "probe_before": None, "probe_skipped": None, "batch_key": None}
    if kind == "merge" and method != "merge_and_unload":
        state["samples"] = _samples(sampled, before, config.unmerge_sample)
    elif kind == "unmerge":
        state["samples_merged"] = _samples(sampled, before, config.unmerge_sample)
    if not config.probe:
        state["probe_skipped"] = "probe disabled (checks.merge.probe: false)"
        return state
    try:
        # one sequence of 8 tokens: every merged layer is on its path, and the forward costs half of two sequences
        batch = dict(probe_inputs) if probe_inputs is not None else build_probe_batch(model, batch_size=1)
        with probe_adapters(library, model, adapters):
            state["probe_before"] = run_probe(model, batch, modules=[m for _, m in modules])
    except Exception as err:  # noqa: BLE001 - no probe input or a forward that fails: judged by hashes alone
        state["probe_skipped"] = f"no probe: {type(err).__name__}: {err}"
        return state
    tensors = [v for _, v in sorted(batch.items()) if isinstance(v, torch.Tensor)]
    state["batch"], state["batch_key"] = batch, tuple(hash_tensors(tensors, backend=config.backend))
    return state


def _observe_after(library: str, monitor: Any, merged: Any, kind: str, method: str, state: dict[str, Any],
                   error: BaseException | None, config: MergeConfig) -> MergeObservation:
    """Hashes, samples and the probe output after the merge, with what was seen before: the observation."""
    before: ParamSnapshot = state["before"]
    after = snapshot_parameters(merged, config.backend, digest=before.digested)
    changed = [n for n, h in before.hashes.items() if after.hashes.get(n, h) != h]
    samples = state["samples"]
    if kind == "unmerge":
        samples = _samples(state["sampled"], after, config.unmerge_sample)
    probe_after, probe_skipped = None, state["probe_skipped"]
    if state["batch"] is not None and error is None:
        # the merged model stands alone: the adapters library keeps the adapter, so it is switched off
        after_adapters = None if (library == "adapters" and kind == "merge") else state["adapters"]
        try:
            with probe_adapters(detect_library(merged) or "none", merged, after_adapters):
                probe_after = run_probe(merged, state["batch"])
        except Exception as err:  # noqa: BLE001 - the merged model's forward fails: say so, judge by hashes
            probe_skipped = f"probe of the merged model failed: {type(err).__name__}: {err}"
    covered: frozenset[tuple[str, ...]] = frozenset()
    if monitor.facts is not None:
        covered = frozenset(t.names for t in monitor.facts.expected_ties)
    return MergeObservation(
        library=library, method=method, kind=kind, adapters=state["adapters"], targets=state["targets"],
        before=before, after=after, probe_before=state["probe_before"], probe_after=probe_after,
        probe_skipped=probe_skipped, batch_key=state["batch_key"], error=error, samples=samples,
        samples_merged=state["samples_merged"], nonfinite_after=_nonfinite(after, changed), ties_covered=covered)


def _samples(names: set[str], snapshot: ParamSnapshot, count: int) -> dict[str, WeightSample]:
    """Strided samples of the parameters ``names`` on the host, with their hashes.

    One device-to-host copy per device and dtype: a copy per tensor would synchronise a GPU once per target.
    """
    views = {name: strided_view(param, count) for name, param in snapshot.tensors.items()
             if name in names and param.device.type != "meta"}
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for name, view in views.items():
        groups.setdefault((view.device, view.dtype), []).append(name)
    out: dict[str, WeightSample] = {}
    for (_device, dtype), group in groups.items():
        host = torch.cat([views[n] for n in group]).to("cpu", copy=True)
        for name, sample in zip(group, host.split([views[n].numel() for n in group]), strict=True):
            out[name] = WeightSample(hash=snapshot.hashes[name], sample=sample, dtype=dtype)
    return out


def _nonfinite(snapshot: ParamSnapshot, names: Iterable[str]) -> dict[str, int]:
    """NaN/Inf counts of the (changed) parameters ``names`` that are floating point.

    A tensor whose sum is finite holds no NaN/Inf (either would make the sum NaN or infinite), so only tensors
    with a non-finite sum (NaN/Inf inside, or an overflowing sum) are counted element by element.
    """
    floats = {name: param.detach() for name in names
              if (param := snapshot.tensors.get(name)) is not None and param.is_floating_point()
              and param.device.type != "meta"}
    if not floats:
        return {}
    # one device-to-host copy per device (not per tensor: each would synchronise a GPU); float32 holds every
    # finite sum of a half-precision tensor, and a float64 sum beyond its range is just counted element by element
    by_device: dict[torch.device, list[str]] = {}
    for name, tensor in floats.items():
        by_device.setdefault(tensor.device, []).append(name)
    finite_sum: dict[str, bool] = {}
    for group in by_device.values():
        sums = torch.stack([floats[n].sum().to(torch.float32).reshape(()) for n in group]).cpu()
        finite_sum.update(zip(group, torch.isfinite(sums).tolist(), strict=True))
    finite = [finite_sum[name] for name in floats]
    return {name: 0 if ok else int((~torch.isfinite(t)).sum()) for (name, t), ok in zip(floats.items(), finite,
                                                                                         strict=True)}


# -- watching -----------------------------------------------------------------------------------------------------

class MergeMethodWrapper:
    """Stands in for one merge method on one model instance and checks each call.

    Copies of the model (``copy.deepcopy``, pickling) get a pass-through wrapper bound to the copy, without the
    monitor: merging a copy is not checked and never touches the original.
    """

    def __init__(self, monitor: Any, owner: Any, library: str, method: str,
                 step: int | Callable[[], int | None] | None = None):
        self.monitor, self.owner, self.library, self.method, self.step = monitor, owner, library, method, step
        self.__doc__ = getattr(original_method(owner, method), "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = original_method(self.owner, self.method)
        if self.monitor is None or _IN_CHECKED_MERGE.get():
            return call(*args, **kwargs)
        return run_checked_merge(self.monitor, self.owner, self.library, self.method, call, args, kwargs,
                                 step=_resolve_step(self.step))

    def __getstate__(self) -> dict[str, Any]:
        return {"monitor": None, "owner": self.owner, "library": self.library, "method": self.method,
                "step": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<checked {type(self.owner).__name__}.{self.method}>"


class MergeWatch:
    """Handle of :func:`install_merge_watch`: :meth:`remove` restores the original methods (idempotent)."""

    def __init__(self) -> None:
        self.wrapped: list[tuple[Any, str, MergeMethodWrapper]] = []

    @property
    def active(self) -> bool:
        """Whether any method is currently wrapped."""
        return bool(self.wrapped)

    def remove(self) -> None:
        """Unwrap every method this handle wrapped."""
        for owner, method, wrapper in self.wrapped:
            if owner.__dict__.get(method) is wrapper:
                del owner.__dict__[method]
        self.wrapped = []


def mergeable_models(model: Any) -> list[Any]:
    """``model`` if it has merge methods, else its outermost submodules that have (a LightningModule's PEFT model)."""
    if detect_library(model) is not None:
        return [model]
    if not isinstance(model, nn.Module):
        return []
    found: list[Any] = []
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if module is not model and detect_library(module) is not None:
            found.append(module)
            skip.append(f"{name}.")
    return found


def install_merge_watch(monitor: Any, model: Any, *, force: bool = False,
                        step: int | Callable[[], int | None] | None = None) -> MergeWatch:
    """Wrap the merge methods of ``model`` (or of its PEFT/adapters submodules) so every call is checked.

    Installs only when ``checks.merge.watch`` is true (or ``force``); always returns a handle whose
    ``remove()`` is safe to call. ``step``: an int or a callable giving the step to attribute findings to.
    Integrations call it with the model instance they were given and call ``remove()`` at teardown.
    """
    handle = MergeWatch()
    check = monitor.check("merge")
    if not force and (check is None or not check.config.watch):
        return handle
    for owner in mergeable_models(model):
        library = detect_library(owner)
        for method in MERGE_METHODS[library]:
            if isinstance(owner.__dict__.get(method), MergeMethodWrapper):
                continue  # already watched (by another callback)
            wrapper = MergeMethodWrapper(monitor, owner, library, method, step)
            owner.__dict__[method] = wrapper
            handle.wrapped.append((owner, method, wrapper))
    return handle


__all__ = [
    "MERGE_METHODS", "OUTPUT_TOLERANCE", "WEIGHT_TOLERANCE", "MergeCheck", "MergeConfig", "MergeMethodWrapper",
    "MergeObservation", "MergeProblem", "MergeRecord", "MergeTarget", "MergeWatch", "ParamSnapshot", "WeightSample",
    "checked_merge", "detect_library", "discover_targets", "evaluate_merge", "install_merge_watch",
    "mergeable_models", "original_method", "run_checked_merge", "snapshot_parameters",
]
