"""What a merge may change and how it is judged: ``MERGE_SIDE_EFFECT``, ``MERGE_MISMATCH``, ``UNMERGE_MISMATCH``
and ``TIE_BROKEN`` at the ``merge`` event.

A merge of adapters into base weights may write exactly the base weights of the layers whose adapters it merges
(its targets), and the merged model must compute what the adapter model computed. :func:`evaluate_merge` judges
one :class:`MergeObservation` (two snapshots of the model, the targets, probe outputs before and after, made by
:mod:`callbacks.merging`): parameters changed outside the targets, NaN/Inf written, a probe output that differs
beyond the dtype's rounding, an unmerge that does not restore the weights recorded at the merge, ties the merge
broke or bound to a merged weight. Each problem names its :class:`MergeCause`, and the fix comes from
:data:`HINTS` by cause.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from typing import Any, Literal

import torch
from pydantic import Field

from callbacks.checks.base import Check, CheckConfig
from callbacks.events import EventContext
from callbacks.findings import Finding
from callbacks.primitives.adapters import MergeTarget
from callbacks.primitives.snapshots import ParamSnapshot, WeightSample
from callbacks.primitives.zero import any_partitioned

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
    """Recipe section checks.merge: the checked merge.

    ``tolerance``: relative tolerance of the probe output comparison (None: per dtype, :data:`OUTPUT_TOLERANCE`);
    ``weight_tolerance``: relative tolerance of unmerged base weights (None: :data:`WEIGHT_TOLERANCE`);
    ``probe``: run the synthetic probe batch; ``watch``: wrap the model's merge methods (see
    :func:`callbacks.merging.install_merge_watch`); ``backend``: where snapshots may use the fused kernel;
    ``unmerge_sample``: elements per base weight kept (strided) to compare after an unmerge.
    """

    tolerance: float | None = Field(None, ge=0, description="relative tolerance of the probe output comparison "
                                    "(null: per dtype)")
    weight_tolerance: float | None = Field(None, ge=0, description="relative tolerance of unmerged base weights "
                                           "(null: per dtype)")
    probe: bool = Field(True, description="compare the outputs of a synthetic probe batch before and after")
    watch: bool = Field(False, description="check merges the model's own merge methods do (merge_and_unload, ...)")
    backend: Literal["auto", "torch", "triton"] = Field("auto", description="where snapshots may use the fused "
                                                        "kernel")
    unmerge_sample: int = Field(4096, ge=1, description="elements per base weight kept to compare after an "
                                "unmerge")


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
    """Everything :mod:`callbacks.merging` saw around one merge; the input of :func:`evaluate_merge`."""

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

class MergeCause(str, enum.Enum):
    """Why a merge problem was found; a finding's ``details["cause"]`` holds the value, :data:`HINTS` the fix."""

    #: a parameter outside the targets changed through a tie (or a shared buffer) with a target
    SIDE_EFFECT_TIE = "side_effect_tie"
    #: a parameter outside the targets changed with no tie or shared buffer: the merge code wrote it
    SIDE_EFFECT_OTHER = "side_effect_other"
    #: the probe outputs differ, explained by parameters changed outside the targets
    SIDE_EFFECT = "side_effect"
    #: one tensor is the base weight of several merged layers: the delta was added once per layer
    DOUBLE_MERGE = "double_merge"
    #: NaN/Inf written into base weights
    NONFINITE = "nonfinite"
    #: full-precision weights, a probe difference rounding cannot explain: the merge formula differs from the forward
    FORMULA = "formula"
    #: a merge's probe difference beyond the tolerance of a low-precision dtype
    NUMERIC = "numeric"
    #: an unmerge's probe difference beyond tolerance (its weights are within theirs)
    UNMERGE_NUMERIC = "unmerge_numeric"
    #: the merge raised midway and left some layers merged
    PARTIAL = "partial"
    #: nothing the library can merge: no base weight changed
    NOTHING_MERGED = "nothing_merged"
    #: unmerge did not bring the recorded base weights back
    UNMERGE_WEIGHTS = "unmerge_weights"
    #: the merge replaced one side of a tie
    TIE_LOST = "tie_lost"
    #: a tie now binds a merged weight to a weight no merged adapter targets
    TIE_BINDS = "tie_binds"

    @property
    def reported(self) -> str:
        """The value findings carry: an unmerge's numeric probe difference is reported as ``numeric``."""
        return MergeCause.NUMERIC.value if self is MergeCause.UNMERGE_NUMERIC else self.value


UNTIE_HINT = ("untie before adding the adapter so the merge writes its target alone: "
              "`model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())` and "
              "config.tie_word_embeddings=False; or leave the tied layer out of target_modules. PEFT's "
              "ensure_weight_tying=True adapts both sides with one adapter (check its merge too: peft 0.21.2 adds "
              "the delta twice)")
