"""A bitwise change digest: for comparing a tensor with itself at two moments in one process.

Cheaper than the cross-device hash of :mod:`callbacks.hashing.spec` (three elementwise int64 operations per 32-bit
word against ten), and weaker: use it only where both snapshots are taken by the same process on the same device
(the merge check's "did anything outside the targets change"), never for ledgers or replicas.
"""

from __future__ import annotations

import functools

import torch

from callbacks.hashing import hash_tensors
from callbacks.hashing.spec import KEY_MULT, finalize, to_signed, to_unsigned

#: words per chunk of the change digest (the int64 products of a chunk stay in cache)
DIGEST_CHUNK = 1 << 16

@functools.lru_cache(maxsize=8)
def _digest_keys(device: torch.device) -> torch.Tensor:
    """Odd 64-bit keys (as int64), one per word of a digest chunk, from a fixed private stream (not the global RNG)."""
    gen = torch.Generator().manual_seed(0x5EED)
    halves = torch.randint(0, 2**32, (2, DIGEST_CHUNK), dtype=torch.int64, generator=gen)
    return ((halves[0] << 32) ^ halves[1] | 1).to(device)


def change_digest(tensor: torch.Tensor) -> int:
    """A bitwise change detector of one tensor, for comparing it with itself within one process.

    Not the cross-device spec (:mod:`callbacks.hashing`): the tensor's bytes as unsigned 32-bit words ``w`` give
    ``sum_c K_c * sum_i w_ci * k_i mod 2**64``, mixed with the dtype and shape, where every word key ``k_i`` and
    chunk key ``K_c`` is odd and 64 bits wide. A change of one word always changes the digest (an odd key is
    invertible mod 2**64); a change of several words is missed only if their keyed differences cancel mod 2**64,
    a chance of about 2**-32 in the worst case (differences that are multiples of 2**31: sign flips) and far less
    otherwise. Three elementwise int64 operations per word against the spec's ten. Tensors whose bytes are not
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
