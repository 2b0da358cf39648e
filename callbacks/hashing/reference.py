"""The torch reference of the hash: vectorised, runs on any device, defines the result bit for bit.

int64 tensors carry the 64-bit words: torch multiplies and adds int64 with two's-complement wrap-around, and
logical right shifts are an arithmetic shift followed by a mask.

Speed: the units are processed in cache-sized chunks with in-place operations, and the position keys
``j * KEY_MULT`` of a chunk are a cached ``arange * KEY_MULT`` plus one scalar (``(a + b) * k == a*k + b*k``
under wrap-around), so a unit costs about ten elementwise int64 operations.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from callbacks.hashing.spec import (
    KEY_MULT,
    MIX_MULT,
    element_size,
    finalize,
    header,
    stat_masks,
    to_signed,
    to_unsigned,
)

#: units hashed per chunk on CPU: small enough for the temporaries to stay in cache
CHUNK_UNITS = 1 << 16
#: units hashed per chunk on accelerators: large enough that kernel launches do not dominate
DEVICE_CHUNK_UNITS = 1 << 24
#: elements classified per chunk by the bitwise NaN/Inf and non-zero counts
STAT_CHUNK = 1 << 16

_KEY = to_signed(KEY_MULT)
_MIX = to_signed(MIX_MULT)
_LOW32 = 0xFFFFFFFF


def units(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's hashing units as a flat int64 tensor of unsigned values (bits reinterpreted)."""
    return _as_units(_flat(tensor)).to(torch.int64) & _unit_mask(_flat(tensor).element_size())


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements, contiguous and flat (a copy only when the input is not contiguous)."""
    return tensor.detach().contiguous().reshape(-1)


def _as_units(flat: torch.Tensor) -> torch.Tensor:
    """A flat tensor's bytes viewed as its units (uint8, int16 or int32), without a copy."""
    size = flat.element_size()
    if size == 1:
        return flat.view(torch.uint8)
    if size == 2:
        return flat.view(torch.int16)
    return flat.view(torch.int32)  # 4, 8 and 16-byte dtypes: 4-byte units


def _unit_mask(size: int) -> int:
    """Mask turning a sign-extended unit into its unsigned value."""
    return {1: 0xFF, 2: 0xFFFF}.get(size, _LOW32)


@functools.lru_cache(maxsize=16)
def _lane_keys(device: torch.device, length: int) -> torch.Tensor:
    """``arange(length) * KEY_MULT`` (wrapping) on ``device``: the position keys of a chunk starting at 0."""
    return torch.arange(length, dtype=torch.int64, device=device) * _KEY


