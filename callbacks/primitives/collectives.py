"""Bounded exchanges of 64-bit hashes between data-parallel ranks (torch.distributed, any backend).

Every rank sends 8 bytes per tensor over a dedicated gloo group created with a timeout, so a rank that dies or
stalls makes the others' exchange fail after ``timeout_s`` instead of hanging training forever. Each exchange is
two all-gathers of fixed-size CPU tensors: a 3-word header (status, tensor count, layout key) and then the
hashes, sent only when every rank's header agrees. A rank whose own hashing failed still takes part (status 0),
so every rank reaches the same collectives at the same steps whatever happens locally.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from callbacks.hashing.spec import to_signed, to_unsigned


class ReplicaExchangeError(RuntimeError):
    """An exchange failed (timeout, a peer gone); the group is unusable afterwards."""


def layout_key(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> int:
    """A 64-bit key of a tensor layout (names and shapes), equal on every rank for equal layouts.

    Python's ``hash()`` is salted per process, so a stable digest is used instead.
    """
    digest = hashlib.blake2b(digest_size=8)
    for name, shape in zip(names, shapes, strict=True):
        digest.update(f"{name}:{tuple(shape)}\n".encode())
    return int.from_bytes(digest.digest(), "little")


@dataclasses.dataclass(frozen=True)
class Exchange:
    """What an all-gather of hashes returned.

    ``status`` is ``ok`` (``by_rank[r]`` holds rank r's hashes), ``failed`` (``failed_ranks`` could not hash
    locally) or ``layout`` (ranks hashed different tensor layouts; ``counts`` gives each rank's tensor count).
    """

    status: str
    by_rank: list[list[int]]
    failed_ranks: list[int]
    counts: list[int]


def distributed_world() -> tuple[int, int]:
    """(rank, world size) under an initialised torch.distributed, (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ReplicaGroup:
    """A gloo group over all ranks with a bounded timeout, for exchanging hashes.

    Creating it is itself a collective: every rank must construct it at the same point (the ``init`` event).
    After a failed exchange the group is marked broken and every later call raises at once on every rank that
    saw the failure (a peer that never arrived cannot be waited for again).
    """

    def __init__(self, timeout_s: float):
        import torch.distributed as dist

        self.rank, self.world_size = distributed_world()
        self.timeout_s = float(timeout_s)
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))
        self.broken: str | None = None

    def _guard(self) -> None:
        if self.broken is not None:
            raise ReplicaExchangeError(f"replica exchange disabled after an earlier failure: {self.broken}")

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        import torch.distributed as dist

        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        try:
            dist.all_gather(out, tensor, group=self.group)
        except Exception as err:  # gloo raises RuntimeError/DistBackendError on timeout or a lost peer
            self.broken = f"{type(err).__name__}: {err}"
            raise ReplicaExchangeError(
                f"all-gather of hashes failed on rank {self.rank} within {self.timeout_s:g}s (a rank stalled, "
                f"crashed or skipped the exchange): {err}") from err
        return out

    def all_gather_hashes(self, hashes: Sequence[int], key: int, ok: bool = True) -> Exchange:
        """Every rank's hashes for one layout; ``ok=False`` says this rank could not hash (it still takes part)."""
        self._guard()
        header = torch.tensor([int(ok), len(hashes) if ok else -1, to_signed(key)], dtype=torch.int64)
        headers = [h.tolist() for h in self._all_gather(header)]
        failed = [r for r, h in enumerate(headers) if not h[0]]
        counts = [h[1] for h in headers]
        if failed:
            return Exchange("failed", [], failed, counts)
        if len({(h[1], h[2]) for h in headers}) > 1:
            return Exchange("layout", [], [], counts)
        payload = torch.tensor([to_signed(h) for h in hashes], dtype=torch.int64)
        gathered = self._all_gather(payload)
        return Exchange("ok", [[to_unsigned(v) for v in t.tolist()] for t in gathered], [], counts)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's small picklable ``obj`` (used for tied copies held on different ranks)."""
        import torch.distributed as dist

        self._guard()
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except Exception as err:
            self.broken = f"{type(err).__name__}: {err}"
            raise ReplicaExchangeError(f"all-gather of tied-copy hashes failed on rank {self.rank}: {err}") from err
        return out


def disagreeing_ranks(values: Sequence[int]) -> tuple[int, list[int]]:
    """(reference value, ranks that differ from it) for one tensor's per-rank hashes.

    The reference is the value most ranks hold; on a tie, the lowest rank's value (with two ranks nobody can
    say which is right, so the message names both).
    """
    counts: dict[int, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    best = max(counts.values())
    reference = next(v for v in values if counts[v] == best)
    return reference, [r for r, v in enumerate(values) if v != reference]


def replica_mismatches(names: Sequence[str], by_rank: Sequence[Sequence[int]]) -> dict[str, dict[int, int]]:
    """Tensors whose hashes are not equal on every rank: name -> {rank: hash}."""
    out = {}
    for i, name in enumerate(names):
        values = [row[i] for row in by_rank]
        if len(set(values)) > 1:
            out[name] = dict(enumerate(values))
    return out
