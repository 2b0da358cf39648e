"""Parameter names as the user's model names them, across wrappers (DDP, FSDP, ``torch.compile``, PEFT).

This is the one place where wrapper prefixes are stripped; every check and reader maps names through it.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

#: prefixes added by wrappers around the user's model, stripped from the front of names (repeatedly, so
#: ``module._orig_mod.base_model.model.x`` becomes ``x``)
WRAPPER_PREFIXES: tuple[str, ...] = (
    "module.",  # DistributedDataParallel, DataParallel, FSDP1
    "_orig_mod.",  # torch.compile's OptimizedModule
    "_fsdp_wrapped_module.",  # FSDP1 wrapped children
    "_checkpoint_wrapped_module.",  # activation checkpointing wrapper
    "base_model.model.",  # PEFT PeftModel -> tuner model -> the user's model
)

#: path segments inserted inside the user's names by wrappers; removed wherever they appear
WRAPPER_SEGMENTS: tuple[str, ...] = (
    "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.",
    "base_model.model.",  # a PEFT model held inside another module (a LightningModule's self.model)
)

#: PEFT tuner layers keep the original weight under ``<layer>.base_layer.<param>`` (nested wrappers, e.g. fused
#: MoE experts with several adapted parameters, repeat it: ``experts.base_layer.base_layer.gate_up_proj``)
PEFT_BASE_LAYER = ".base_layer."

#: first segments of PEFT adapter parameters (``lora_A``, ``hada_w1_a``, ``ia3_l``...): a ``base_layer`` segment
#: followed by one of them belongs to an inner wrapper's adapter and is kept, so distinct tensors keep distinct
#: names (the inner and the outer adapter of a twice-wrapped module)
ADAPTER_SEGMENT = re.compile(
    r"(lora_|hada_|lokr_|ia3_|oft_|boft_|vera_|fourierft_|vblora_|hra_|bone_|miss_|c3a_|randlora_|shira_|road_|"
    r"delora_|adaption_|poly_|ln_tuning_|gralora_|tinylora_|unilora_|waveft_|osf_|lily_)")


@functools.lru_cache(maxsize=1 << 16)
def user_name(name: str) -> str:
    """The name the user gave a parameter, without wrapper prefixes or PEFT's ``base_layer`` segment.

    Cached: every event maps the same few thousand names again.
    """
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    for segment in WRAPPER_SEGMENTS:
        name = name.replace("." + segment, ".")
    return _strip_base_layers(name)


def _strip_base_layers(name: str) -> str:
    parts = name.split(".")
    kept = [part for i, part in enumerate(parts)
            if part != "base_layer" or i + 1 >= len(parts) or ADAPTER_SEGMENT.match(parts[i + 1])]
    return ".".join(kept)


def _peft_model_class() -> type | None:
    peft = sys.modules.get("peft")
    return getattr(peft, "PeftModel", None) if peft is not None else None


def find_peft_model(model: Any) -> Any | None:
    """The ``peft.PeftModel`` at or inside ``model``'s wrappers (DDP, compile, FSDP), or None."""
    peft_cls = _peft_model_class()
    if peft_cls is None:
        return None
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, peft_cls):
            return model
        for attr in ("module", "_orig_mod", "_fsdp_wrapped_module"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return None
    return None


def unwrap_model(model: Any) -> Any:
    """The user's own model inside DDP/FSDP1/compile/PEFT wrappers (the object whose names users know)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module):  # torch.compile
            model = orig
            continue
        peft_cls = _peft_model_class()
        if peft_cls is not None and isinstance(model, peft_cls):
            # tuners: PeftModel.base_model is the tuner model and .model the user's; prompt learning:
            # base_model is the user's model itself
            inner = model.base_model
            model = getattr(inner, "model", inner) if not hasattr(inner, "config") or hasattr(inner, "peft_config") \
                else inner
            continue
        inner = getattr(model, "_fsdp_wrapped_module", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
    return model


def is_prompt_learning_model(module: Any) -> bool:
    """Whether ``module`` is a PEFT prompt-learning model (prompt/prefix/P-tuning): its ``base_model`` is the
    user's model itself, so its parameters are spelled ``base_model.<user name>``, not ``base_model.model.``."""
    peft_cls = _peft_model_class()
    if peft_cls is None or not isinstance(module, peft_cls):
        return False
    inner = module.base_model
    return hasattr(inner, "config") and not hasattr(inner, "peft_config")


def _prompt_learning_paths(model: nn.Module) -> tuple[str, ...]:
    """Raw-name prefixes (``""``, ``"module."``, ``"model."``...) of prompt-learning PEFT models held at the top
    of ``model`` or up to two wrappers down (DDP, a LightningModule attribute)."""
    if _peft_model_class() is None:
        return ()
    found = []
    level = [("", model)]
    for _ in range(3):
        below = []
        for path, module in level:
            if is_prompt_learning_model(module):
                found.append(path)
            elif isinstance(module, nn.Module):
                below.extend((f"{path}{name}.", child) for name, child in module.named_children())
        level = below
    return tuple(found)


def user_namer(model: nn.Module) -> Callable[[str], str]:
    """A function from raw names of ``model`` to user names, that also knows the prompt-learning PEFT models in
    it: their ``base_model`` is the user's model itself, so ``base_model.x`` is spelled as a tuner model's
    ``base_model.model.x`` first and the one prefix rule of :func:`user_name` applies."""
    heads = tuple(f"{path}base_model." for path in _prompt_learning_paths(model))

    def name(raw: str) -> str:
        for head in heads:
            if raw.startswith(head):
                return user_name(f"{head}model.{raw[len(head):]}")
        return user_name(raw)

    return name


def named_parameters_all(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter]]:
    """Every (raw name, user name, parameter), duplicates included (``remove_duplicate=False`` semantics)."""
    name = user_namer(model)
    for raw, param in model.named_parameters(remove_duplicate=False):
        yield raw, name(raw), param


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds: a DTensor's local shard (FSDP2), else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)  # a DTensor (FSDP2): its local shard is the memory it views
    return to_local() if callable(to_local) else tensor


def storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Identity of the exact memory a tensor views: equal keys mean the tensors alias element for element.

    Meta and empty tensors have no memory to compare, so the tensor object itself is their identity.
    """
    tensor = local_tensor(tensor)
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return ("object", id(tensor))
    data_ptr = _storage_ptr(tensor)
    if data_ptr is None:
        return ("object", id(tensor))
    return (
        "storage",
        str(tensor.device),
        data_ptr,
        tensor.storage_offset() * tensor.element_size(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def buffer_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Identity of the whole buffer a tensor lives in: views of one buffer share it even where their elements
    differ (a write through one may reach the other). Meta and empty tensors: as :func:`storage_key`."""
    local = local_tensor(tensor)
    if local.device.type == "meta" or local.numel() == 0:
        return storage_key(tensor)
    data_ptr = _storage_ptr(local)
    if data_ptr is None:
        return storage_key(tensor)
    return str(local.device), data_ptr


def _storage_ptr(tensor: torch.Tensor) -> int | None:
    """The address of the storage ``tensor`` views, or None for tensors without one of their own (wrapper
    subclasses such as torchao's quantised weights keep their data in inner tensors): such a tensor is
    identified by the object itself, so one odd tensor never costs a whole tie map."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return None
