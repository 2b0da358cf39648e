"""The checked merge: the user's merge runs between two observations of the model, then the ``merge`` event.

Neither HF Trainer nor Lightning has a merge event, and merging is where tied weights bite: PEFT LoRA on a tied
``lm_head`` rewrites ``embed_tokens`` on ``merge_and_unload()`` and only warns. :func:`checked_merge` (what
:meth:`Monitor.checked_merge <callbacks.monitor.Monitor.checked_merge>` calls) and the merge watch
(:func:`install_merge_watch`, which wraps a model's merge methods so the user's own call is checked) observe:

* before (:class:`MergeBefore`): a snapshot of every parameter (:mod:`callbacks.primitives.snapshots`), the merge
  targets (the base weights of the layers whose adapters are merged), samples of the weights an unmerge must
  restore, and a probe output with exactly those adapters active;
* after: the same on the merged model, which makes the :class:`~callbacks.checks.merge.MergeObservation`.

The engine then dispatches ``merge`` with the observation, so every check runs: the tie check reports expected
ties that broke, the merge check judges what the merge changed. This module drives the engine from above; the
checks never see the monitor.

Read-only apart from the merge itself: snapshots and probes read parameters; probes restore RNG state and modes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import gc
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from callbacks.checks.merge import MergeConfig, MergeObservation
from callbacks.errors import ConfigError, IntegrityError
from callbacks.hashing import hash_tensors
from callbacks.primitives.adapters import (
    MERGE_METHODS,
    MergeTarget,
    adapters_switched,
    detect_library,
    discover_targets,
    mergeable_models,
    peft_tuner_layers,
    unloaded_parameters,
)
from callbacks.primitives.probe import build_probe_batch, run_probe
from callbacks.primitives.snapshots import (
    ParamSnapshot,
    WeightSample,
    nonfinite_counts,
    snapshot_parameters,
    weight_samples,
)
from callbacks.primitives.zero import any_partitioned

if TYPE_CHECKING:
    from callbacks.monitor import Monitor

#: a step, or a callable giving it when the merge runs (the monitor's last step)
StepSource = int | Callable[[], int | None] | None

#: set while a checked merge runs: watch wrappers reached from inside it call straight through
_IN_CHECKED_MERGE: contextvars.ContextVar[bool] = contextvars.ContextVar("in_checked_merge", default=False)


@dataclasses.dataclass
class MergeBefore:
    """What the first observation saw, for the second one to complete into a :class:`MergeObservation`.

    Attributes:
        library: ``peft`` or ``adapters``.
        kind: ``merge`` or ``unmerge``.
        adapters: the adapters the call acts on.
        targets: the layers the call will write, with their base parameters.
        snapshot: every parameter before the call.
        sampled: the targets and every name sharing their memory (what an unmerge must bring back).
        samples: ``merge`` that keeps the adapters: the sampled weights as they were.
        samples_merged: ``unmerge``: the sampled weights while merged.
        batch: the probe batch, when a probe ran.
        batch_key: hashes of the probe batch's tensors (a recorded probe output is reused only for the same batch).
        probe: the probe output with exactly ``adapters`` active.
        probe_skipped: why there is no probe output.
    """

    library: str
    kind: Literal["merge", "unmerge"]
    adapters: tuple[str, ...]
    targets: list[MergeTarget]
    snapshot: ParamSnapshot
    sampled: set[str]
    samples: dict[str, WeightSample] = dataclasses.field(default_factory=dict)
    samples_merged: dict[str, WeightSample] = dataclasses.field(default_factory=dict)
    batch: dict[str, Any] | None = None
    batch_key: tuple[int, ...] | None = None
    probe: torch.Tensor | None = None
    probe_skipped: str | None = None


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


def _resolve_step(step: StepSource) -> int | None:
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


def checked_merge(monitor: Monitor, model: Any, method: str | None = None, *, step: StepSource = None,
                  probe_inputs: Mapping[str, Any] | None = None, **merge_kwargs: Any) -> Any:
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


def run_checked_merge(monitor: Monitor, model: Any, library: str, method: str, call: Callable[..., Any],
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
            monitor.dispatch("merge", model, step=step, merge_method=method)
            return result if isinstance(result, nn.Module) else model
        config: MergeConfig = check.config
        try:
            with gc_paused():
                before = observe_before(library, model, kind, method, call, args, kwargs, config, probe_inputs)
        except Exception as err:  # noqa: BLE001 - the user's merge must not fail because the check did
            result = call(*args, **kwargs)
            monitor.dispatch("merge", model, step=step, merge_method=method,
                             merge_error=f"observing the model before the merge: {type(err).__name__}: {err}")
            return result if isinstance(result, nn.Module) else model

        error: BaseException | None = None
        result = None
        try:
            result = call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - checked below, then re-raised
            error = err
        merged = result if isinstance(result, nn.Module) else model
        observation, observe_error = None, None
        covered = frozenset(t.names for t in monitor.facts.expected_ties) if monitor.facts is not None else frozenset()
        try:
            with gc_paused():
                observation = observe_after(before, merged, method, error, config, covered)
        except Exception as err:  # noqa: BLE001 - reported as CHECK_FAILED by the merge check
            observe_error = f"observing the model after the merge: {type(err).__name__}: {err}"
        try:
            monitor.dispatch("merge", model, step=step, merge_method=method, merge=observation,
                             merge_error=observe_error)
        except IntegrityError as integrity:
            if error is not None:
                raise integrity from error
            raise
        if error is not None:
            raise error
        return merged
    finally:
        _IN_CHECKED_MERGE.reset(token)


def observe_before(library: str, model: Any, kind: str, method: str, call: Callable[..., Any],
                   args: Sequence[Any], kwargs: Mapping[str, Any], config: MergeConfig,
                   probe_inputs: Mapping[str, Any] | None) -> MergeBefore:
    """Targets, snapshot, samples and the probe output before the merge."""
    # one walk of the modules for the targets, the unloaded weights and the probe's mode switch
    modules = list(model.named_modules())
    layers = list(peft_tuner_layers(model, modules)) if library == "peft" else None
    adapters, targets = discover_targets(library, model, kind, _bind(call, args, kwargs), layers)
    # merge_and_unload removes the adapter weights: nothing after it could be compared with them
    skip = unloaded_parameters(library, model, layers) if method == "merge_and_unload" else None
    snapshot = snapshot_parameters(model, config.backend, skip)
    target_names = {p for t in targets for p in t.params}
    target_memory = {snapshot.memory[n] for n in target_names if n in snapshot.memory}
    sampled = target_names | {n for n, m in snapshot.memory.items() if m in target_memory}
    before = MergeBefore(library=library, kind=kind, adapters=tuple(adapters), targets=targets, snapshot=snapshot,
                         sampled=sampled)
    if kind == "merge" and method != "merge_and_unload":
        before.samples = weight_samples(snapshot, sampled, config.unmerge_sample)
    elif kind == "unmerge":
        before.samples_merged = weight_samples(snapshot, sampled, config.unmerge_sample)
    if not config.probe:
        before.probe_skipped = "probe disabled (checks.merge.probe: false)"
        return before
    if isinstance(model, nn.Module) and any_partitioned(model.parameters()):
        # a forward would gather every layer collectively: a merge done on one rank only would hang there
        before.probe_skipped = "no probe: DeepSpeed ZeRO-3 placeholders (a forward gathers collectively)"
        return before
    try:
        # one sequence of 8 tokens: every merged layer is on its path, and the forward costs half of two sequences
        batch = dict(probe_inputs) if probe_inputs is not None else build_probe_batch(model, batch_size=1)
        with adapters_switched(model, before.adapters):
            before.probe = run_probe(model, batch, modules=[m for _, m in modules])
    except Exception as err:  # noqa: BLE001 - no probe input or a forward that fails: judged by hashes alone
        before.probe_skipped = f"no probe: {type(err).__name__}: {err}"
        return before
    tensors = [v for _, v in sorted(batch.items()) if isinstance(v, torch.Tensor)]
    before.batch, before.batch_key = batch, tuple(hash_tensors(tensors, backend=config.backend))
    return before


def observe_after(before: MergeBefore, merged: Any, method: str, error: BaseException | None, config: MergeConfig,
                  ties_covered: frozenset[tuple[str, ...]] = frozenset()) -> MergeObservation:
    """Snapshot, samples and the probe output after the merge, with what was seen before: the observation.

    ``ties_covered``: the expected ties the tie check reports itself at the ``merge`` event.
    """
    snapshot = snapshot_parameters(merged, config.backend)
    previous = before.snapshot.hashes
    changed = [n for n, h in previous.items() if snapshot.hashes.get(n, h) != h]
    samples = before.samples
    if before.kind == "unmerge":
        samples = weight_samples(snapshot, before.sampled, config.unmerge_sample)
    probe_after, probe_skipped = None, before.probe_skipped
    if before.batch is not None and error is None:
        # the merged model stands alone: the adapters library keeps the adapter, so it is switched off
        after_adapters = None if (before.library == "adapters" and before.kind == "merge") else before.adapters
        try:
            with adapters_switched(merged, after_adapters):
                probe_after = run_probe(merged, before.batch)
        except Exception as err:  # noqa: BLE001 - the merged model's forward fails: say so, judge by hashes
            probe_skipped = f"probe of the merged model failed: {type(err).__name__}: {err}"
    return MergeObservation(
        library=before.library, method=method, kind=before.kind, adapters=before.adapters, targets=before.targets,
        before=before.snapshot, after=snapshot, probe_before=before.probe, probe_after=probe_after,
        probe_skipped=probe_skipped, batch_key=before.batch_key, error=error, samples=samples,
        samples_merged=before.samples_merged, nonfinite_after=nonfinite_counts(snapshot, changed),
        ties_covered=ties_covered)


# -- watching -----------------------------------------------------------------------------------------------------

class MergeMethodWrapper:
    """Stands in for one merge method on one model instance and checks each call.

    Copies of the model (``copy.deepcopy``, pickling) get a pass-through wrapper bound to the copy, without the
    monitor: merging a copy is not checked and never touches the original.
    """

    def __init__(self, monitor: Monitor | None, owner: Any, library: str, method: str, step: StepSource = None):
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


def install_merge_watch(monitor: Monitor, model: Any, *, force: bool = False, step: StepSource = None) -> MergeWatch:
    """Wrap the merge methods of ``model`` (or of its PEFT/adapters submodules) so every call is checked.

    Installs only when ``checks.merge.watch`` is true (or ``force``); always returns a handle whose
    ``remove()`` is safe to call. ``step``: an int or a callable giving the step to attribute findings to.
    The monitor installs it at ``init`` with the model it was given and removes it in ``close()``.
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
    "MergeBefore", "MergeMethodWrapper", "MergeWatch", "StepSource", "checked_merge", "gc_paused",
    "install_merge_watch", "observe_after", "observe_before", "original_method", "run_checked_merge",
]