UNMERGE_HINT = ("unmerge subtracted a different delta than merge added: do not train or edit adapter or base weights "
                "while merged (unmerge first), merge in float32, or reload the base weights")
#: the fix for each cause
HINTS: dict[MergeCause, str] = {
    MergeCause.SIDE_EFFECT_TIE: UNTIE_HINT,
    MergeCause.SIDE_EFFECT_OTHER: (
        "the merge wrote a weight it does not own: do not use or save this merged model; merge a copy "
        "(copy.deepcopy) or reload the base model, and report it to the adapter library"),
    MergeCause.SIDE_EFFECT: UNTIE_HINT,
    MergeCause.DOUBLE_MERGE: (
        "one tensor is the base weight of several merged layers, so its delta was added once per layer: merge one "
        "of them only (clone/untie before merging, or drop one layer from target_modules)"),
    MergeCause.NONFINITE: (
        "the adapter holds NaN/Inf: merge with safe_merge=True (it refuses to write NaN), and find why the adapter "
        "diverged (GRAD_NONFINITE / ADAPTER_INIT_WRONG findings, lower the learning rate)"),
    MergeCause.FORMULA: (
        "the merged weights do not compute what the adapter computed, far beyond rounding for this dtype: the "
        "library's merge formula differs from its forward for this adapter type; keep the adapter unmerged for "
        "inference and report it to the adapter library"),
    MergeCause.NUMERIC: (
        "the merged weights lose precision: merge on float32 weights (model.float() before merging, cast "
        "afterwards), or raise checks.merge.tolerance if this difference is acceptable for the dtype"),
    MergeCause.UNMERGE_NUMERIC: UNMERGE_HINT,
    MergeCause.PARTIAL: (
        "the merge raised midway and left some layers merged: reload the base model, fix the error (safe_merge "
        "reports NaN adapters layer by layer) and merge again"),
    MergeCause.NOTHING_MERGED: (
        "the adapter has no layer the library can merge into weights (the adapters library merges only "
        "LoRA/(IA)^3; bottleneck and prefix adapters are not linear): keep the adapter active at inference, or "
        "train a LoRA when a merged model is needed"),
    MergeCause.UNMERGE_WEIGHTS: UNMERGE_HINT,
    MergeCause.TIE_LOST: (
        "the merge replaced one side of a tie: re-tie afterwards (model.tie_weights(), or assign the shared "
        "Parameter again), or if separate weights are intended set config.tie_word_embeddings=False"),
    MergeCause.TIE_BINDS: UNTIE_HINT,
}


