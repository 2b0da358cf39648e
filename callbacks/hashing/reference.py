"""The torch reference of the hash: vectorised, runs on any device, defines the result bit for bit.

int64 tensors carry the 64-bit words: torch multiplies and adds int64 with two's-complement wrap-around, and
logical right shifts are an arithmetic shift followed by a mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from callbacks.hashing.spec import KEY_MULT, MIX_MULT, finalize, to_signed, to_unsigned

#: units hashed per chunk: bounds the reference's extra memory to a few int64 arrays of this length
CHUNK_UNITS = 1 << 22

_KEY = to_signed(KEY_MULT)
_MIX = to_signed(MIX_MULT)
_LOW32 = 0xFFFFFFFF


def units(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's hashing units as a flat int64 tensor of unsigned values (bits reinterpreted)."""
    flat = tensor.detach().contiguous().reshape(-1)
    size = flat.element_size()
    if size == 1:
        return flat.view(torch.uint8).to(torch.int64)
    if size == 2:
        return flat.view(torch.int16).to(torch.int64) & 0xFFFF
    return flat.view(torch.int32).to(torch.int64) & _LOW32  # 4, 8 and 16-byte dtypes: 4-byte units


def _srl32(z: torch.Tensor) -> torch.Tensor:
    """Logical right shift by 32 of int64 words."""
    return (z >> 32) & _LOW32


def unit_sum(tensor: torch.Tensor) -> int:
    """Wrapping 64-bit sum of the unit contributions of ``tensor`` (before :func:`finalize`)."""
    words = units(tensor)
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), CHUNK_UNITS):
        u = words[start:start + CHUNK_UNITS]
        j = torch.arange(start, start + u.numel(), dtype=torch.int64, device=u.device)
        z = u ^ (j * _KEY)
        z = (z ^ _srl32(z)) * _MIX
        z = z ^ _srl32(z)
        total = total + z.sum()  # int64 sum wraps like the spec's 64-bit addition
    return to_unsigned(int(total.item()))


def hash_tensor(tensor: torch.Tensor) -> int:
    """The 64-bit hash of one tensor (see :mod:`callbacks.hashing.spec`)."""
    return finalize(unit_sum(tensor), tensor.dtype, tuple(tensor.shape))


def hash_tensors(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Hashes of a list of tensors, one reference pass per tensor."""
    return [hash_tensor(t) for t in tensors]


def nonfinite_count(tensor: torch.Tensor) -> int:
    """Number of NaN/Inf elements (0 for non-floating dtypes)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    return int((~torch.isfinite(tensor.detach())).sum().item())


def nonzero_count(tensor: torch.Tensor) -> int:
    """Number of non-zero elements."""
    return int(torch.count_nonzero(tensor.detach()).item())
