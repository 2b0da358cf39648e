"""The fused Triton kernel: one launch hashes a whole list of tensors and counts their NaN/Inf and non-zeros.

Layout. The host builds, once per *layout* (the tensors' data pointers, dtypes and shapes), two int64 tables on
the tensors' device and keeps them in a small LRU cache; any change of a ``data_ptr`` (FSDP resharding, a
resize, a new gradient buffer) is a new layout and rebuilds them:

- the tensor table, one row per tensor: address, element count, element width in bytes, and the six stat masks
  of :func:`callbacks.hashing.spec.stat_masks`;
- the chunk table, one row per chunk of ``chunk`` elements: (tensor row, first element).

One program hashes one chunk: it casts the address loaded from the table to a pointer of the element width
(64-bit offsets; ``tl.multiple_of`` when every address is 16-byte aligned), streams the chunk in blocks (full
blocks unmasked, the tail masked), sums the unit contributions with wrapping uint64 adds and counts the flags,
then adds the three per-chunk partials into the tensor's row of the output with integer atomics. Integer
addition is associative, so the result does not depend on chunking, block size or the order of the atomics:
the kernel equals the torch reference bit for bit. Finalisation (``mix(sum XOR header)``) is a handful of
vectorised torch operations over the per-tensor sums with cached headers; one device-to-host copy returns all.

Extra device memory is O(number of tensors + number of chunks); gradients are never copied or concatenated
(non-contiguous tensors are made contiguous first: the hash is defined on the contiguous bytes).

On CPU, set ``TRITON_INTERPRET=1`` before this module is imported: the same kernel runs under Triton's
interpreter on CPU tensors (slowly), which is how the tests prove kernel == reference without a GPU.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from callbacks.hashing import reference
from callbacks.hashing.spec import element_size, stat_masks, to_signed

#: elements per chunk (one program); a multiple of every BLOCK
DEFAULT_CHUNK = 1 << 15
#: elements per block (one iteration of a program's loop)
DEFAULT_BLOCK = 2048
#: how many layouts keep their tables cached (gradients, parameters, a few more)
LAYOUT_CACHE_SIZE = 8
#: columns of the tensor table
_TABLE_COLUMNS = 9
#: element widths the kernel handles, as bits of the WIDTHS constexpr
_WIDTH_BITS = {1: 1, 2: 2, 4: 4, 8: 8, 16: 16}

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _mix(z):
    """The spec's mix on uint64 words (wrapping multiply, logical shifts)."""
    z = z ^ (z >> 32)
    z = z * 0xD6E8FEB86659FD93
    return z ^ (z >> 32)


@triton.jit
def _flags(w, m0, v0, m1, v1, nzm, zv):
    """Per-word NaN/Inf and non-zero flags (spec.stat_masks)."""
    nonfinite = ((w & m0) == v0) | ((w & m1) == v1)
    nonzero = (w & nzm) != zv
    return nonfinite, nonzero


@triton.jit
def _block(base, off, lanes, key, limit, acc, nf, nz, m0, v0, m1, v1, nzm, zv,
           WIDTH: tl.constexpr, MASKED: tl.constexpr):
    """Hash one block of elements ``off + lanes`` (position keys ``key``) and accumulate into (acc, nf, nz)."""
    offs = off + lanes  # int64 element indices
    if MASKED:
        mask = offs < limit
    if WIDTH == 16:
        if MASKED:
            wa = tl.load(base + 2 * offs, mask=mask, other=0)
            wb = tl.load(base + 2 * offs + 1, mask=mask, other=0)
        else:
            wa = tl.load(base + 2 * offs)
            wb = tl.load(base + 2 * offs + 1)
        wa = wa.to(tl.uint64, bitcast=True)
        wb = wb.to(tl.uint64, bitcast=True)
        k4 = key << 2  # unit j = 4e + i
        contrib = _mix((wa & 0xFFFFFFFF) ^ k4)
        contrib += _mix((wa >> 32) ^ (k4 + 0x9E3779B97F4A7C15))
        contrib += _mix((wb & 0xFFFFFFFF) ^ (k4 + 0x3C6EF372FE94F82A))  # 2 * KEY mod 2**64
        contrib += _mix((wb >> 32) ^ (k4 + 0xDAA66D2C7DDF743F))  # 3 * KEY mod 2**64
        fa, za = _flags(wa, m0, v0, m1, v1, nzm, zv)
        fb, zb = _flags(wb, m0, v0, m1, v1, nzm, zv)
        nonfinite = fa | fb
        nonzero = za | zb
    else:
        if MASKED:
            w = tl.load(base + offs, mask=mask, other=0)
        else:
            w = tl.load(base + offs)
        if WIDTH == 8:
            w = w.to(tl.uint64, bitcast=True)
            k2 = key << 1  # unit j = 2e + i
            contrib = _mix((w & 0xFFFFFFFF) ^ k2) + _mix((w >> 32) ^ (k2 + 0x9E3779B97F4A7C15))
        else:
            w = w.to(tl.uint64)  # the loaded pointer types are unsigned: zero extension
            contrib = _mix(w ^ key)
        nonfinite, nonzero = _flags(w, m0, v0, m1, v1, nzm, zv)
    if MASKED:
        contrib = tl.where(mask, contrib, 0)
        nonfinite = nonfinite & mask
        nonzero = nonzero & mask
    return acc + contrib, nf + nonfinite.to(tl.int32), nz + nonzero.to(tl.int32)


