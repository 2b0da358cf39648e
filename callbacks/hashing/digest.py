"""Bitwise change digests: for comparing a tensor with itself at two moments in one process.

Cheaper than the cross-device hash of :mod:`callbacks.hashing.spec`, and not a specification: use a digest only
where both measurements are taken by the same process (the merge check's "did anything change"), never for
ledgers or replicas. :func:`change_digests` measures a batch, by device:

- CPU tensors: :func:`host_digest` each;
- CUDA tensors where the fused Triton kernel runs: the spec hash of the whole group in one launch;
- other devices: :func:`keyed_digest` for tensors of at least :data:`KEYED_MIN_BYTES`, the batched spec hash for
  the smaller ones (a few elementwise launches per tensor cost more than one batched pass over many small ones).

A tensor's kind of digest depends only on its device, size and the backend, so two measurements of an unchanged
tensor agree. :func:`change_digest` measures one tensor, by device:

- CPU tensors: :func:`host_digest`, XXH3-64 (the ``xxhash`` library) over the tensor's bytes, seeded with the
  spec header of its dtype and shape. It runs at memory speed (about 30 GB/s on one core here, against 2 GB/s
  for the torch reference of the spec hash and 4-7 GB/s for :func:`keyed_digest`) and costs a few
  microseconds per call, so even small tensors are cheaper to digest one by one than to spec-hash in a batch.
- other devices: :func:`keyed_digest`, three elementwise int64 torch operations per 32-bit word (the spec
  needs ten), with no copy of the tensor to the host.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import xxhash

from callbacks.hashing import hash_tensors, resolve_backend
from callbacks.hashing.spec import KEY_MULT, finalize, header, to_signed, to_unsigned

#: words per chunk of the keyed digest (the int64 products of a chunk stay in cache)
DIGEST_CHUNK = 1 << 16
#: off the CPU and without the fused kernel, tensors smaller than this (bytes) get the batched spec hash
KEYED_MIN_BYTES = 1 << 18


def change_digests(tensors: Sequence[torch.Tensor], backend: str = "auto") -> list[int]:
    """64-bit bitwise change detectors of ``tensors`` for comparisons within this process (see the module).

    ``backend``: as for :func:`~callbacks.hashing.hash_tensors` (``auto`` uses the fused kernel on CUDA when
    Triton is there). Meta tensors have no bytes: their digest is -1.
    """
    out = [-1] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        if tensor.device.type != "meta":
            by_device.setdefault(tensor.device, []).append(index)
    for device, indices in by_device.items():
        group = [tensors[i].detach() for i in indices]
        if device.type == "cpu":
            values = [host_digest(t) for t in group]
        elif resolve_backend(backend, group) == "triton":
            values = hash_tensors(group, backend="triton")
        else:
            values = device_digests(group)
        for index, value in zip(indices, values, strict=True):
            out[index] = value
    return out


def device_digests(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Change digests of tensors on one device, with torch operations only (the path for accelerators without
    the fused kernel): :func:`keyed_digest` from :data:`KEYED_MIN_BYTES` up, the batched spec hash below."""
    small = [i for i, t in enumerate(tensors) if t.numel() * t.element_size() < KEYED_MIN_BYTES]
    values = [0] * len(tensors)
    if small:
        for i, value in zip(small, hash_tensors([tensors[i] for i in small], backend="torch"), strict=True):
            values[i] = value
    for i in sorted(set(range(len(tensors))) - set(small)):
        values[i] = keyed_digest(tensors[i])
    return values


def change_digest(tensor: torch.Tensor) -> int:
    """A 64-bit bitwise change detector of ``tensor`` for comparisons within this process (see the module)."""
    if tensor.device.type == "cpu":
        return host_digest(tensor)
    return keyed_digest(tensor)


def host_digest(tensor: torch.Tensor) -> int:
    """XXH3-64 of a CPU tensor's contiguous bytes, seeded with the spec header of its dtype and shape.

    Any change of bytes, dtype or shape changes the digest except with the chance of a 64-bit collision of a
    well-tested non-cryptographic hash (XXH3 passes SMHasher); reading the bytes never copies a contiguous tensor.
    """
    flat = tensor.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
    return xxhash.xxh3_64_intdigest(flat.numpy(), seed=header(tensor.dtype, tuple(tensor.shape)))


@functools.lru_cache(maxsize=8)
def _digest_keys(device: torch.device) -> torch.Tensor:
    """Odd 64-bit keys (as int64), one per word of a digest chunk, from a fixed private stream (not the global RNG)."""
    gen = torch.Generator().manual_seed(0x5EED)
    halves = torch.randint(0, 2**32, (2, DIGEST_CHUNK), dtype=torch.int64, generator=gen)
    return ((halves[0] << 32) ^ halves[1] | 1).to(device)


def keyed_digest(tensor: torch.Tensor) -> int:
    """A bitwise change detector of one tensor computed with torch operations on its own device.

    The tensor's bytes as unsigned 32-bit words ``w`` give ``sum_c K_c * sum_i w_ci * k_i mod 2**64``, mixed
    with the dtype and shape, where every word key ``k_i`` and chunk key ``K_c`` is odd and 64 bits wide. A
    change of one word always changes the digest (an odd key is invertible mod 2**64); a change of several words
    is missed only if their keyed differences cancel mod 2**64, a chance of about 2**-32 in the worst case
    (differences that are multiples of 2**31: sign flips) and far less otherwise. Tensors whose bytes are not
    whole aligned 32-bit words get the spec hash.
    """
    flat = tensor.detach().contiguous().reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes == 0 or nbytes % 4 or flat.data_ptr() % 4 or flat.device.type == "meta":
        return hash_tensors([flat.reshape(tensor.shape)])[0]
    words = flat.view(torch.uint8).view(torch.uint32)
    keys = _digest_keys(words.device)
    products = torch.empty(min(DIGEST_CHUNK, words.numel()), dtype=torch.int64, device=words.device)
    chunk_sums = []
    for start in range(0, words.numel(), DIGEST_CHUNK):
        chunk = words[start:start + DIGEST_CHUNK]
        z = products[:chunk.numel()]
        z.copy_(chunk)  # zero-extended
        chunk_sums.append(z.mul_(keys[:z.numel()]).sum())  # int64 products and sums wrap: exact mod 2**64
    if len(chunk_sums) == 1:  # the first chunk's key K_0 is 1
        total = int(chunk_sums[0].item())
    else:
        sums = torch.stack(chunk_sums)
        chunk_keys = torch.arange(sums.numel(), dtype=torch.int64, device=sums.device) * to_signed(KEY_MULT) | 1
        total = int((sums * chunk_keys).sum().item())
    return finalize(to_unsigned(total), tensor.dtype, tuple(tensor.shape))


__all__ = [
    "DIGEST_CHUNK", "KEYED_MIN_BYTES", "change_digest", "change_digests", "device_digests", "host_digest",
    "keyed_digest",
]
