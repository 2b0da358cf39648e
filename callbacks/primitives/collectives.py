"""Comparing 64-bit tensor hashes across the ranks that must hold equal copies (torch.distributed, any backend).

:class:`ReplicaComparator` is the entry point: built once from the process group, the partitions of ranks that
hold equal copies (derived from a tensor's device mesh, or given by the caller) and a timeout, it all-gathers
hashes within each group of ranks and says which tensors differ on which ranks. Callers decide what to hash and
when, and what to make of a mismatch.

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
    locally), ``layout`` (ranks hashed different tensor layouts; ``counts`` gives each rank's tensor count) or
    ``sequence`` (the ranks were at different exchanges: ``tags`` gives each rank's :class:`ExchangeTag`).
    """

    status: str
    by_rank: list[list[int]]
    failed_ranks: list[int]
    counts: list[int]
    tags: list[ExchangeTag] = dataclasses.field(default_factory=list)


#: digest of an exchange kind -> the kind, for every kind this process has sent (to name a peer's tag)
_TAG_KINDS: dict[int, str] = {}


@dataclasses.dataclass(frozen=True)
class ExchangeTag:
    """Which exchange this is: the step and what is exchanged (``grad``, ``param``...). Every rank of a group
    sends its tag with its hashes; ranks whose tags differ are out of step, and their hashes are never compared
    (a rank that skipped one exchange would otherwise pair one step's gradients with the next step's)."""

    step: int | None = None
    what: str = ""

    def codes(self) -> tuple[int, int]:
        """The tag as two int64 header words (the step, -1 for none; a stable digest of ``what``)."""
        digest = hashlib.blake2b(self.what.encode(), digest_size=8).digest()
        code = to_signed(int.from_bytes(digest, "little"))
        _TAG_KINDS.setdefault(code, self.what)
        return (-1 if self.step is None else int(self.step)), code

    @staticmethod
    def from_codes(step: int, code: int) -> ExchangeTag:
        """A peer's tag from its header words; its kind is named where this process has sent that kind too."""
        return ExchangeTag(None if step == -1 else step, _TAG_KINDS.get(code, "another exchange"))

    def __str__(self) -> str:
        return f"{self.what or 'exchange'} of step {self.step}"