def mix_(z: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The spec's mix applied in place to int64 words (``scratch``: an optional buffer of the same size)."""
    scratch = torch.empty_like(z) if scratch is None else scratch
    torch.bitwise_right_shift(z, 32, out=scratch).bitwise_and_(_LOW32)
    z.bitwise_xor_(scratch).mul_(_MIX)
    torch.bitwise_right_shift(z, 32, out=scratch).bitwise_and_(_LOW32)
    return z.bitwise_xor_(scratch)


def unit_sum(tensor: torch.Tensor) -> int:
    """Wrapping 64-bit sum of the unit contributions of ``tensor`` (before :func:`finalize`)."""
    return to_unsigned(int(unit_sum_tensor(tensor).item()))


def unit_sum_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """:func:`unit_sum` as a 0-d int64 tensor on the tensor's device (no host synchronisation)."""
    flat = _flat(tensor)
    words = _as_units(flat)
    mask = _unit_mask(flat.element_size())
    n = words.numel()
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    if n == 0:
        return total
    length = min(CHUNK_UNITS if words.device.type == "cpu" else DEVICE_CHUNK_UNITS, n)
    keys = _lane_keys(words.device, length)
    z_buf = torch.empty(length, dtype=torch.int64, device=words.device)
    scratch = torch.empty_like(z_buf)
    for start in range(0, n, length):
        u = words[start:start + length]
        k = u.numel()
        z, s = z_buf[:k], scratch[:k]
        z.copy_(u).bitwise_and_(mask)  # sign-extended -> unsigned unit
        torch.add(keys[:k], to_signed(start * KEY_MULT), out=s)  # (start + i) * KEY, wrapping
        z.bitwise_xor_(s)
        mix_(z, s)
        total += z.sum()  # int64 sum wraps like the spec's 64-bit addition
    return total


def hash_tensor(tensor: torch.Tensor) -> int:
    """The 64-bit hash of one tensor (see :mod:`callbacks.hashing.spec`)."""
    return finalize(unit_sum(tensor), tensor.dtype, tuple(tensor.shape))


def hash_tensors(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Hashes of a list of tensors, one reference pass per tensor."""
    return [hash_tensor(t) for t in tensors]


def finalize_tensor(unit_sums: torch.Tensor, headers: torch.Tensor) -> torch.Tensor:
    """:func:`~callbacks.hashing.spec.finalize` over int64 tensors: ``mix(sum XOR header)``, vectorised."""
    return mix_(unit_sums ^ headers)


def headers_tensor(tensors: Sequence[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """The spec headers of ``tensors`` as an int64 tensor (host work: one cached lookup per tensor)."""
    values = [to_signed(header(t.dtype, tuple(t.shape))) for t in tensors]
    return torch.tensor(values, dtype=torch.int64, device=device)


def _element_words(flat: torch.Tensor) -> torch.Tensor:
    """Each element's bits as int64 words: shape (n,) for widths up to 8 bytes, (n, 2) for 16-byte dtypes."""
    size = flat.element_size()
    if size == 16:
        return flat.view(torch.int64).reshape(-1, 2)
    if size == 8:
        return flat.view(torch.int64)
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[size]
    return flat.view(view).to(torch.int64) & ((1 << (8 * size)) - 1)


def count_bits(tensor: torch.Tensor, which: str) -> int:
    """Count elements that are NaN/Inf (``which="nonfinite"``) or non-zero, on the bits (spec.stat_masks).

    Defined for every dtype; equals torch's value-based counts wherever torch has them (tested).
    """
    flat = _flat(tensor)
    m0, v0, m1, v1, nz, zv = (to_signed(x) for x in stat_masks(tensor.dtype))
    if which == "nonfinite" and m0 == 0 and m1 == 0:
        return 0
    total = 0
    for start in range(0, flat.numel(), STAT_CHUNK):
        w = _element_words(flat[start:start + STAT_CHUNK])
        if which == "nonfinite":
            hit = (w & m0) == v0
            if m1:
                hit |= (w & m1) == v1
        else:
            hit = (w & nz) != zv
        if hit.dim() == 2:
            hit = hit.any(dim=1)
        total += int(hit.sum().item())
    return total


#: dtypes whose torch.isfinite / torch.count_nonzero exist on every device and equal :func:`count_bits`
_TORCH_FLOATS = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128}
_TORCH_COUNTABLE = _TORCH_FLOATS | {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}


def nonfinite_count(tensor: torch.Tensor) -> int:
    """Number of NaN/Inf elements (0 for integer and bool dtypes); same as ``~torch.isfinite`` of the values."""
    if tensor.dtype in _TORCH_FLOATS:
        return tensor.numel() - int(torch.isfinite(tensor.detach()).sum().item())
    return count_bits(tensor, "nonfinite")


def nonzero_count(tensor: torch.Tensor) -> int:
    """Number of non-zero elements (``-0.0`` is zero, NaN is not); same as ``torch.count_nonzero`` of the values."""
    if tensor.dtype in _TORCH_COUNTABLE:
        return int(torch.count_nonzero(tensor.detach()).item())
    return count_bits(tensor, "nonzero")


__all__ = [
    "count_bits",
    "element_size",
    "finalize_tensor",
    "hash_tensor",
    "hash_tensors",
    "headers_tensor",
    "mix_",
    "nonfinite_count",
    "nonzero_count",
    "unit_sum",
    "unit_sum_tensor",
    "units",
]
