"""Bounded exchanges of 64-bit hashes between data-parallel ranks (torch.distributed, any backend).

Every rank sends 8 bytes per tensor over a dedicated gloo group created with a timeout, so a rank that dies or
stalls makes the others' exchange fail after ``timeout_s`` instead of hanging training forever. Each exchange is
two all-gathers of fixed-size CPU tensors: a 3-word header (status, tensor count, layout key) and then the
hashes, sent only when every rank's header agrees. A rank whose own hashing failed still takes part (status 0),
so every rank reaches the same collectives at the same steps whatever happens locally.

Under FSDP2 (DTensor parameters) only ranks that hold the same shard are compared: the ranks along the mesh
dimensions where a tensor is ``Replicate`` (the replicate dimension of HSDP). :func:`comparison_partition` gives
that partition of ranks for a tensor (all ranks in one group for a plain, DDP-replicated tensor), and
:func:`build_replica_groups` creates one bounded gloo subgroup per group of the partition, once.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
from collections.abc import Iterable, Sequence
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


#: A partition of the ranks into groups that must hold equal values (each group a sorted tuple of global ranks).
Partition = tuple[tuple[int, ...], ...]


def world_partition(world_size: int) -> Partition:
    """The partition of a data-parallel replicated tensor: every rank holds the same value (DDP)."""
    return (tuple(range(world_size)),)


def comparison_partition(tensor: Any, world_size: int) -> Partition:
    """The groups of ranks that hold the same copy of ``tensor``, so that their hashes must agree.

    A DTensor (FSDP2, HSDP) is equal across the ranks along the mesh dimensions where its placement is
    ``Replicate`` and differs along ``Shard`` dimensions (different shards) and ``Partial`` ones (unreduced
    sums). With no replicate dimension (pure FSDP) every group holds one rank: nothing is compared. A plain
    tensor is a DDP replica: one group of all ranks.
    """
    mesh = getattr(tensor, "device_mesh", None)
    placements = getattr(tensor, "placements", None)
    if mesh is None or placements is None:
        return world_partition(world_size)
    ranks = mesh.mesh  # global ranks laid out in the mesh's shape, the same on every rank
    replicate = [d for d, p in enumerate(placements) if p.is_replicate()]
    other = [d for d in range(ranks.ndim) if d not in replicate]
    size = math.prod(ranks.shape[d] for d in replicate)
    rows = ranks.permute(*other, *replicate).reshape(-1, size).tolist()
    return tuple(sorted(tuple(sorted(int(r) for r in row)) for row in rows))


class ReplicaGroup:
    """A gloo group with a bounded timeout, for exchanging hashes: all ranks, or the ``ranks`` of a subgroup.

    Creating it is itself a collective: every rank must construct it at the same point (the ``init`` event);
    subgroups come from :func:`build_replica_groups`, which every rank calls alike. ``rank``/``world_size`` are
    this rank's position and the size within the group; ``ranks`` maps a group position to its global rank.
    After a failed exchange the group is marked broken and every later call raises at once on every rank that
    saw the failure (a peer that never arrived cannot be waited for again).
    """

    def __init__(self, timeout_s: float, ranks: Sequence[int] | None = None, group: Any = None):
        import torch.distributed as dist

        global_rank, world_size = distributed_world()
        self.ranks = list(range(world_size)) if ranks is None else sorted(ranks)
        self.rank, self.world_size = self.ranks.index(global_rank), len(self.ranks)
        self.timeout_s = float(timeout_s)
        self.group = group if group is not None else dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))
        self.broken: str | None = None

    @property
    def global_rank(self) -> int:
        """This rank's global rank (``rank`` is its position within the group)."""
        return self.ranks[self.rank]

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
                f"all-gather of hashes failed on rank {self.global_rank} within {self.timeout_s:g}s (a rank stalled, "
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
            raise ReplicaExchangeError(
                f"all-gather of tied-copy hashes failed on rank {self.global_rank}: {err}") from err
        return out


def build_replica_groups(partitions: Iterable[Partition], world: ReplicaGroup,
                         timeout_s: float) -> dict[Partition, ReplicaGroup]:
    """partition -> this rank's bounded gloo group in it, for the partitions where it shares a group.

    A collective: every rank must pass the same ``partitions`` (gather them first) because ``new_group`` is
    called by every rank for every subgroup, members or not, in one order. Groups of one rank (pure FSDP
    shards) get none: nothing to compare. A group of all ranks reuses ``world``.
    """
    import torch.distributed as dist

    me = world.global_rank
    everyone = tuple(world.ranks)
    out: dict[Partition, ReplicaGroup] = {}
    for partition in sorted(set(partitions)):
        for ranks in partition:
            if len(ranks) < 2:
                continue
            if tuple(ranks) == everyone:
                group = world
            else:
                raw = dist.new_group(ranks=list(ranks), backend="gloo",
                                     timeout=datetime.timedelta(seconds=timeout_s))
                group = ReplicaGroup(timeout_s, ranks, group=raw) if me in ranks else None
            if group is not None and me in ranks:
                out[partition] = group
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


def replica_mismatches(names: Sequence[str], by_rank: Sequence[Sequence[int]],
                       ranks: Sequence[int] | None = None) -> dict[str, dict[int, int]]:
    """Tensors whose hashes are not equal on every rank: name -> {global rank: hash}.

    ``by_rank[i]`` is the row of the group's i-th member, whose global rank is ``ranks[i]`` (``i`` when None).
    """
    ranks = list(range(len(by_rank))) if ranks is None else list(ranks)
    out = {}
    for i, name in enumerate(names):
        values = [row[i] for row in by_rank]
        if len(set(values)) > 1:
            out[name] = dict(zip(ranks, values, strict=True))
    return out
