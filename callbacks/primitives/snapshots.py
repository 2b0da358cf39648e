"""Snapshots of every parameter of a model at one moment, for comparing the model with itself around an operation.

A snapshot holds, by user name, a change digest of each tensor (:func:`~callbacks.hashing.digest.change_digests`:
one batched pass per device, valid only for comparisons within this process), the identity of its storage and
memory, its dtype, and the tie map. The merge observations are built from two snapshots; the samples and
non-finite counts below read the tensors a snapshot kept, with one device-to-host copy per device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from callbacks.hashing.digest import change_digests
from callbacks.primitives.naming import buffer_key, named_parameters_all, storage_key
from callbacks.primitives.tiemap import TieMap, build_tie_map


@dataclasses.dataclass(frozen=True)
class ParamSnapshot:
    """Every parameter of a model at one moment, by user name: its change digest and the identity of its memory."""

    hashes: dict[str, int]
    storage: dict[str, tuple[Any, ...]]
    memory: dict[str, tuple[Any, ...]]  # naming.buffer_key: views of one buffer share it
    dtypes: dict[str, torch.dtype]
    ties: TieMap | None
    #: the parameters themselves (for sampling and NaN counts right after the snapshot; not compared)
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, compare=False, repr=False)


def snapshot_parameters(model: nn.Module, backend: str = "auto", skip: set[int] | None = None) -> ParamSnapshot:
    """Digest every parameter of ``model`` once per storage (tied names share one digest).

    ``skip``: ids of parameters left out (adapter weights that ``merge_and_unload`` removes: nothing after the
    merge could be compared with them). ``backend``: where the fused kernel may run (see
    :func:`~callbacks.hashing.digest.change_digests`).
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
    keys = list(unique)
    by_key = dict(zip(keys, change_digests([unique[k] for k in keys], backend=backend), strict=True))
    hashes = {name: by_key[key] for name, key in storage.items()}
    return ParamSnapshot(hashes=hashes, storage=storage, memory=memory, dtypes=dtypes,
                         ties=build_tie_map(model, parameters), tensors=tensors)


@dataclasses.dataclass(frozen=True)
class WeightSample:
    """One weight at one moment: its digest and a strided sample of its values on the host."""

    hash: int
    sample: torch.Tensor
    dtype: torch.dtype


def strided_view(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """About ``count`` evenly spaced elements of ``tensor``, on its device (a view where the tensor allows)."""
    flat = tensor.detach().reshape(-1)
    step = max(1, -(-flat.numel() // count))
    return flat[::step]


def weight_samples(snapshot: ParamSnapshot, names: Iterable[str], count: int) -> dict[str, WeightSample]:
    """Strided samples of the parameters ``names`` on the host, with their digests.

    One device-to-host copy per device and dtype: a copy per tensor would synchronise a GPU once per weight.
    """
    wanted = set(names)
    views = {name: strided_view(param, count) for name, param in snapshot.tensors.items()
             if name in wanted and param.device.type != "meta"}
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for name, view in views.items():
        groups.setdefault((view.device, view.dtype), []).append(name)
    out: dict[str, WeightSample] = {}
    for (_device, dtype), group in groups.items():
        host = torch.cat([views[n] for n in group]).to("cpu", copy=True)
        for name, sample in zip(group, host.split([views[n].numel() for n in group]), strict=True):
            out[name] = WeightSample(hash=snapshot.hashes[name], sample=sample, dtype=dtype)
    return out


def nonfinite_counts(snapshot: ParamSnapshot, names: Iterable[str]) -> dict[str, int]:
    """NaN/Inf counts of the floating-point parameters ``names``.

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
    return {name: 0 if finite_sum[name] else int((~torch.isfinite(t)).sum()) for name, t in floats.items()}


__all__ = ["ParamSnapshot", "WeightSample", "nonfinite_counts", "snapshot_parameters", "strided_view",
           "weight_samples"]