def distributed_rank() -> int:
    """This process's rank: torch.distributed's when initialised, else the launcher's ``RANK`` (torchrun sets it
    before the process group exists), else 0. The one answer to "which rank am I" in the package."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


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

    def all_gather_hashes(self, hashes: Sequence[int], key: int, ok: bool = True,
                          tag: ExchangeTag | None = None) -> Exchange:
        """Every rank's hashes for one layout; ``ok=False`` says this rank could not hash (it still takes part).

        ``tag``: which exchange this is; when the ranks' tags differ nothing is compared (status ``sequence``).
        """
        self._guard()
        tag = tag or ExchangeTag()
        header = torch.tensor([int(ok), len(hashes) if ok else -1, to_signed(key), *tag.codes()], dtype=torch.int64)
        headers = [h.tolist() for h in self._all_gather(header)]
        failed = [r for r, h in enumerate(headers) if not h[0]]
        counts = [h[1] for h in headers]
        if len({tuple(h[3:]) for h in headers}) > 1:
            tags = [ExchangeTag.from_codes(h[3], h[4]) for h in headers]
            return Exchange("sequence", [], failed, counts, tags)
        if failed:
            return Exchange("failed", [], failed, counts)
        if len({(h[1], h[2]) for h in headers}) > 1:
            return Exchange("layout", [], [], counts)
        payload = torch.tensor([to_signed(h) for h in hashes], dtype=torch.int64)
        gathered = self._all_gather(payload)
        return Exchange("ok", [[to_unsigned(v) for v in t.tolist()] for t in gathered], [], counts)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's small picklable ``obj`` (tied copies held on different ranks, the ranks' findings)."""
        import torch.distributed as dist

        self._guard()
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except Exception as err:
            self.broken = f"{type(err).__name__}: {err}"
            raise ReplicaExchangeError(
                f"all-gather of small objects failed on rank {self.global_rank}: {err}") from err
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


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One group's verdict in :meth:`ReplicaComparator.compare`: the tensors of one partition, compared among
    this rank's group in it.

    ``ranks`` are the group's global ranks; ``names`` the partition's tensors in the caller's order;
    ``exchange`` what the all-gather returned; ``mismatches`` name -> {global rank: hash} for the tensors whose
    hashes differ (empty unless ``status`` is ``ok``).
    """

    partition: Partition
    ranks: list[int]
    names: list[str]
    exchange: Exchange
    mismatches: dict[str, dict[int, int]]

    @property
    def status(self) -> str:
        """``ok``; ``failed`` (some rank could not hash: it reports that itself); ``layout`` (the ranks hashed
        different layouts, so they are not replicas: this partition is compared no more); ``sequence`` (the ranks
        were at different exchanges: nothing is compared from here)."""
        return self.exchange.status


class ReplicaComparator:
    """Compares hashes of tensors across the ranks that must hold equal copies of them.

    The constructor reads this process's rank and world size and runs no collective. :meth:`plan` is a
    collective that every rank calls at the same point (the ``init`` event): it creates the bounded gloo group of
    all ranks and one subgroup per group of ranks holding equal copies. :meth:`connect` alone creates only the
    group of all ranks (for :meth:`all_gather_object`). Then :meth:`compare` exchanges hashes within each group,
    partition after partition in one order on every rank, and returns which tensors differ.

    A tensor's partition comes from :meth:`partition` (DDP replicas, FSDP2/HSDP DTensors, from the device mesh
    and placements) or from the caller, whose ranks may be partitioned otherwise (ZeRO's partitions of a flat
    buffer). After an exchange fails (a timeout, a peer gone) its group is broken and this rank compares
    nothing more (:attr:`active` is False), so its peers' bounded waits end too instead of repeating.
    """

    def __init__(self, timeout_s: float = 60.0, *, sharded: bool = False):
        self.rank, self.world_size = distributed_world()
        #: bound on every exchange, in seconds
        self.timeout_s = float(timeout_s)
        #: whether the tensors compared are local shards (DTensors) rather than whole replicas (for messages)
        self.sharded = sharded
        #: the bounded group of all ranks; None in one process and until :meth:`connect`
        self.world: ReplicaGroup | None = None
        #: partition -> this rank's bounded group in it; partitions where this rank holds its copy alone are absent
        self.routes: dict[Partition, ReplicaGroup] = {}
        #: partitions compared no more (their ranks hashed different layouts), with why
        self.route_notes: dict[Partition, str] = {}
        #: why nothing is compared, or None
        self.note: str | None = None
        #: (id of a device mesh, placements) -> partition: computed once per mesh layout, not per tensor and call
        self._partition_by_layout: dict[tuple[int, tuple[Any, ...]], Partition] = {}

    @property
    def distributed(self) -> bool:
        """Whether there are other ranks to compare with (torch.distributed with world size > 1)."""
        return self.world_size > 1

    @property
    def connected(self) -> bool:
        """Whether the bounded group of all ranks exists (:meth:`connect` or :meth:`plan` ran)."""
        return self.world is not None

    @property
    def active(self) -> bool:
        """Whether :meth:`compare` exchanges anything: some group of ranks holds equal copies, none of them is
        marked off, and no group is broken (after a failed exchange this rank stops exchanging altogether)."""
        return (self.note is None and bool(self.routes)
                and all(g.broken is None for g in self.routes.values())
                and any(p not in self.route_notes for p in self.routes))

    @property
    def broken(self) -> ReplicaGroup | None:
        """The first group whose exchange failed (nothing is compared since), or None."""
        return next((g for g in self.routes.values() if g.broken), None)

    @property
    def groups(self) -> list[list[int]]:
        """The groups of ranks (global ranks) this rank compares with, sorted."""
        return [list(g) for g in sorted({tuple(g.ranks) for p, g in self.routes.items() if p not in self.route_notes})]

    def disable(self, why: str) -> None:
        """Compare nothing from here; ``why`` is what :meth:`describe` says."""
        self.note = why

    def connect(self) -> None:
        """Create the bounded group of all ranks, once; nothing in one process. A collective: every rank calls
        it at the same point."""
        if self.world is None and self.distributed:
            self.world = ReplicaGroup(self.timeout_s)

    def plan(self, partitions: Iterable[Partition]) -> list[Partition]:
        """Create the bounded groups of ranks whose copies must agree, from the ``partitions`` of the tensors this
        rank will compare and those of every other rank (gathered: a mesh may not span every rank), so that every
        rank creates the same subgroups in the same order. A collective: every rank calls it at the same point.

        Returns the union of every rank's partitions, sorted (empty in one process). When no two ranks hold the
        same copy of anything, nothing is compared and :attr:`note` says so.
        """
        if not self.distributed:
            return []
        self.connect()
        local = sorted(set(partitions))
        union = {partition for rank_partitions in self.world.all_gather_object(local) for partition in rank_partitions}
        self.routes = build_replica_groups(union, self.world, self.timeout_s)
        if not self.routes and self.note is None:
            self.note = "not compared: no two ranks hold the same copy of any tensor"
        return sorted(union)

    def partition(self, tensor: Any) -> Partition:
        """The groups of ranks that must hold equal copies of ``tensor`` (see :func:`comparison_partition`).

        Meant to be looked up per tensor at every comparison (not cached by name), so a model sharded after
        :meth:`plan` is not compared as if its shards were replicas: a partition without a planned group is simply
        not compared.
        """
        mesh = getattr(tensor, "device_mesh", None)
        key = (id(mesh), tuple(tensor.placements)) if mesh is not None else (0, ())  # (0, ()): a plain tensor
        partition = self._partition_by_layout.get(key)
        if partition is None:
            partition = self._partition_by_layout[key] = comparison_partition(tensor, self.world_size)
        return partition

    def compare(self, names: Sequence[str], hashes: Sequence[int | None] | None, shapes: Sequence[Sequence[int]],
                partitions: Sequence[Partition] | None = None, skip: Iterable[int] = (),
                tag: ExchangeTag | None = None) -> list[Comparison]:
        """All-gather ``hashes`` within each group of ranks holding equal copies; one :class:`Comparison` per
        partition compared, in one order on every rank ([] when not :attr:`active`).

        Tensor ``i`` is ``names[i]`` with hash ``hashes[i]``, local shape ``shapes[i]`` (names and shapes make
        the layout key every rank of a group must agree on) and partition ``partitions[i]`` (None: every tensor
        is a replica on every rank). A missing hash (None) and the indices in ``skip`` (tensors never comparable,
        such as unreduced partial sums) are sent as 0 by every rank: they keep the layout and never mismatch.
        ``hashes=None`` says this rank could not hash: it must still call this, so that no rank waits for it.
        ``tag`` says which exchange this is (step, what): a group whose ranks send different tags is out of step
        (a rank skipped an exchange); its comparison has status ``sequence`` and this rank compares nothing more.

        Every rank must call this at the same point whenever :attr:`active`. Raises
        :class:`ReplicaExchangeError` when an exchange fails; nothing is compared after that.
        """
        if not self.active:
            return []
        skip = set(skip)
        everyone = world_partition(self.world_size)
        by_partition: dict[Partition, list[int]] = {}
        for i in range(len(names)):
            by_partition.setdefault(partitions[i] if partitions is not None else everyone, []).append(i)
        out: list[Comparison] = []
        for partition in sorted(self.routes):  # every rank of a group walks the partitions in this order
            if partition in self.route_notes:
                continue
            group = self.routes[partition]
            indices = by_partition.get(partition, [])
            part_names = [names[i] for i in indices]
            key = layout_key(part_names, [shapes[i] for i in indices])
            payload = ([0 if i in skip or hashes[i] is None else hashes[i] for i in indices]
                       if hashes is not None else [])
            exchange = group.all_gather_hashes(payload, key, ok=hashes is not None, tag=tag)
            mismatches = (replica_mismatches(part_names, exchange.by_rank, group.ranks)
                          if exchange.status == "ok" else {})
            out.append(Comparison(partition, list(group.ranks), part_names, exchange, mismatches))
        for comparison in out:
            if comparison.status == "sequence":
                # every rank of the group saw the same tags: all of them stop here, and no later exchange can pair
                # one step's hashes with another's
                self.note = (f"stopped: ranks {comparison.ranks} were at different exchanges ("
                             + ", ".join(f"rank {r}: {t}" for r, t in zip(comparison.ranks, comparison.exchange.tags,
                                                                            strict=True)) + ")")
            if comparison.status == "layout":
                # every rank of the group saw the same headers, so all of them stop exchanging at the same point
                self.route_notes[comparison.partition] = (
                    f"not compared: ranks {comparison.ranks} hold different parameter layouts "
                    f"(counts {comparison.exchange.counts})")
                if all(p in self.route_notes for p in self.routes):
                    self.note = self.route_notes[comparison.partition]
        return out

    def all_gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's small picklable ``obj`` through the bounded group of all ranks, or None where that group
        is missing (one process, not connected) or broken. A collective over every rank."""
        if self.world is None or self.world.broken is not None:
            return None
        return self.world.all_gather_object(obj)

    def describe(self) -> str:
        """One line for a report: what is compared, or why nothing is."""
        if self.active and self.sharded:
            return f"compared within replicate groups {self.groups} (local shards)"
        if self.active:
            return f"compared across {self.world_size} ranks"
        broken = self.broken
        if broken is not None:
            return f"stopped after a failed exchange with ranks {broken.ranks}: {broken.broken}"
        return self.note or ("not compared (not set up yet)" if self.distributed else "not compared (single process)")
