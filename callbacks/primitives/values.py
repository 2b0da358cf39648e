"""Bitwise equality of tensors: the one definition of "equal values" every check uses.

Two tensors are equal when they hold the same dtype, shape and bytes. Bytes, not ``==``: a NaN equals the same
NaN payload (so a copied NaN is not a difference) and ``-0.0`` differs from ``0.0`` (a hash sees the difference,
so equality must too).
"""

from __future__ import annotations

import torch


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same dtype, shape and bytes (NaN payloads included); meta tensors hold no
    bytes and are never equal. ``b`` is compared on ``a``'s device."""
    if a.dtype != b.dtype or a.shape != b.shape or "meta" in (a.device.type, b.device.type):
        return False
    a, b = a.detach().reshape(-1), b.detach().to(a.device).reshape(-1)
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


__all__ = ["bitwise_equal"]
