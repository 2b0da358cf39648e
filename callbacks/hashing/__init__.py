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


def hash_with_stats(tensors: Sequence[torch.Tensor], backend: Backend = "auto") -> HashStats:
    """Hash every tensor and count its NaN/Inf and non-zero elements."""
    tensors = list(tensors)
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
    """64-bit hashes (unsigned Python ints) of ``tensors``; equal bytes, dtype and shape give equal hashes."""
    tensors = list(tensors)
    if resolve_backend(backend, tensors) == "triton":
        return hash_with_stats(tensors, backend="triton").hashes
    return reference.hash_tensors(tensors)


__all__ = [
    "BACKENDS",
    "HashStats",
    "hash_stats_tensor",
    "hash_tensors",
    "hash_with_stats",
    "resolve_backend",
    "triton_available",
]
