"""Parameter names as the user's model names them, across wrappers (DDP, FSDP, ``torch.compile``, PEFT).

This is the one place where wrapper prefixes are stripped; every check and reader maps names through it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
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

#: PEFT tuner layers keep the original weight under ``<layer>.base_layer.<param>``
PEFT_BASE_LAYER = ".base_layer."


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
    return name.replace(PEFT_BASE_LAYER, ".")


def _peft_model_class() -> type | None:
    peft = sys.modules.get("peft")
    return getattr(peft, "PeftModel", None) if peft is not None else None


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


def named_parameters_all(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter]]:
    """Every (raw name, user name, parameter), duplicates included (``remove_duplicate=False`` semantics)."""
    for raw, param in model.named_parameters(remove_duplicate=False):
        yield raw, user_name(raw), param


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)  # a DTensor (FSDP2): its local shard is the memory it views
    return to_local() if callable(to_local) else tensor


def storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Identity of the exact memory a tensor views: equal keys mean the tensors alias element for element.

    Meta and empty tensors have no memory to compare, so the tensor object itself is their identity.
    """
    tensor = _local(tensor)
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return ("object", id(tensor))
    storage = tensor.untyped_storage()
    return (
        "storage",
        str(tensor.device),
        storage.data_ptr(),
        tensor.storage_offset() * tensor.element_size(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def buffer_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Identity of the whole buffer a tensor lives in: views of one buffer share it even where their elements
    differ (a write through one may reach the other). Meta and empty tensors: as :func:`storage_key`."""
    local = _local(tensor)
    if local.device.type == "meta" or local.numel() == 0:
        return storage_key(tensor)
    return str(local.device), local.untyped_storage().data_ptr()
