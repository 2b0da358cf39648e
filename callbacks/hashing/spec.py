"""The hash specification shared by every backend (constants and the per-tensor header).

A tensor's hash is a 64-bit value computed from its dtype, shape and bytes:

1. The bytes (contiguous, native little-endian) are cut into *units*: the element's own width for 1-, 2- and
   4-byte dtypes, and two 4-byte units (low word first) for 8- and 16-byte dtypes. A unit is read as an
   unsigned integer ``u`` (bits reinterpreted, never converted by value, so ``-0.0 != 0.0`` and every NaN
   payload counts).
2. Unit ``j`` (0-based position in the flattened tensor) contributes ``mix(u XOR (j * KEY_MULT))`` where
   ``mix(z) = ((z ^ (z >> 32)) * MIX_MULT) ^ (((z ^ (z >> 32)) * MIX_MULT) >> 32)`` on 64-bit words with
   wrapping arithmetic and logical shifts. Keying by position makes swapped elements hash differently
   (``torch.hash_tensor``'s XOR does not).
3. The contributions are summed with wrapping 64-bit addition: the order of reduction never changes the
   result, so a fused kernel may split tensors into blocks freely.
4. ``hash = mix(sum XOR header)`` where ``header`` (computed on the host, once per dtype and shape) folds the
   dtype name and the shape in.

Not cryptographic: it detects accidental change (a flipped bit, a moved weight, a diverged replica).
"""

from __future__ import annotations

import functools

import torch

MASK64 = (1 << 64) - 1
#: multiplier keying a unit by its position (the 64-bit golden ratio)
KEY_MULT = 0x9E3779B97F4A7C15
#: multiplier of the per-unit mix
MIX_MULT = 0xD6E8FEB86659FD93


def to_signed(value: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits (for torch/triton constants)."""
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def to_unsigned(value: int) -> int:
    """An int64's bits as an unsigned 64-bit Python int."""
    return value & MASK64


def mix64(z: int) -> int:
    """The per-unit mix on Python ints (host side)."""
    z &= MASK64
    z = ((z ^ (z >> 32)) * MIX_MULT) & MASK64
    return z ^ (z >> 32)


def unit_bytes(dtype: torch.dtype) -> int:
    """Width of one hashing unit for ``dtype``: the element width, capped at 4 bytes."""
    size = torch.empty((), dtype=dtype).element_size()
    return min(size, 4)


def units_per_element(dtype: torch.dtype) -> int:
    """How many units one element of ``dtype`` is cut into (2 or 4 for 8- and 16-byte dtypes)."""
    size = torch.empty((), dtype=dtype).element_size()
    return max(1, size // 4)


@functools.lru_cache(maxsize=4096)
def header(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """The host-side 64-bit header folding in dtype name and shape (cached per layout)."""
    h = 0x243F6A8885A308D3
    for byte in str(dtype).encode():
        h = mix64(h ^ byte ^ (len(shape) << 8))
    for dim in shape:
        h = mix64(h ^ (dim + 0x9E3779B9))
    return h & MASK64


def finalize(unit_sum: int, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """The tensor's hash from the wrapping sum of its unit contributions."""
    return mix64((unit_sum & MASK64) ^ header(dtype, tuple(shape)))
