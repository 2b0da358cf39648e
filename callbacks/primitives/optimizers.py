"""What an optimizer holds: its parameters, each one's learning rate, read through the wrappers trainers add.

One reader for every check: accelerate's ``AcceleratedOptimizer`` (``.optimizer``), Lightning's
``LightningOptimizer`` (``._optimizer``) and DeepSpeed's ZeRO optimizers, which keep the model's parameters in
``bit16_groups`` / ``fp16_groups`` while their ``param_groups`` hold flat fp32 partitions. Reading the groups is
much cheaper than walking the module tree, and they are exactly the tensors an optimizer step consumes and moves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch


@dataclasses.dataclass
class HeldParameters:
    """The parameters the optimizers hold (``params``, each once, in group order), their group's
    ``learning_rate`` by ``id`` (None when the group has none, e.g. Adafactor's relative step), and for Adam-like
    groups (``betas``) the group's ``eps`` by ``id`` (an update is about ``lr * g / (|g| + eps)``)."""

    params: list[torch.Tensor]
    learning_rate: dict[int, float | None]
    adam_eps: dict[int, float]


def inner_optimizers(optimizer: Any) -> Iterator[Any]:
    """``optimizer`` and the optimizers it wraps, outermost first."""
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        yield optimizer
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)


def group_learning_rate(group: Any) -> float | None:
    """A parameter group's current learning rate; None when it has none."""
    lr = group.get("lr") if isinstance(group, dict) else None
    if isinstance(lr, torch.Tensor):
        return float(lr.item())
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


def _read_groups(optimizer: Any) -> HeldParameters | None:
    """One optimizer's groups, or None when it has none this reader understands."""
    groups = getattr(optimizer, "param_groups", None)
    deepspeed_groups = getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "fp16_groups", None)
    held = HeldParameters([], {}, {})
    try:
        if _deepspeed_groups(optimizer):
            rates = [group_learning_rate(g) for g in groups] if isinstance(groups, list) else []
            for index, group in enumerate(deepspeed_groups):
                for p in group:
                    held.params.append(p)
                    held.learning_rate[id(p)] = rates[index] if index < len(rates) else None
            return held
        if not isinstance(groups, (list, tuple)) or not groups:
            return None
        for group in groups:
            lr = group_learning_rate(group)
            eps = group.get("eps", 1e-8) if "betas" in group else None
            for p in group["params"]:
                held.params.append(p)
                held.learning_rate[id(p)] = lr
                if isinstance(eps, (int, float)):
                    held.adam_eps[id(p)] = float(eps)
    except (TypeError, KeyError, AttributeError, ValueError):
        return None
    return held


def _deepspeed_groups(optimizer: Any) -> bool:
    groups = getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "fp16_groups", None)
    return isinstance(groups, list) and bool(groups)


def held_parameters(optimizers: Sequence[Any]) -> HeldParameters | None:
    """What the optimizers hold; ``None`` when none has readable groups. Each is read at the wrapper level
    holding DeepSpeed's model-parameter groups when one does (accelerate's and Lightning's wrappers forward
    ``param_groups``, which under ZeRO are flat fp32 partitions), else at the outermost level with readable
    groups."""
    held = HeldParameters([], {}, {})
    readable = False
    for outer in optimizers:
        chain = list(inner_optimizers(outer))
        deepspeed = next((o for o in chain if _deepspeed_groups(o)), None)
        levels = [deepspeed] if deepspeed is not None else chain
        one = next((h for h in map(_read_groups, levels) if h is not None), None)
        if one is None:
            continue
        readable = True
        for p in one.params:
            if id(p) not in held.learning_rate:
                held.params.append(p)
                held.learning_rate[id(p)] = one.learning_rate[id(p)]
                if id(p) in one.adam_eps:
                    held.adam_eps[id(p)] = one.adam_eps[id(p)]
    return held if readable else None


__all__ = ["HeldParameters", "group_learning_rate", "held_parameters", "inner_optimizers"]
