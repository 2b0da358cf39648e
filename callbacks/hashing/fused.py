"""The fused Triton kernel: one launch hashes a whole list of tensors and counts their NaN/Inf and non-zeros.

Layout. The host builds, once per *layout* (the tensors' data pointers, dtypes and shapes), two int64 tables on
the tensors' device and keeps them in a small LRU cache; any change of a ``data_ptr`` (FSDP resharding, a
resize, a new gradient buffer) is a new layout and rebuilds them:

- the tensor table, one row per tensor: address, element count, element width in bytes, and the six stat masks
  of :func:`callbacks.hashing.spec.stat_masks`;
- the chunk table, one row per chunk of ``chunk`` elements: (tensor row, first element).

One program hashes one chunk: it casts the address loaded from the table to a pointer of 4-byte units (1-, 2-
and 4-byte dtypes: the spec's units, holding 4, 2 or 1 elements) or of 8-byte words (8- and 16-byte dtypes)
(64-bit offsets; ``tl.multiple_of`` when every address is 16-byte aligned), streams the chunk ``ROWS`` rows of
16 bytes at a time (one 16-byte vector load per row and thread; full iterations unmasked, the tail masked and,
in a tensor's last unit, the bytes past its end zeroed as the spec pads them), sums the unit contributions of
each row inside its thread with wrapping uint64 adds and counts the flags of every element in its lane of the
unit, then adds the three per-chunk partials into the tensor's row of the output with integer atomics. Integer
addition is associative, so the result does not depend on chunking, ROWS or the order of the atomics: the
kernel equals the torch reference bit for bit. A 1- or 2-byte tensor that starts inside a unit (a slice at an
odd offset) is hashed from an aligned copy.

Cost (static, from the SASS that ``triton.compile`` emits for sm_90 on a machine without a GPU; not measured;
``benchmarks/hash_kernel_sass.py`` prints it): with the defaults every width compiles to 16-byte ``LDG.E.128``
loads, and the main loop issues about 6.6 integer instructions per byte and thread for bf16 (5.1 for float32,
10.6 for 1-byte dtypes). At an H100's issue rate that bounds bf16 at 3.5-4.5 TB/s, above HBM3's 3.35 TB/s: the
kernel should be memory-bound there; measure with ``benchmarks/hashes.py`` on a GPU.

Finalisation (``mix(sum XOR header)``) is a handful of vectorised torch operations over the per-tensor sums with
cached headers; one device-to-host copy returns all.

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

#: elements per chunk (one program); a multiple of 16 * ROWS (the items of one iteration at 1 byte per item)
DEFAULT_CHUNK = 1 << 15
#: rows of 16 bytes per iteration of a program's loop (one row per thread per load, 16-byte vector loads)
DEFAULT_ROWS = 512
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
def _flags(w, m0, v0, m1, v1, nzm, zv, HAS_M1: tl.constexpr):
    """Per-word NaN/Inf and non-zero flags (spec.stat_masks), in the masks' integer type.

    Units of 4 bytes are classified in 32-bit arithmetic (half the instructions of 64-bit compares), 8-byte
    words in 64-bit.
    """
    nonfinite = (w & m0) == v0
    if HAS_M1:
        nonfinite = nonfinite | ((w & m1) == v1)
    nonzero = (w & nzm) != zv
    return nonfinite, nonzero


@triton.jit
def _rows(base, off, rows, cols, rowkey, colkey, limit, acc, nf, nz, m0, v0, m1, v1, nzm, zv,
          PAIRED: tl.constexpr, MASKED: tl.constexpr):
    """Hash the 8-byte words ``off + [ROWS, 2]`` (16 bytes per row, held by one thread) of an 8- or 16-byte dtype.

    Word ``i`` holds units ``2i`` and ``2i + 1``; its key is ``i * KEY`` (``rowkey[:, None] + colkey[None, :]``,
    wrapping), doubled for the units. ``PAIRED``: 16-byte elements, one per row. Summing each row inside its
    thread keeps one accumulator per 16 bytes instead of one per element (registers, hence occupancy, hence
    bytes in flight).
    """
    items = off + rows[:, None] * 2 + cols[None, :]  # int64 word indices
    key = rowkey[:, None] + colkey[None, :]
    if MASKED:
        mask = items < limit
        w = tl.load(base + items, mask=mask, other=0)
    else:
        w = tl.load(base + items)
    w = w.to(tl.uint64, bitcast=True)
    k2 = key << 1  # units 2i and 2i + 1
    contrib = _mix((w & 0xFFFFFFFF) ^ k2) + _mix((w >> 32) ^ (k2 + 0x9E3779B97F4A7C15))
    nonfinite, nonzero = _flags(w, m0, v0, m1, v1, nzm, zv, HAS_M1=True)
    if MASKED:
        contrib = tl.where(mask, contrib, 0)
        nonfinite = nonfinite & mask
        nonzero = nonzero & mask
    if PAIRED:  # one element per row: flagged when either word is
        f = tl.max(nonfinite.to(tl.int32), axis=1)
        z = tl.max(nonzero.to(tl.int32), axis=1)
    else:
        f = tl.sum(nonfinite.to(tl.int32), axis=1)
        z = tl.sum(nonzero.to(tl.int32), axis=1)
    return acc + tl.sum(contrib, axis=1), nf + f, nz + z


@triton.jit
def _unit_rows(base, off, rows, cols, rowkey, colkey, stop, acc, nf, nz, m0, v0, m1, v1, nzm, zv,
               SUB: tl.constexpr, MASKED: tl.constexpr):
    """Hash the 4-byte units ``off + [ROWS, 4]`` (16 bytes per row, held by one thread) of a 1-, 2- or 4-byte
    dtype: each unit holds ``SUB`` elements, classified in 32-bit arithmetic in their lanes of the unit.

    ``stop``: the element where the tensor ends (masked path only: only a tensor's last unit can be partial, and
    its bytes past the end are zeroed, the spec's padding).
    """
    items = off + rows[:, None] * 4 + cols[None, :]  # int64 unit indices
    key = rowkey[:, None] + colkey[None, :]
    first = items * SUB  # the unit's first element
    if MASKED:
        mask = first < stop
        w = tl.load(base + items, mask=mask, other=0)
        if SUB > 1:
            present = tl.maximum(tl.minimum(stop - first, SUB), 0)  # elements of the unit inside the tensor
            keep = tl.where(present >= SUB, 0xFFFFFFFF, (1 << (present * (32 // SUB))) - 1)
            w = w & keep.to(tl.uint32)
    else:
        w = tl.load(base + items)
    w = w.to(tl.uint32)  # the loaded pointer type is unsigned: zero extension below
    contrib = _mix(w.to(tl.uint64) ^ key)
    m0, v0, nzm, zv = m0.to(tl.uint32), v0.to(tl.uint32), nzm.to(tl.uint32), zv.to(tl.uint32)
    if SUB == 1:
        nonfinite, nonzero = _flags(w, m0, v0, m1.to(tl.uint32), v1.to(tl.uint32), nzm, zv, HAS_M1=True)
        if MASKED:
            nonfinite = nonfinite & mask
            nonzero = nonzero & mask
        f = nonfinite.to(tl.int32)
        z = nonzero.to(tl.int32)
    else:  # 1- and 2-byte dtypes never use the second mask pair
        f = tl.zeros(items.shape, dtype=tl.int32)
        z = tl.zeros(items.shape, dtype=tl.int32)
        for k in tl.static_range(SUB):
            shift = k * (32 // SUB)
            nonfinite = (w & (m0 << shift)) == (v0 << shift)
            nonzero = (w & (nzm << shift)) != (zv << shift)
            if MASKED:
                inside = first + k < stop
                nonfinite = nonfinite & inside
                nonzero = nonzero & inside
            f += nonfinite.to(tl.int32)
            z += nonzero.to(tl.int32)
    if MASKED:
        contrib = tl.where(mask, contrib, 0)
    return acc + tl.sum(contrib, axis=1), nf + tl.sum(f, axis=1), nz + tl.sum(z, axis=1)


@triton.jit
def _block(base, off, rows, cols, rowkey, colkey, stop, hi, acc, nf, nz, m0, v0, m1, v1, nzm, zv,
           WIDTH: tl.constexpr, MASKED: tl.constexpr):
    """One iteration of :func:`_span`: 4-byte units (``stop``: the element where the tensor ends) or 8-byte words
    (``hi``: the word where it ends)."""
    if WIDTH <= 4:
        acc, nf, nz = _unit_rows(base, off, rows, cols, rowkey, colkey, stop, acc, nf, nz, m0, v0, m1, v1, nzm, zv,
                                 SUB=4 // WIDTH, MASKED=MASKED)
    else:
        acc, nf, nz = _rows(base, off, rows, cols, rowkey, colkey, hi, acc, nf, nz, m0, v0, m1, v1, nzm, zv,
                            PAIRED=WIDTH == 16, MASKED=MASKED)
    return acc, nf, nz


@triton.jit
def _span(addr, start, stop, m0, v0, m1, v1, nzm, zv,
          WIDTH: tl.constexpr, ROWS: tl.constexpr, ALIGNED: tl.constexpr):
    """Hash elements [start, stop) of one tensor of WIDTH-byte elements, ROWS rows of 16 bytes per iteration.

    ``start`` is a multiple of the chunk (whole units). Returns the chunk's (unit sum, NaN/Inf count, non-zero
    count) as scalars.
    """
    if WIDTH <= 4:  # 4-byte units holding 4 // WIDTH elements
        base = addr.to(tl.pointer_type(tl.uint32))
        VEC: tl.constexpr = 4
        SUB: tl.constexpr = 4 // WIDTH
        lo = start // SUB
        hi = (stop + SUB - 1) // SUB  # the last unit may be partial: only in the masked tail
        whole = stop // SUB
    else:  # 8 and 16 bytes: 8-byte words
        base = addr.to(tl.pointer_type(tl.int64))
        VEC: tl.constexpr = 2
        SUB: tl.constexpr = 1
        lo = start * (WIDTH // 8)
        hi = stop * (WIDTH // 8)
        whole = hi
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    rows = tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, VEC).to(tl.int64)
    colkey = cols.to(tl.uint64) * 0x9E3779B97F4A7C15
    acc = tl.zeros([ROWS], dtype=tl.uint64)
    nf = tl.zeros([ROWS], dtype=tl.int32)
    nz = tl.zeros([ROWS], dtype=tl.int32)
    full_stop = lo + ((whole - lo) // (ROWS * VEC)) * (ROWS * VEC)
    # the key of item i is i * KEY (wrapping): per row (lo + row * VEC) * KEY, + ROWS * VEC * KEY per iteration
    rowkey = (lo + rows * VEC).to(tl.uint64) * 0x9E3779B97F4A7C15
    step = tl.full([], ROWS * VEC, tl.uint64) * 0x9E3779B97F4A7C15
    for off in range(lo, full_stop, ROWS * VEC):
        acc, nf, nz = _block(base, off, rows, cols, rowkey, colkey, stop, hi, acc, nf, nz, m0, v0, m1, v1, nzm, zv,
                             WIDTH=WIDTH, MASKED=False)
        rowkey += step
    if full_stop < hi:
        acc, nf, nz = _block(base, full_stop, rows, cols, rowkey, colkey, stop, hi, acc, nf, nz, m0, v0, m1, v1,
                             nzm, zv, WIDTH=WIDTH, MASKED=True)
    return tl.sum(acc, axis=0), tl.sum(nf, axis=0), tl.sum(nz, axis=0)  # uint64 addition wraps


@triton.jit
def _hash_kernel(table_ptr, chunk_ptr, out_ptr,
                 CHUNK: tl.constexpr, ROWS: tl.constexpr, WIDTHS: tl.constexpr, ALIGNED: tl.constexpr):
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
    start = tl.multiple_of(start, 16)  # chunks start at multiples of CHUNK, a multiple of 16 * ROWS
    stop = tl.minimum(start + CHUNK, numel)

    total = tl.full([], 0, tl.uint64)
    nonfinite = tl.full([], 0, tl.int32)
    nonzero = tl.full([], 0, tl.int32)
    # WIDTHS (constexpr) lists the widths present: a bf16-only model compiles one branch
    for bit in tl.static_range(5):
        if (WIDTHS & (1 << bit)) != 0:
            if width == (1 << bit):
                total, nonfinite, nonzero = _span(addr, start, stop, m0, v0, m1, v1, nzm, zv,
                                                  WIDTH=1 << bit, ROWS=ROWS, ALIGNED=ALIGNED)
    out = out_ptr + row * 3
    tl.atomic_add(out, total.to(tl.int64, bitcast=True))
    tl.atomic_add(out + 1, nonfinite.to(tl.int64))
    tl.atomic_add(out + 2, nonzero.to(tl.int64))


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
        masks = stat_masks(t.dtype)
        if width <= 2 and masks[2] != 0:  # the kernel's 1- and 2-byte paths never read the second mask pair
            raise ValueError(f"the fused hash assumes one NaN/Inf mask for {t.dtype}")
        addr = t.data_ptr()
        aligned = aligned and (addr % 16 == 0 or t.numel() == 0)
        rows.append([addr, t.numel(), width, *(to_signed(m) for m in masks)])
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
    rows: int = DEFAULT_ROWS,
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
    if rows & (rows - 1) or chunk % (16 * rows) or chunk > 1 << 30:  # per-chunk counts are int32
        raise ValueError("rows must be a power of two and chunk a multiple of 16 * rows")
    # the hash is defined on contiguous bytes, read in 4-byte units: a 1- or 2-byte tensor that starts inside a
    # unit (a slice at an odd offset) is copied to aligned memory; keep the copies alive until the kernel has run
    tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    tensors = [t.clone() if t.data_ptr() % 4 and t.numel() else t for t in tensors]
    plan = _plan_for(tensors, chunk)
    out = torch.zeros((len(tensors), 3), dtype=torch.int64, device=device)
    if plan.n_chunks:
        _hash_kernel[(plan.n_chunks,)](
            plan.table, plan.chunks, out,
            CHUNK=chunk, ROWS=rows, WIDTHS=plan.widths, ALIGNED=plan.aligned,
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


__all__ = ["DEFAULT_ROWS", "DEFAULT_CHUNK", "INTERPRET", "clear_cache", "fused_hash_table", "fused_hash_with_stats"]