def merge_problem(code: str, params: Iterable[str], message: str, cause: MergeCause, **details: Any) -> MergeProblem:
    """A :class:`MergeProblem` whose fix and ``details["cause"]`` follow from ``cause``."""
    return MergeProblem(code, tuple(params), message, HINTS[cause], {"cause": cause.reported, **details})


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
            out.append(merge_problem(
                "TIE_BROKEN", present,
                f"{_fmt(present)} shared one tensor before {obs.method}() and are separate tensors after it",
                MergeCause.TIE_LOST, method=obs.method))
            continue
        merged = [n for n in present if n in targets and n in changed]
        unmerged = [n for n in present if n not in targets]
        if merged and unmerged and obs.kind == "merge":  # an unmerge moves both back: judged by its weights
            out.append(merge_problem(
                "TIE_BROKEN", present,
                f"the tie of {_fmt(present)} now binds the merged weight {_fmt(merged)} to {_fmt(unmerged)}, which "
                f"no merged adapter targets: {obs.method}() gave both the adapter's delta",
                MergeCause.TIE_BINDS, merged=merged, unmerged=unmerged, method=obs.method))
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
        problems.append(merge_problem(
            "MERGE_SIDE_EFFECT", (name,),
            f"{obs.method}() changed {name}, which is outside the base weights of the {verb}d adapters' target "
            f"layers; it changed through: {path}",
            MergeCause.SIDE_EFFECT_TIE if via else MergeCause.SIDE_EFFECT_OTHER,
            via=via, path=path, method=obs.method, adapters=list(obs.adapters)))

    nonfinite = sorted(n for n, count in obs.nonfinite_after.items() if count)
    if nonfinite:
        problems.append(merge_problem(
            "MERGE_MISMATCH" if obs.kind == "merge" else "UNMERGE_MISMATCH", nonfinite,
            f"{obs.method}() wrote NaN/Inf into {_fmt(nonfinite)} "
            f"({sum(obs.nonfinite_after[n] for n in nonfinite)} elements)",
            MergeCause.NONFINITE, counts={n: obs.nonfinite_after[n] for n in nonfinite}))

    if obs.error is not None:
        changed_targets = [n for n in changed if n in targets]
        if changed_targets:
            problems.append(merge_problem(
                "MERGE_MISMATCH", changed_targets,
                f"{obs.method}() raised {type(obs.error).__name__} ({obs.error}) after changing "
                f"{len(changed_targets)} base weights: the model is partially {verb}d",
                MergeCause.PARTIAL, error=repr(obs.error), changed=changed_targets))
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
                               (MergeCause.NONFINITE.value, MergeCause.UNMERGE_WEIGHTS.value)), None)
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
    params: tuple[str, ...]
    if side_effects:
        params, cause = tuple(side_effects), MergeCause.SIDE_EFFECT
        message += f"; caused by the change of {_fmt(side_effects)} (see MERGE_SIDE_EFFECT)"
    elif doubles and obs.kind == "merge":
        params, cause = tuple(n for g in doubles for n in g), MergeCause.DOUBLE_MERGE
        message += (f"; {' / '.join(_fmt(g) for g in doubles)} is one tensor and the base weight of several merged "
                    f"layers, so the delta was added once per layer")
    elif not obs.targets and obs.kind == "merge":
        params, cause = (), MergeCause.NOTHING_MERGED
        message += f"; no base weight changed: {obs.method}() merged nothing of adapter {_fmt(obs.adapters)}"
    else:
        params = tuple(n for n in changed if n in obs.target_params)
        if obs.kind == "unmerge":
            cause = MergeCause.UNMERGE_NUMERIC
        elif dtype in (torch.float32, torch.float64) and diff["relative"] > OUTPUT_TOLERANCE[dtype]:
            cause = MergeCause.FORMULA  # full precision: rounding cannot explain it
        else:
            cause = MergeCause.NUMERIC
    code = "MERGE_MISMATCH" if obs.kind == "merge" else "UNMERGE_MISMATCH"
    return merge_problem(code, params, message, cause, **details)


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
    return [merge_problem(
        "UNMERGE_MISMATCH", wrong,
        f"{obs.method}() did not restore the base weights {_fmt(wrong)}: max difference {worst:.3g} (relative to "
        f"the weights' magnitude) from their values before the merge (tolerance {tol:.3g}, {dtype})",
        MergeCause.UNMERGE_WEIGHTS, relative=wrong, tolerance=tol, not_recorded=unrecorded, method=obs.method)]


# -- the check -----------------------------------------------------------------------------------------------------

class MergeCheck(Check):
    """MERGE_SIDE_EFFECT, MERGE_MISMATCH, UNMERGE_MISMATCH and TIE_BROKEN at ``merge`` events.

    The event's ``merge`` holds the :class:`MergeObservation` made by :mod:`callbacks.merging`; a merge event
    without one (dispatched by hand) has nothing to judge, and one with ``merge_error`` (observing failed, the
    merge itself ran) is a ``CHECK_FAILED``. Keeps the base weights of merged (not unloaded) adapters until they
    are unmerged.
    """

    name = "merge"
    Config = MergeConfig

    def __init__(self, config: MergeConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        #: the state before a merge_adapter, until its unmerge
        self.record = MergeRecord()
        self.merges: list[dict[str, Any]] = []

    def on_merge(self, ctx: EventContext) -> Iterable[Finding]:
        if ctx.merge_error:  # the engine turns this into CHECK_FAILED; the merge itself ran
            raise RuntimeError(f"{ctx.merge_error} (the {ctx.merge_method} ran unchecked)")
        obs = ctx.merge
        if not isinstance(obs, MergeObservation):
            return ()
        if isinstance(ctx.model, torch.nn.Module) and any_partitioned(ctx.model.parameters()):
            return [self.finding(
                "CHECK_NOT_APPLICABLE", ctx, message=f"the {obs.method} was not judged: DeepSpeed ZeRO-3 "
                "partitions the parameters, so this process holds empty placeholders and the merge ran on them",
                hint="merge a model that holds whole weights: save with zero_optimization."
                     "stage3_gather_16bit_weights_on_model_save: true (or rebuild them with zero_to_fp32.py), load "
                     "that model in one process and call checked_merge on it")]
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


__all__ = [
    "HINTS", "OUTPUT_TOLERANCE", "WEIGHT_TOLERANCE", "MergeCause", "MergeCheck", "MergeConfig", "MergeObservation",
    "MergeProblem", "MergeRecord", "evaluate_merge", "merge_problem", "output_difference", "output_tolerance",
    "weight_tolerance",
]
