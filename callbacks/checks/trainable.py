"""Everything that should train does train: optimizer coverage, the trainable set over time, parameters that move.

- ``TRAINABLE_NOT_OPTIMIZED`` (error): at the first event where the optimizer is known (and again for parameters
  that become trainable later), ``requires_grad=True`` parameters that no optimizer parameter group holds: an
  optimizer built before ``get_peft_model`` or before a head was attached, a ``configure_optimizers`` that lists
  part of the model. They get gradients every step and never change.
- ``TRAINABLE_SET_CHANGED`` (error; ``info`` when announced): the set of trainable parameters recorded at ``init``
  changed at a later step, checkpoint or the end: trained parameters became frozen (a save that converts and
  freezes the adapter), or frozen ones became trainable (a step that re-registers ``nn.Parameter(t)``). A
  schedule the trainer announces (Lightning's ``BaseFinetuning`` callbacks, ``ctx.trainable_schedule``) or the
  user declares (``expect_changes``: name patterns) is reported as ``info``.
- ``PARAM_NOT_UPDATED`` (error): a parameter the optimizer holds had a non-zero finite gradient in
  ``not_updated_after_steps`` optimizer steps in which other parameters moved, yet its bytes never changed (a
  parameter group with learning rate 0, an optimizer updating copies). A step in which nothing moved at all is a
  skipped step (a ``GradScaler`` backing off its scale skips a few at the start); more than
  ``skipped_steps_tolerated`` of them, with nothing ever moving, is reported for every watched parameter.

The values are compared by the project's hash (:func:`callbacks.hashing.hash_tensors`, fused on GPU) before and
after each optimizer step, only for parameters not yet seen to move and only in the first steps: once every
watched parameter moved, the check costs one pass over ``requires_grad`` flags per step. Parameters whose update
is below their dtype's resolution (a tiny learning rate on bf16 weights) are not judged at that step.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from callbacks.checks.base import Check, CheckConfig
from callbacks.events import EventContext
from callbacks.findings import Finding
from callbacks.hashing import hash_tensors
from callbacks.primitives.naming import local_tensor, named_parameters_all
from callbacks.primitives.optimizers import held_parameters
from callbacks.primitives.zero import GRADIENTS_HIDDEN_WHY, gradients_hidden


class TrainableConfig(CheckConfig):
    """Recipe section checks.trainable: everything that should train does train.

    Attributes:
        not_updated_after_steps: optimizer steps with a non-zero finite gradient (while other parameters move)
            after which a parameter whose bytes never changed is ``PARAM_NOT_UPDATED``.
        skipped_steps_tolerated: steps in which no watched parameter moved (a ``GradScaler`` skipping steps
            while it lowers its scale) tolerated before every watched parameter is ``PARAM_NOT_UPDATED``.
        expect_changes: fnmatch patterns of parameter names whose ``requires_grad`` a schedule of yours changes
            on purpose (gradual unfreezing): their changes are ``info``.
        ignore: fnmatch patterns of trainable parameters left out of the optimizer (or never stepped) on purpose.
    """

    not_updated_after_steps: int = Field(3, ge=1, le=10_000, description="optimizer steps with a gradient after "
                                         "which a parameter that never changed is PARAM_NOT_UPDATED")
    skipped_steps_tolerated: int = Field(24, ge=0, le=100_000, description="steps where nothing moved (a "
                                         "GradScaler skipping) tolerated before PARAM_NOT_UPDATED")
    expect_changes: list[str] = Field(default_factory=list, description="fnmatch patterns of names whose "
                                      "requires_grad your schedule changes on purpose (reported as info)")
    ignore: list[str] = Field(default_factory=list, description="fnmatch patterns of trainable parameters left "
                              "out of the optimizer on purpose")


def _unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(user name, parameter) once per parameter object, the first name seen."""
    seen: set[int] = set()
    out = []
    for _, name, param in named_parameters_all(model):
        if id(param) not in seen:
            seen.add(id(param))
            out.append((name, param))
    return out


