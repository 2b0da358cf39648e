"""Bitwise 64-bit hashes of tensors: a torch reference and a fused Triton kernel that agree bit for bit.

``hash_tensors(tensors, backend="auto")`` is the contract: a list of tensors in, a list of unsigned 64-bit
ints out. ``hash_with_stats`` also returns per-tensor NaN/Inf and non-zero counts from the same pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch

from callbacks.errors import ConfigError
from callbacks.hashing import reference

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


@dataclasses.dataclass(frozen=True)
class HashStats:
    """Per-tensor results of one hashing pass: the hash, the NaN/Inf count and the non-zero count."""

    hashes: list[int]
    nonfinite: list[int]
    nonzero: list[int]


def triton_available() -> bool:
    """Whether the fused Triton kernel can run here (triton importable)."""
    try:
        from callbacks.hashing import fused  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, tensors: Sequence[torch.Tensor]) -> str:
    """The backend that will run: ``auto`` picks the fused kernel for CUDA tensors when Triton is there."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        on_cuda = bool(tensors) and all(t.device.type == "cuda" for t in tensors)
        return "triton" if on_cuda and triton_available() else "torch"
    return backend


def is_wrapper_subclass(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a traceable wrapper subclass (torchao's quantised weights, ...): its data lives in
    inner tensors (``__tensor_flatten__``), not in bytes of its own."""
    return type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__")


def inner_tensors(tensor: torch.Tensor, depth: int = 4) -> list[torch.Tensor]:
    """The plain tensors that hold a wrapper subclass's data, in its flatten order (nested wrappers too)."""
    if not is_wrapper_subclass(tensor) or depth == 0:
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    out: list[torch.Tensor] = []
    for name in names:
        out.extend(inner_tensors(getattr(tensor, name), depth - 1))
    return out


def _expanded(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[int, int]] | None]:
    """Wrapper subclasses replaced by their inner tensors, with each input's span; None when none is one."""
    if not any(is_wrapper_subclass(t) for t in tensors):
        return tensors, None
    flat: list[torch.Tensor] = []
    spans = []
    for t in tensors:
        parts = [p.detach() for p in inner_tensors(t)]
        spans.append((len(flat), len(parts)))
        flat.extend(parts)
    return flat, spans


def _combined(hashes: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """One hash per input: a plain tensor's own, a wrapper subclass's from its inner tensors' hashes in order."""
    out = []
    for start, count in spans:
        inner = hashes[start:start + count]
        words = torch.tensor([h - (1 << 64) if h >= 1 << 63 else h for h in inner], dtype=torch.int64)
        out.append(reference.hash_tensor(words))
    return out


def hash_with_stats(tensors: Sequence[torch.Tensor], backend: Backend = "auto") -> HashStats:
    """Hash every tensor and count its NaN/Inf and non-zero elements (a wrapper subclass: over its inner
    tensors, so a quantised weight is hashed by the bytes that hold it)."""
    tensors, spans = _expanded(list(tensors))
    if spans is not None:
        stats = hash_with_stats(tensors, backend)
        return HashStats(hashes=_combined(stats.hashes, spans),
                         nonfinite=[sum(stats.nonfinite[s:s + n]) for s, n in spans],
                         nonzero=[sum(stats.nonzero[s:s + n]) for s, n in spans])
    if resolve_backend(backend, tensors) == "triton":
        from callbacks.hashing.fused import fused_hash_with_stats

        return fused_hash_with_stats(tensors)
    return HashStats(
        hashes=reference.hash_tensors(tensors),
        nonfinite=[reference.nonfinite_count(t) for t in tensors],
        nonzero=[reference.nonzero_count(t) for t in tensors],
    )


def hash_stats_tensor(tensors: Sequence[torch.Tensor], backend: Backend = "auto") -> torch.Tensor:
    """(n, 3) int64 tensor on the tensors' device: hash bits (as int64), NaN/Inf count, non-zero count.

    No host synchronisation on the fused path: all-gather column 0 across replicas (8 bytes per tensor) and
    compare bitwise; ``tensor[:, 0].view(torch.uint64)`` (or ``& (2**64 - 1)`` per value) gives the unsigned hashes.
    """
    tensors = list(tensors)
    if resolve_backend(backend, tensors) == "triton":
        from callbacks.hashing.fused import fused_hash_table

        return fused_hash_table(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    if not tensors:
        return torch.zeros((0, 3), dtype=torch.int64)
    sums = torch.stack([reference.unit_sum_tensor(t) for t in tensors])
    hashes = reference.finalize_tensor(sums, reference.headers_tensor(tensors, device))
    counts = torch.tensor([[reference.nonfinite_count(t), reference.nonzero_count(t)] for t in tensors],
                          dtype=torch.int64, device=device)
    return torch.cat([hashes[:, None], counts], dim=1)


def hash_tensors(tensors: Sequence[torch.Tensor], backend: Backend = "auto") -> list[int]:
    """64-bit hashes (unsigned Python ints) of ``tensors``; equal bytes, dtype and shape give equal hashes.
    A wrapper subclass is hashed by its inner tensors (:func:`inner_tensors`)."""
    tensors, spans = _expanded(list(tensors))
    if spans is not None:
        return _combined(hash_tensors(tensors, backend), spans)
    if resolve_backend(backend, tensors) == "triton":
        return hash_with_stats(tensors, backend="triton").hashes
    return reference.hash_tensors(tensors)


__all__ = [
    "BACKENDS",
    "HashStats",
    "hash_stats_tensor",
    "hash_tensors",
    "hash_with_stats",
    "inner_tensors",
    "is_wrapper_subclass",
    "resolve_backend",
    "triton_available",
]
