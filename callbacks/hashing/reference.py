"""The torch reference of the hash: vectorised, runs on any device, defines the result bit for bit.

int64 tensors carry the 64-bit words: torch multiplies and adds int64 with two's-complement wrap-around, and
logical right shifts are an arithmetic shift followed by a mask.

Speed: the units are processed in cache-sized chunks with in-place operations, and the position keys
``j * KEY_MULT`` are read from a cached ``arange * KEY_MULT`` (beyond it: the cached keys plus one scalar,
``(a + b) * k == a*k + b*k`` under wrap-around), so a unit costs about ten elementwise int64 operations.
:func:`hash_tensors` lays the tensors smaller than a chunk end to end, so a list of many small tensors costs a
few operations per chunk rather than a dozen per tensor, and reuses its buffers across tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from callbacks.hashing.spec import (
    KEY_MULT,
    MIX_MULT,
    UNIT_BYTES,
    element_size,
    finalize,
    header,
    stat_masks,
    to_signed,
    to_unsigned,
    unit_count,
)

#: units hashed per chunk on CPU: small enough for the temporaries to stay in cache
CHUNK_UNITS = 1 << 16
#: position keys cached on CPU (8 MiB): units at positions below it are keyed by reading, not computing
KEY_CACHE_UNITS = 1 << 20
#: units hashed per chunk on accelerators: large enough that kernel launches do not dominate
DEVICE_CHUNK_UNITS = 1 << 24
#: elements classified per chunk by the bitwise NaN/Inf and non-zero counts
STAT_CHUNK = 1 << 16

_KEY = to_signed(KEY_MULT)
_MIX = to_signed(MIX_MULT)
_LOW32 = 0xFFFFFFFF


def units(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's hashing units as a flat int64 tensor of unsigned 32-bit values (bits reinterpreted)."""
    return _words(_flat(tensor)).to(torch.int64)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements, contiguous and flat (a copy only when the input is not contiguous)."""
    return tensor.detach().contiguous().reshape(-1)


def _words(flat: torch.Tensor) -> torch.Tensor:
    """A flat tensor's bytes as unsigned 32-bit units: a view when they are whole aligned words, else a copy
    completed with zero bytes (odd-length or oddly placed 1- and 2-byte tensors)."""
    nbytes = flat.numel() * flat.element_size()
    raw = flat.view(torch.uint8)
    if nbytes % UNIT_BYTES == 0 and flat.data_ptr() % UNIT_BYTES == 0 and (
            flat.storage_offset() * flat.element_size()) % UNIT_BYTES == 0:
        return raw.view(torch.uint32)
    padded = torch.zeros(unit_count(nbytes) * UNIT_BYTES, dtype=torch.uint8, device=flat.device)
    padded[:nbytes] = raw
    return padded.view(torch.uint32)


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
    return unit_sums_tensor([tensor])[0]


def unit_sums_tensor(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`unit_sum` of each tensor (all on one device) as an int64 tensor, with few operations per tensor.

    A tensor of a chunk's length or more is processed alone, chunk by chunk. Smaller tensors (of any dtype:
    every unit is 4 bytes) are laid end to end and cut into chunks, so many small tensors share one chunk's
    operations: a piece of a tensor at chunk offset ``c`` starting at its unit ``p`` has the keys
    ``lane[c + i] + (p - c) * KEY`` (wrapping), and a piece's sum is the difference of the chunk's running sum
    at its ends.
    """
    flats = [_flat(t) for t in tensors]
    device = flats[0].device if flats else torch.device("cpu")
    sums = torch.zeros(len(flats), dtype=torch.int64, device=device)
    length = CHUNK_UNITS if device.type == "cpu" else DEVICE_CHUNK_UNITS
    small: list[tuple[int, torch.Tensor]] = []
    buffers: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}
    for slot, flat in enumerate(flats):
        words = _words(flat)
        if 0 < words.numel() < length:
            small.append((slot, words))
        elif words.numel():
            for start in range(0, words.numel(), length):
                _chunk(sums, [(slot, words[start:start + length], start)], length, buffers)
    pieces: list[tuple[int, torch.Tensor, int]] = []  # (slot, units, position of the first unit in its tensor)
    fill = 0
    for slot, words in small:
        n, position = words.numel(), 0
        while position < n:
            take = min(n - position, length - fill)
            pieces.append((slot, words[position:position + take], position))
            fill, position = fill + take, position + take
            if fill == length:
                _chunk(sums, pieces, length, buffers)
                pieces, fill = [], 0
    if pieces:
        _chunk(sums, pieces, length, buffers)
    return sums


def _chunk(sums: torch.Tensor, pieces: list[tuple[int, torch.Tensor, int]], length: int,
           buffers: dict[torch.dtype, tuple[torch.Tensor, ...]]) -> None:
    """Mix the units of ``pieces`` (laid end to end, at most ``length``) and add each piece's sum to its slot."""
    unit_dtype, device = pieces[0][1].dtype, pieces[0][1].device
    if unit_dtype not in buffers:  # allocated once per call: fresh buffers per tensor cost page faults
        buffers[unit_dtype] = (torch.empty(length, dtype=torch.int64, device=device),
                               torch.empty(length, dtype=torch.int64, device=device),
                               torch.empty(length, dtype=unit_dtype, device=device))
    z_buf, keys_buf, units_buf = buffers[unit_dtype]
    lane = _lane_keys(device, max(length, KEY_CACHE_UNITS if device.type == "cpu" else 0))
    count = sum(words.numel() for _, words, _ in pieces)
    z, keys = z_buf[:count], keys_buf[:count]
    if len(pieces) == 1:
        z.copy_(pieces[0][1])  # unsigned units -> int64, zero-extended
    else:
        torch.cat([words for _, words, _ in pieces], out=units_buf[:count])
        z.copy_(units_buf[:count])
    start = 0
    for _, words, position in pieces:  # XOR each unit with the key of its position in its tensor
        n = words.numel()
        if position + n <= lane.numel():  # the cached keys reach: read them
            z[start:start + n].bitwise_xor_(lane[position:position + n])
        else:  # (start + i + (position - start)) * KEY, wrapping
            torch.add(lane[start:start + n], to_signed((position - start) * KEY_MULT), out=keys[start:start + n])
            z[start:start + n].bitwise_xor_(keys[start:start + n])
        start += n
    mix_(z, keys)
    if len(pieces) == 1:
        sums[pieces[0][0]] += z.sum()  # int64 sums wrap like the spec's 64-bit addition
        return
    ends = torch.tensor([0] + [words.numel() for _, words, _ in pieces], device=device).cumsum(0)
    running = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), z.cumsum(0)])
    slots = torch.tensor([slot for slot, _, _ in pieces], dtype=torch.int64, device=device)
    sums.index_add_(0, slots, running[ends[1:]] - running[ends[:-1]])  # wrapping differences: exact mod 2**64


def hash_tensor(tensor: torch.Tensor) -> int:
    """The 64-bit hash of one tensor (see :mod:`callbacks.hashing.spec`)."""
    return finalize(unit_sum(tensor), tensor.dtype, tuple(tensor.shape))


def hash_tensors(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Hashes of a list of tensors: the unit sums of each device's tensors in one streamed pass."""
    tensors = list(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    out: list[int] = [0] * len(tensors)
    for indices in by_device.values():
        sums = unit_sums_tensor([tensors[i] for i in indices]).tolist()
        for i, value in zip(indices, sums, strict=True):
            out[i] = finalize(to_unsigned(value), tensors[i].dtype, tuple(tensors[i].shape))
    return out


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
    "unit_sums_tensor",
    "units",
]