@triton.jit
def _span(addr, start, stop, lanes, lane_keys, acc, nf, nz, m0, v0, m1, v1, nzm, zv,
          WIDTH: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Hash elements [start, stop) of one tensor whose elements are WIDTH bytes wide."""
    if WIDTH == 1:
        base = addr.to(tl.pointer_type(tl.uint8))
    elif WIDTH == 2:
        base = addr.to(tl.pointer_type(tl.uint16))
    elif WIDTH == 4:
        base = addr.to(tl.pointer_type(tl.uint32))
    else:  # 8 and 16 bytes: 8-byte words
        base = addr.to(tl.pointer_type(tl.int64))
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    full_stop = start + ((stop - start) // BLOCK) * BLOCK
    # position key of element e is e * KEY (wrapping): start * KEY + lane * KEY, then + BLOCK * KEY per block
    key = start.to(tl.uint64) * 0x9E3779B97F4A7C15 + lane_keys
    step = tl.full([], BLOCK, tl.uint64) * 0x9E3779B97F4A7C15
    for off in range(start, full_stop, BLOCK):
        acc, nf, nz = _block(base, off, lanes, key, stop, acc, nf, nz, m0, v0, m1, v1, nzm, zv,
                             WIDTH=WIDTH, MASKED=False)
        key += step
    if full_stop < stop:
        acc, nf, nz = _block(base, full_stop, lanes, key, stop, acc, nf, nz, m0, v0, m1, v1, nzm, zv,
                             WIDTH=WIDTH, MASKED=True)
    return acc, nf, nz


@triton.jit
def _hash_kernel(table_ptr, chunk_ptr, out_ptr,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr, WIDTHS: tl.constexpr, ALIGNED: tl.constexpr):
    """One program per chunk: hash it and add (unit sum, NaN/Inf count, non-zero count) into its tensor's row."""
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(chunk_ptr + 2 * pid)
    start = tl.load(chunk_ptr + 2 * pid + 1)
    entry = table_ptr + row * 9
    addr = tl.load(entry)
    numel = tl.load(entry + 1)
    width = tl.load(entry + 2)
    m0 = tl.load(entry + 3).to(tl.uint64, bitcast=True)
    v0 = tl.load(entry + 4).to(tl.uint64, bitcast=True)
    m1 = tl.load(entry + 5).to(tl.uint64, bitcast=True)
    v1 = tl.load(entry + 6).to(tl.uint64, bitcast=True)
    nzm = tl.load(entry + 7).to(tl.uint64, bitcast=True)
    zv = tl.load(entry + 8).to(tl.uint64, bitcast=True)
    start = tl.multiple_of(start, BLOCK)  # chunks start at multiples of CHUNK, a multiple of BLOCK
    stop = tl.minimum(start + CHUNK, numel)

    lanes = tl.arange(0, BLOCK).to(tl.int64)
    lane_keys = lanes.to(tl.uint64) * 0x9E3779B97F4A7C15
    acc = tl.zeros([BLOCK], dtype=tl.uint64)
    nf = tl.zeros([BLOCK], dtype=tl.int32)
    nz = tl.zeros([BLOCK], dtype=tl.int32)
    # WIDTHS (constexpr) lists the widths present: a bf16-only model compiles one branch
    if (WIDTHS & 1) != 0:
        if width == 1:
            acc, nf, nz = _span(addr, start, stop, lanes, lane_keys, acc, nf, nz, m0, v0, m1, v1, nzm, zv,
                                WIDTH=1, BLOCK=BLOCK, ALIGNED=ALIGNED)
    if (WIDTHS & 2) != 0:
        if width == 2:
            acc, nf, nz = _span(addr, start, stop, lanes, lane_keys, acc, nf, nz, m0, v0, m1, v1, nzm, zv,
                                WIDTH=2, BLOCK=BLOCK, ALIGNED=ALIGNED)
    if (WIDTHS & 4) != 0:
        if width == 4:
            acc, nf, nz = _span(addr, start, stop, lanes, lane_keys, acc, nf, nz, m0, v0, m1, v1, nzm, zv,
                                WIDTH=4, BLOCK=BLOCK, ALIGNED=ALIGNED)
    if (WIDTHS & 8) != 0:
        if width == 8:
            acc, nf, nz = _span(addr, start, stop, lanes, lane_keys, acc, nf, nz, m0, v0, m1, v1, nzm, zv,
                                WIDTH=8, BLOCK=BLOCK, ALIGNED=ALIGNED)
    if (WIDTHS & 16) != 0:
        if width == 16:
            acc, nf, nz = _span(addr, start, stop, lanes, lane_keys, acc, nf, nz, m0, v0, m1, v1, nzm, zv,
                                WIDTH=16, BLOCK=BLOCK, ALIGNED=ALIGNED)
    total = tl.sum(acc, axis=0)  # uint64 addition wraps
    out = out_ptr + row * 3
    tl.atomic_add(out, total.to(tl.int64, bitcast=True))
    tl.atomic_add(out + 1, tl.sum(nf, axis=0).to(tl.int64))
    tl.atomic_add(out + 2, tl.sum(nz, axis=0).to(tl.int64))


@dataclasses.dataclass
class _Plan:
    """Device tables for one layout."""

    table: torch.Tensor  # (n_tensors, 9) int64
    chunks: torch.Tensor  # (n_chunks, 2) int64
    headers: torch.Tensor  # (n_tensors,) int64
    n_chunks: int
    widths: int
    aligned: bool


_PLANS: collections.OrderedDict[tuple, _Plan] = collections.OrderedDict()
#: how many times a table was built (tests read it to prove the cache works)
plan_builds = 0


def _build_plan(tensors: Sequence[torch.Tensor], chunk: int, device: torch.device) -> _Plan:
    """The tensor and chunk tables of a layout (O(n_tensors) host work, then two host-to-device copies)."""
    global plan_builds
    plan_builds += 1
    rows = []
    widths = 0
    aligned = True
    for t in tensors:
        width = element_size(t.dtype)
        if width not in _WIDTH_BITS:
            raise ValueError(f"the fused hash has no path for {width}-byte dtype {t.dtype}")
        widths |= _WIDTH_BITS[width]
        addr = t.data_ptr()
        aligned = aligned and (addr % 16 == 0 or t.numel() == 0)
        rows.append([addr, t.numel(), width, *(to_signed(m) for m in stat_masks(t.dtype))])
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, _TABLE_COLUMNS)
    per_tensor = (table[:, 1] + chunk - 1) // chunk
    n_chunks = int(per_tensor.sum())
    owner = torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int64), per_tensor)
    first_chunk = torch.cumsum(per_tensor, 0) - per_tensor
    starts = (torch.arange(n_chunks, dtype=torch.int64) - first_chunk[owner]) * chunk
    chunks = torch.stack([owner, starts], dim=1)
    return _Plan(
        table=table.to(device),
        chunks=chunks.to(device),
        headers=reference.headers_tensor(tensors, device),
        n_chunks=n_chunks,
        widths=widths,
        aligned=aligned,
    )


