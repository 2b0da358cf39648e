"""The hash specification shared by every backend (constants and the per-tensor header).

A tensor's hash is a 64-bit value computed from its dtype, shape and bytes:

1. The bytes (contiguous, native little-endian) are cut into 4-byte *units*, whatever the dtype; when the
   byte count is not a multiple of 4 the last unit is completed with zero bytes (the header below folds in the
   shape, so the padding is never ambiguous). A unit is read as an unsigned 32-bit integer ``u`` (bits
   reinterpreted, never converted by value, so ``-0.0 != 0.0`` and every NaN payload counts). Packing 1- and
   2-byte elements four or two to a unit keeps the per-unit mix below the memory bandwidth of a GPU for them
   too (with one unit per element, the fused kernel's main loop issued 20 and 10 instructions per byte for 1-
   and 2-byte dtypes against 5 for float32: ``benchmarks/hash_kernel_sass.py``).
2. Unit ``j`` (0-based position in the flattened tensor) contributes ``mix(u XOR (j * KEY_MULT))`` where
   ``mix(z) = ((z ^ (z >> 32)) * MIX_MULT) ^ (((z ^ (z >> 32)) * MIX_MULT) >> 32)`` on 64-bit words with
   wrapping arithmetic and logical shifts. Keying by position makes swapped elements hash differently
   (``torch.hash_tensor``'s XOR does not).
3. The contributions are summed with wrapping 64-bit addition: the order of reduction never changes the
   result, so a fused kernel may split tensors into blocks freely.
4. ``hash = mix(sum XOR header)`` where ``header`` (computed on the host, once per dtype and shape) folds the
   dtype name and the shape in.

The per-tensor statistics returned with the hash are defined on the bits too (:func:`stat_masks`), so that they
exist for every dtype (torch has no ``isfinite``/``count_nonzero`` for most float8 types): an element is read as
one 64-bit word (two for 16-byte dtypes); it is NaN/Inf when any word ``w`` has ``w & m0 == v0`` or
``w & m1 == v1``, and non-zero when any word has ``w & nz != zv`` (``zv`` is 0 except for ``float8_e8m0fnu``,
which has no zero). The masks reproduce ``torch.isfinite`` and
``torch.count_nonzero`` of the values (``-0.0`` is zero, NaN is non-zero, a complex number is NaN/Inf or non-zero
when either part is).

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


#: bytes per hashing unit, for every dtype
UNIT_BYTES = 4


def unit_count(nbytes: int) -> int:
    """How many units ``nbytes`` bytes are cut into (the last one zero-padded)."""
    return -(-nbytes // UNIT_BYTES)


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


#: masks that never match: "this dtype has no NaN/Inf"
_NEVER = (0, 1)


def _float_masks(exponent: int, sign: int, width: int) -> tuple[int, int, int]:
    """(m, v, nz) for an IEEE-like float whose all-ones exponent means Inf/NaN."""
    return exponent, exponent, ((1 << (8 * width)) - 1) & ~sign


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


@functools.lru_cache(maxsize=64)
def stat_masks(dtype: torch.dtype) -> tuple[int, int, int, int, int, int]:
    """``(m0, v0, m1, v1, nz, zv)`` defining the NaN/Inf and non-zero counts of ``dtype`` on an element's word(s).

    Integer and bool dtypes (and any dtype not listed) have no NaN/Inf and are non-zero when any bit is set.
    """
    name = str(dtype).removeprefix("torch.")
    width = element_size(dtype)
    word_bits = 8 * min(width, 8)
    all_ones = (1 << word_bits) - 1
    ieee = {
        "float16": (0x7C00, 0x8000, 2),
        "bfloat16": (0x7F80, 0x8000, 2),
        "float32": (0x7F800000, 0x80000000, 4),
        "float64": (0x7FF0000000000000, 1 << 63, 8),
        "complex128": (0x7FF0000000000000, 1 << 63, 8),  # two 8-byte words, each a float64
        "float8_e5m2": (0x7C, 0x80, 1),
    }
    if name in ieee:
        m, v, nz = _float_masks(*ieee[name])
        return m, v, *_NEVER, nz, 0
    if name == "complex32":  # two float16 in one 4-byte word
        return 0x7C00, 0x7C00, 0x7C00 << 16, 0x7C00 << 16, 0x7FFF7FFF, 0
    if name == "complex64":  # two float32 in one 8-byte word
        return 0x7F800000, 0x7F800000, 0x7F800000 << 32, 0x7F800000 << 32, 0x7FFFFFFF7FFFFFFF, 0
    if name == "float8_e4m3fn":  # no Inf; NaN is S.1111.111; -0.0 is zero
        return 0x7F, 0x7F, *_NEVER, 0x7F, 0
    if name in ("float8_e4m3fnuz", "float8_e5m2fnuz"):  # no Inf, no -0.0; 0x80 is the only NaN
        return 0xFF, 0x80, *_NEVER, 0xFF, 0
    if name == "float8_e8m0fnu":  # powers of two only, no zero (every element is non-zero); 0xFF is NaN
        return 0xFF, 0xFF, *_NEVER, *_NEVER
    if name == "float4_e2m1fn_x2":  # two packed fp4 (no NaN/Inf); zero when both magnitudes are zero
        return *_NEVER, *_NEVER, 0x77, 0
    return *_NEVER, *_NEVER, all_ones, 0