def _trainable_by_name(model: nn.Module) -> dict[str, bool]:
    """``requires_grad`` under every name of every parameter (a tied tensor under each of its names, so replacing
    one side of a tie is not a parameter that became trainable)."""
    return {name: param.requires_grad for _, name, param in named_parameters_all(model)}


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _shown(names: Sequence[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _max_abs(tensors: Sequence[torch.Tensor]) -> list[float]:
    """max |x| of each tensor, one device-to-host copy per device."""
    out: list[float] = [0.0] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for index, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(index)
    for indices in by_device.values():
        values = torch.stack([tensors[i].abs().amax().float() for i in indices]).cpu().tolist()
        for i, v in zip(indices, values, strict=True):
            out[i] = v
    return out


def _resolution(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else 1.0


#: after the first steps, the model's modules are walked for re-registered parameters every this many steps
FULL_PASS_EVERY = 10

NOT_OPTIMIZED_HINT = ("build the optimizer after wrapping the model (get_peft_model, attaching a head), from the "
                      "final model: AdamW([p for p in model.parameters() if p.requires_grad]); Lightning: return "
                      "every trainable parameter from configure_optimizers; freeze them (requires_grad_(False)) if "
                      "they are not meant to train, or list them in checks.trainable.ignore")
SET_CHANGED_HINT = ("find what toggled requires_grad (a save hook that converts and freezes the adapter, a "
                    "wrapping step that re-creates nn.Parameter objects, code freezing around each step); if a "
                    "schedule of yours does it on purpose, name those parameters in checks.trainable.expect_changes")
NOT_UPDATED_HINT = ("check the parameter group's learning rate (0 by mistake, a scheduler that keeps it at 0), that "
                    "the optimizer holds the tensors the model uses now (not copies from before a re-wrap or "
                    "reload), and under fp16 that the GradScaler does not skip every step (inf/NaN gradients); "
                    "bf16/fp16 weights without fp32 master copies can also lose updates below their precision")


class TrainableCheck(Check):
    """TRAINABLE_NOT_OPTIMIZED, TRAINABLE_SET_CHANGED and PARAM_NOT_UPDATED."""

    name = "trainable"
    Config = TrainableConfig

    def __init__(self, config: TrainableConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        #: user name -> requires_grad, as recorded at init (updated after each reported change)
        self.recorded: dict[str, bool] = {}
        self._flags: tuple[tuple[int, bool], ...] = ()
        self.coverage_checked = False
        self.schedule: str | None = None
        #: watch of values across steps: user name -> steps with a gradient and no change
        self.still_steps: dict[str, int] = {}
        self.moved: set[str] = set()
        self.judged: set[str] = set()
        self.skipped_steps = 0
        self.anything_moved = False
        self.first_step: int | None = None
        #: name -> (hash, learning rate or None when unknown, id) before this step's optimizer step
        self._before: dict[str, tuple[int, float | None, int]] = {}
        #: a parameter seen to move, hashed with the watched ones (see :meth:`_reference_tensor`)
        self.reference: str | None = None
        self._reference_before: tuple[str, int] | None = None
        #: ``id`` of parameters seen to move or judged (the fast path of :meth:`_snapshot`)
        self._settled: set[int] = set()
        self._all_settled = False
        #: the model's parameters as the last walk over its modules found them
        self._params: list[nn.Parameter] = []

    # -- events -----------------------------------------------------------------------------------------------
    def on_init(self, ctx: EventContext) -> Iterable[Finding]:
        if not isinstance(ctx.model, nn.Module):
            return []
        self.schedule = ctx.trainable_schedule or self.schedule
        if not self.recorded:
            self.recorded = _trainable_by_name(ctx.model)
        self._params = list(ctx.model.parameters())
        self._flags = self._flag_signature(self._params)
        return self._coverage(ctx, None)

    def on_step(self, ctx: EventContext) -> Iterable[Finding]:
        if not isinstance(ctx.model, nn.Module):
            return []
        findings = list(self._coverage(ctx, None)) if not self.coverage_checked else []
        if ctx.phase == "before_optimizer" and ctx.all_optimizers and gradients_hidden(
                p for p in (self._params or ctx.model.parameters()) if p.requires_grad):
            findings += self.not_applicable_once(
                ctx, "gradients", f"parameters that never move (PARAM_NOT_UPDATED) not checked: {GRADIENTS_HIDDEN_WHY}",
                "nothing to fix; optimizer coverage (TRAINABLE_NOT_OPTIMIZED) and the trainable set are still checked")
        if ctx.phase == "before_optimizer":
            self._snapshot(ctx)
        else:
            findings += self._compare(ctx)
            findings += self._set_changes(ctx)
        return findings

    def on_checkpoint(self, ctx: EventContext) -> Iterable[Finding]:
        return self._set_changes(ctx) if isinstance(ctx.model, nn.Module) else []

    def on_end(self, ctx: EventContext) -> Iterable[Finding]:
        return self._set_changes(ctx) if isinstance(ctx.model, nn.Module) else []

    # -- optimizer coverage -----------------------------------------------------------------------------------
    def _coverage(self, ctx: EventContext, only: set[str] | None) -> list[Finding]:
        """TRAINABLE_NOT_OPTIMIZED for trainable parameters (of ``only``, when given) no optimizer holds."""
        optimizers = ctx.all_optimizers
        if not optimizers:
            return []
        if only is None:
            self.coverage_checked = True
        held = held_parameters(optimizers)
        params = _unique_parameters(ctx.model)
        if held is None:
            return [self.finding(
                "CHECK_NOT_APPLICABLE", ctx, message="optimizer coverage not checked: the optimizer exposes no "
                f"parameter groups ({type(optimizers[0]).__name__})",
                hint="nothing to fix; pass a torch.optim optimizer (or one with param_groups) to check coverage")]
        if not any(id(p) in held.learning_rate for _, p in params):
            return [self.finding(
                "CHECK_NOT_APPLICABLE", ctx, message="optimizer coverage not checked: none of the tensors the "
                "optimizer holds is a parameter of this model (it keeps its own copies, e.g. master weights, or "
                "was built for another model object)",
                hint="if the optimizer was built before the model was re-created or re-wrapped, build it from the "
                     "final model; otherwise nothing to fix")]
        missing = [name for name, p in params if p.requires_grad and id(p) not in held.learning_rate
                   and (only is None or name in only) and not _matches(name, self.config.ignore)]
        if not missing:
            return []
        trainable = sum(p.requires_grad for _, p in params)
        return [self.finding(
            "TRAINABLE_NOT_OPTIMIZED", ctx, params=missing,
            message=f"{len(missing)} of {trainable} trainable parameter(s) are in no optimizer parameter group "
                    f"({_shown(missing)}): they get gradients and never change",
            hint=NOT_OPTIMIZED_HINT, optimizer=type(optimizers[0]).__name__)]

    # -- the trainable set ------------------------------------------------------------------------------------
    @staticmethod
    def _flag_signature(params: Sequence[nn.Parameter]) -> tuple[tuple[int, bool], ...]:
        return tuple((id(p), p.requires_grad) for p in params)

    def _full_pass_due(self, ctx: EventContext) -> bool:
        """Whether to walk the model's modules for its parameters (a re-registered ``nn.Parameter`` is only
        seen that way) rather than re-read the flags of the parameters the last walk found: in the first steps,
        every ``FULL_PASS_EVERY`` steps, at checkpoints and at the end."""
        if ctx.event != "step" or not self._params or ctx.step is None:
            return True
        if self.first_step is not None and ctx.step - self.first_step < self.config.not_updated_after_steps:
            return True
        return ctx.step % FULL_PASS_EVERY == 0

    def _set_changes(self, ctx: EventContext) -> list[Finding]:
        if self._full_pass_due(ctx):
            self._params = list(ctx.model.parameters())
        flags = self._flag_signature(self._params)
        if flags == self._flags or not self.recorded:
            return []
        self._flags = flags
        self._all_settled = False
        now = _trainable_by_name(ctx.model)
        froze = [n for n, was in self.recorded.items() if was and now.get(n) is False]
        thawed = [n for n, trains in now.items() if trains and not self.recorded.get(n, False)]
        self.recorded = now
        if not froze and not thawed:
            return []
        findings = []
        for names, what in ((froze, "became frozen"), (thawed, "became trainable")):
            if not names:
                continue
            announced = self.schedule is not None or all(_matches(n, self.config.expect_changes) for n in names)
            by = (f"the trainer's {self.schedule} schedule" if self.schedule is not None
                  else "checks.trainable.expect_changes")
            message = (f"{len(names)} parameter(s) {what} since init ({_shown(names)})"
                       + (f", as {by} announces" if announced else
                          ": the set of trainable parameters changed without a declared schedule"))
            findings.append(self.finding(
                "TRAINABLE_SET_CHANGED", ctx, params=names, message=message,
                hint="nothing to fix: a declared schedule" if announced else SET_CHANGED_HINT,
                severity="info" if announced else None, change=what))
        if thawed:
            findings += self._coverage(ctx, set(thawed))
        return findings

    # -- parameters that never move ---------------------------------------------------------------------------
    def _window_open(self, step: int | None) -> bool:
        if step is None:
            return False
        if self.first_step is None:
            self.first_step = step
        limit = self.config.not_updated_after_steps + self.config.skipped_steps_tolerated + 1
        return step - self.first_step < limit

    def _snapshot(self, ctx: EventContext) -> None:
        """Hash the watched parameters that hold a non-zero finite gradient, before the optimizer steps."""
        self._before = {}
        optimizers = ctx.all_optimizers
        if not optimizers or self._all_settled or not self._window_open(ctx.step):
            return
        held = held_parameters(optimizers)
        if held is None:
            return
        if all(id(p) in self._settled or id(p) not in held.learning_rate
               for p in (self._params or ctx.model.parameters()) if p.requires_grad):
            self._all_settled = True  # every parameter the optimizer holds moved (or was judged): nothing to hash
            return
        params = _unique_parameters(ctx.model)
        watched = []
        for name, p in params:
            if name in self.moved or name in self.judged:
                self._settled.add(id(p))
                continue
            if (id(p) not in held.learning_rate
                    or not p.requires_grad or p.grad is None or _matches(name, self.config.ignore)):
                continue
            value, grad = local_tensor(p.detach()), local_tensor(p.grad.detach())
            if value.numel() == 0 or grad.is_sparse or value.device.type == "meta" or grad.numel() == 0:
                continue
            watched.append((name, p, value, grad))
        if not watched:
            return
        grad_max = _max_abs([g for _, _, _, g in watched])
        value_max = _max_abs([v for _, _, v, _ in watched])
        judged = []
        for (name, p, value, _), gm, vm in zip(watched, grad_max, value_max, strict=True):
            if not 0 < gm < float("inf"):
                continue  # no gradient to apply, or a non-finite one (a loss scaler skips that step)
            lr = held.learning_rate[id(p)]
            if lr is None:
                step_size = float("inf")  # no learning rate to read (Adafactor's relative step): always judged
            elif id(p) in held.adam_eps:
                step_size = lr * gm / (gm + held.adam_eps[id(p)])
            else:
                step_size = lr * gm
            if lr == 0 or step_size >= _resolution(value.dtype) * vm:
                judged.append((name, p, value, lr))
        if not judged:
            return
        reference = self._reference_tensor(dict(params))
        values = [v for _, _, v, _ in judged] + ([reference[1]] if reference else [])
        hashes = hash_tensors(values)
        for (name, p, _, lr), h in zip(judged, hashes, strict=False):
            self._before[name] = (h, lr, id(p))
        if reference is not None:
            self._reference_before = (reference[0], hashes[-1])

    def _reference_tensor(self, params: dict[str, nn.Parameter]) -> tuple[str, torch.Tensor] | None:
        """A parameter already seen to move, hashed with the watched ones so a step that moved nothing else is
        still known to have happened (the smallest one: cheapest)."""
        if self.reference is None:
            return None
        param = params.get(self.reference)
        if param is None or param.numel() == 0:
            return None
        return self.reference, local_tensor(param.detach())

    def _compare(self, ctx: EventContext) -> list[Finding]:
        """After the optimizer step: which watched parameters moved; PARAM_NOT_UPDATED for those that are due."""
        before, self._before = self._before, {}
        reference_before, self._reference_before = self._reference_before, None
        if not before:
            return []
        params = dict(_unique_parameters(ctx.model))
        names = [n for n in before if n in params and id(params[n]) == before[n][2]]
        if not names:
            return []
        tensors = [local_tensor(params[n].detach()) for n in names]
        reference = self._reference_tensor(params) if reference_before is not None else None
        if reference is not None and reference[0] != reference_before[0]:
            reference = None
        if reference is not None:
            tensors.append(reference[1])
        after = hash_tensors(tensors)
        still = [n for n, h in zip(names, after, strict=False) if h == before[n][0]]
        moved = [n for n in names if n not in set(still)]
        self.moved.update(moved)
        if moved:
            smallest = min(moved, key=lambda n: params[n].numel())
            if self.reference is None or self.reference not in params \
                    or params[smallest].numel() < params[self.reference].numel():
                self.reference = smallest
        stepped = bool(moved) or (reference is not None and after[-1] != reference_before[1])
        if stepped:
            self.anything_moved = True
        elif any(before[n][1] != 0 for n in still):
            # nothing moved although some learning rates are set: the optimizer step was skipped
            self.skipped_steps += 1
            if self.anything_moved or self.skipped_steps <= self.config.skipped_steps_tolerated:
                return []
            self.judged.update(still)
            return [self.finding(
                "PARAM_NOT_UPDATED", ctx, params=still,
                message=f"no parameter the optimizer holds changed in {self.skipped_steps} optimizer step(s) "
                        f"although each had a non-zero finite gradient ({_shown(still)}): every step was skipped "
                        "(a GradScaler finding inf/NaN gradients) or the optimizer updates other tensors",
                hint=NOT_UPDATED_HINT, steps=self.skipped_steps)]
        due = []
        for name in still:
            self.still_steps[name] = self.still_steps.get(name, 0) + 1
            if self.still_steps[name] >= self.config.not_updated_after_steps:
                due.append(name)
        if not due:
            return []
        self.judged.update(due)
        zero_lr = [n for n in due if before[n][1] == 0]
        findings = []
        for group, why in ((zero_lr, "its parameter group's learning rate is 0"),
                           ([n for n in due if n not in zero_lr], "its bytes never changed")):
            if group:
                findings.append(self.finding(
                    "PARAM_NOT_UPDATED", ctx, params=group,
                    message=f"{len(group)} parameter(s) the optimizer holds had a non-zero finite gradient in "
                            f"{self.config.not_updated_after_steps} optimizer step(s) in which the optimizer "
                            f"stepped, and did not change ({_shown(group)}): {why}",
                    hint=NOT_UPDATED_HINT, steps=self.config.not_updated_after_steps))
        return findings

    # -- state ------------------------------------------------------------------------------------------------
    def report_section(self) -> dict[str, Any] | None:
        if not self.recorded:
            return None
        return {"trainable": sum(self.recorded.values()), "moved": len(self.moved), "schedule": self.schedule}

    def state_dict(self) -> dict[str, Any]:
        """The trainable set and what the value watch saw (plain data)."""
        return {"recorded": dict(self.recorded), "coverage_checked": self.coverage_checked,
                "schedule": self.schedule, "still_steps": dict(self.still_steps), "moved": sorted(self.moved),
                "judged": sorted(self.judged), "skipped_steps": self.skipped_steps, "reference": self.reference,
                "anything_moved": self.anything_moved, "first_step": self.first_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.recorded = {str(k): bool(v) for k, v in state.get("recorded", {}).items()}
        self.coverage_checked = bool(state.get("coverage_checked", False))
        self.schedule = state.get("schedule")
        self.still_steps = {str(k): int(v) for k, v in state.get("still_steps", {}).items()}
        self.moved = set(state.get("moved", []))
        self.judged = set(state.get("judged", []))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.anything_moved = bool(state.get("anything_moved", False))
        self.first_step = state.get("first_step")
        self.reference = state.get("reference")


__all__ = ["TrainableCheck", "TrainableConfig"]