def _plan_for(tensors: Sequence[torch.Tensor], chunk: int) -> _Plan:
    """The cached plan of this layout, rebuilt when any data pointer, dtype or shape changed."""
    device = tensors[0].device
    key = (chunk, device, tuple([(t.data_ptr(), t.dtype, t.shape) for t in tensors]))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _build_plan(tensors, chunk, device)
        _PLANS[key] = plan
        while len(_PLANS) > LAYOUT_CACHE_SIZE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def clear_cache() -> None:
    """Drop every cached layout table."""
    _PLANS.clear()


def fused_hash_table(
    tensors: Sequence[torch.Tensor],
    chunk: int = DEFAULT_CHUNK,
    block: int = DEFAULT_BLOCK,
    num_warps: int = 8,
) -> torch.Tensor:
    """(n, 3) int64 tensor on the tensors' device: hash bits (as int64), NaN/Inf count, non-zero count.

    No host synchronisation: suited to an all-gather of the hashes across replicas (8 bytes per tensor).
    """
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return torch.zeros((0, 3), dtype=torch.int64)
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError("fused hash: all tensors must be on one device")
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError("the fused hash kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if chunk % block or block & (block - 1):
        raise ValueError("chunk must be a multiple of block, and block a power of two")
    # the hash is defined on contiguous bytes; keep the copies alive until the kernel has run
    tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    plan = _plan_for(tensors, chunk)
    out = torch.zeros((len(tensors), 3), dtype=torch.int64, device=device)
    if plan.n_chunks:
        _hash_kernel[(plan.n_chunks,)](
            plan.table, plan.chunks, out,
            CHUNK=chunk, BLOCK=block, WIDTHS=plan.widths, ALIGNED=plan.aligned,
            num_warps=num_warps,
        )
    out[:, 0] = reference.finalize_tensor(out[:, 0].clone(), plan.headers)
    return out


def fused_hash_with_stats(tensors: Sequence[torch.Tensor], **kwargs):
    """Hash every tensor in one launch; returns :class:`callbacks.hashing.HashStats` (unsigned 64-bit hashes)."""
    from callbacks.hashing import HashStats

    table = fused_hash_table(tensors, **kwargs).cpu()
    return HashStats(
        hashes=table[:, 0].view(torch.uint64).tolist(),
        nonfinite=table[:, 1].tolist(),
        nonzero=table[:, 2].tolist(),
    )


__all__ = ["DEFAULT_BLOCK", "DEFAULT_CHUNK", "INTERPRET", "clear_cache", "fused_hash_table", "fused_hash_with_stats"]
