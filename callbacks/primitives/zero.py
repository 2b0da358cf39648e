"""DeepSpeed ZeRO as the checks meet it: which parameters are partitioned placeholders, their true shapes, their
full values (read-only, gathered collectively one unit at a time), and the optimizer state that still tells what
the gradients were after DeepSpeed consumed them.

Facts this module is built on (deepspeed 0.19.8, HF Trainer through accelerate):

* ZeRO-3: every parameter is a placeholder (``param.data`` empty, ``param.ds_tensor`` this rank's shard;
  ``ds_id``, ``ds_status``, ``ds_shape``, ``ds_numel`` describe the full tensor). Full values exist only inside
  ``deepspeed.zero.GatheredParameters(params, modifier_rank=None)``, a collective every rank must enter in the
  same order. Shards differ across ranks by design.
* ZeRO-1/2 (and the bf16 optimizer): parameters are whole and replicated; the optimizer links each trainable
  one to its fp32 partition (``param._hp_mapping``). Gradients never stay on ``param.grad``: they are reduced
  into DeepSpeed's own partitions.
* accelerate runs ``engine.step()`` inside ``accelerator.backward`` (``DeepSpeedEngineWrapper.backward``), so at
  HF's ``on_pre_optimizer_step`` the step is done and DeepSpeed has cleared its gradient partitions
  (``safe_get_full_grad`` raises "Gradients are only available immediately after backward and before engine
  step"). What is left of them is the optimizer's ``overflow`` flag: DeepSpeed found a NaN/Inf gradient (or a
  non-finite gradient norm) in the step that just ran and skipped it.

Nothing here imports DeepSpeed unless a parameter already carries its attributes (then it is imported), and
nothing here changes a parameter, the optimizer or the RNG.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch


def is_partitioned(param: Any) -> bool:
    """Whether ``param`` is a ZeRO-3 partitioned parameter (its ``data`` may be an empty placeholder)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_tensor")


def any_partitioned(params: Iterable[Any]) -> bool:
    """Whether any of ``params`` is a ZeRO-3 partitioned parameter."""
    return any(is_partitioned(p) for p in params)


def is_deepspeed_managed(param: Any) -> bool:
    """Whether DeepSpeed's optimizer owns ``param``'s gradient (ZeRO-3 partitioned, or linked to a ZeRO-1/2 or
    bf16-optimizer fp32 partition): its ``.grad`` is then not where the gradient lives."""
    return is_partitioned(param) or hasattr(param, "_hp_mapping")


def true_shape(param: Any) -> tuple[int, ...]:
    """The full shape of ``param`` (a ZeRO-3 placeholder's ``ds_shape``, else its own shape)."""
    if is_partitioned(param):
        return tuple(param.ds_shape)
    return tuple(param.shape)


def true_numel(param: Any) -> int:
    """The full element count of ``param`` (a ZeRO-3 placeholder's ``ds_numel``, else its own)."""
    if is_partitioned(param):
        return int(param.ds_numel)
    return int(param.numel())


def local_values(param: Any) -> torch.Tensor:
    """What this rank holds of ``param`` without any communication: the ZeRO-3 shard (``ds_tensor``, stable
    between steps for a frozen parameter, whatever gathering did to ``param.data`` meanwhile) or ``param``."""
    if is_partitioned(param):
        return param.ds_tensor
    return param


@contextlib.contextmanager
def gathered(params: Sequence[Any]) -> Iterator[None]:
    """Full values of the ZeRO-3 partitioned ``params`` inside the block, read-only; a no-op for others.

    A collective (DeepSpeed all-gathers the shards): every rank must enter it with the same parameters in the
    same order at the same event. ``modifier_rank=None`` tells DeepSpeed nobody writes, so nothing is scattered
    back and the shards are untouched. Callers gather one unit (a layer's adapter) at a time, so the extra memory
    is one unit's full size.
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    deepspeed = sys.modules.get("deepspeed") or __import__("deepspeed")
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def zero_optimizer(optimizer: Any) -> Any:
    """The DeepSpeed optimizer behind ``optimizer`` (accelerate's ``DeepSpeedOptimizerWrapper`` holds it as
    ``.optimizer``), or None when no DeepSpeed optimizer is found."""
    seen = 0
    while optimizer is not None and seen < 4:  # wrappers nest a few levels at most
        if type(optimizer).__module__.startswith("deepspeed."):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


def step_overflowed(optimizer: Any) -> bool | None:
    """DeepSpeed's verdict on the step that just ran: True when it found NaN/Inf gradients (or a non-finite
    gradient norm) and skipped the step, False when it stepped, None when ``optimizer`` is no DeepSpeed optimizer
    that keeps the flag."""
    zero = zero_optimizer(optimizer)
    value = getattr(zero, "overflow", None) if zero is not None else None
    return bool(value) if isinstance(value, (bool, int)) else None


def overflow_checked(optimizer: Any) -> bool:
    """Whether DeepSpeed's optimizer checks each step's gradients for NaN/Inf (so :func:`step_overflowed` means
    something). ZeRO-3 always does (raw overflow under fp16, a non-finite gradient norm under every dtype);
    ZeRO-1/2 when ``check_grad_overflow`` is on, or when it computes the gradient norm and the dtype is not
    bf16 (bf16 without ``bf16.check_grad_overflow`` applies a NaN gradient silently). Any other optimizer: no
    claim is made."""
    zero = zero_optimizer(optimizer)
    kind = type(zero).__name__ if zero is not None else ""
    if kind == "DeepSpeedZeroOptimizer_Stage3":
        return True
    if kind == "DeepSpeedZeroOptimizer":
        if getattr(zero, "check_grad_overflow", False):
            return True
        return bool(getattr(zero, "compute_grad_norm", False)) and getattr(zero, "dtype", None) is not torch.bfloat16
    return False


def dynamic_loss_scale(optimizer: Any) -> bool:
    """Whether DeepSpeed's optimizer uses a dynamic loss scale (fp16), under which skipping an overflowing step
    is by design."""
    zero = zero_optimizer(optimizer)
    if zero is None:
        return False
    if getattr(zero, "dynamic_loss_scale", False):
        return True
    return bool(getattr(getattr(zero, "loss_scaler", None), "dynamic", False))


def gradients_hidden(params: Iterable[Any]) -> bool:
    """Whether the gradients of ``params`` are held by DeepSpeed and not on ``.grad``: some parameter is
    DeepSpeed-managed and none has a ``.grad``. Every rank of a DeepSpeed job answers alike (same model, same
    engine), so checks may decide collectives from it."""
    managed = False
    for p in params:
        if getattr(p, "grad", None) is not None:
            return False
        managed = managed or is_deepspeed_managed(p)
    return managed


#: why gradient-based checks see nothing under DeepSpeed at the trainer's pre-optimizer hook
GRADIENTS_HIDDEN_WHY = (
    "DeepSpeed keeps gradients in its own partitions, never on param.grad, and under HF Trainer / accelerate its "
    "engine.step() runs inside accelerator.backward, before on_pre_optimizer_step, and clears them")
