"""Replica checks under FSDP2 (``fully_shard``) with real torch.distributed (gloo, CPU): one torchrun launch of
2 processes running the 2-rank jobs of tests/dist_scripts/fsdp_replicas.py in sequence, one of 4 processes for a
(2, 2) HSDP mesh whose replicate groups are real subgroups; and the partition arithmetic that decides which
ranks must agree."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from test_replicas import HERE, free_port, launch, load, problems
from torch.distributed.tensor import Partial, Replicate, Shard

from callbacks.primitives.collectives import comparison_partition, world_partition

TARGET = "layers.1.weight"


@pytest.mark.slow
def test_fsdp2_replicate_groups_under_torchrun(tmp_path):
    launch(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), os.path.join(HERE, "dist_scripts", "fsdp_replicas.py")], tmp_path,
           timeout=90)
    for rank in (0, 1):  # every rank of a replicate group gathers the group's hashes and reaches the same verdict
        # HSDP (2, 1): both ranks hold whole tensors (their own batches, gradients reduced over the replicate dim)
        healthy = load(tmp_path, "hsdp_healthy", rank)
        assert problems(healthy) == [] and healthy["findings"] == []
        assert healthy["section"]["replicas"] == "compared within replicate groups [[0, 1]] (local shards)"
        assert healthy["local_shapes"][TARGET] == [32, 32]
        # rank 1's local gradient shard nudged after backward (after the reduction): named with both ranks, and
        # the update it feeds makes the parameter shards differ after the same step
        grad = load(tmp_path, "hsdp_grad", rank)
        assert problems(grad) == [
            ("GRAD_REPLICA_MISMATCH", "step", 2, (TARGET,), (0, 1)),
            ("PARAM_REPLICA_MISMATCH", "step", 2, (TARGET,), (0, 1)),
        ]
        assert "replicate group [0, 1]" in grad["findings"][0]["message"]
        assert grad["findings"][0]["details"]["replicate_groups"] == {TARGET: [0, 1]}
        assert problems(load(tmp_path, "hsdp_param", rank)) == [
            ("PARAM_REPLICA_MISMATCH", "step", 2, (TARGET,), (0, 1))]
        # pure FSDP (1, 2): each rank holds half of each tensor; the shards differ and are never compared: one
        # info says so, and no exchange runs at any step
        fsdp = load(tmp_path, "fsdp_healthy", rank)
        assert fsdp["local_shapes"][TARGET] == [16, 32]
        assert [(f["code"], f["severity"], f["event"]) for f in fsdp["findings"]] == [
            ("CHECK_NOT_APPLICABLE", "info", "init")]
        assert "(pure FSDP)" in fsdp["findings"][0]["message"]
        assert fsdp["section"]["replicas"].startswith("not compared: parameters are sharded with no replicate")
        # the root left out of fully_shard: its plain ``scale`` is a DDP-style replica that nothing synchronises.
        # Its gradient differs from step 1; AdamW's first update is lr*sign(grad), equal on both ranks, so the
        # parameters part at step 2
        assert problems(load(tmp_path, "fsdp_root_unsharded", rank)) == [
            ("GRAD_REPLICA_MISMATCH", "step", 1, ("scale",), (0, 1)),
            ("PARAM_REPLICA_MISMATCH", "step", 2, ("scale",), (0, 1)),
        ]


@pytest.mark.slow
def test_hsdp_2x2_compares_only_within_replicate_subgroups(tmp_path):
    """4 processes (the smallest world where a replicate group is a real subgroup, not every rank): mesh (2, 2)
    as (replicate, shard); ranks 0 and 2 hold shard 0, ranks 1 and 3 shard 1."""
    launch(["-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), os.path.join(HERE, "dist_scripts", "fsdp_replicas.py")], tmp_path,
           timeout=90)
    for rank in range(4):
        healthy = load(tmp_path, "hsdp4_healthy", rank)
        assert healthy["findings"] == []
        group = [[0, 2]] if rank % 2 == 0 else [[1, 3]]
        assert healthy["section"]["replicas"] == f"compared within replicate groups {group} (local shards)"
        assert healthy["local_shapes"][TARGET] == [16, 32]
        # rank 3 nudged its gradient shard: only its replicate peer (rank 1) sees it; ranks 0 and 2 hold the other
        # shard and are never compared with ranks 1 and 3, but rank 0 speaks for the job: at the end it holds what
        # ranks 1 and 3 found (marked as seen there)
        expected = [("GRAD_REPLICA_MISMATCH", "step", 2, (TARGET,), (1, 3)),
                    ("PARAM_REPLICA_MISMATCH", "step", 2, (TARGET,), (1, 3))] if rank in (0, 1, 3) else []
        grad = load(tmp_path, "hsdp4_grad", rank)
        assert problems(grad) == expected
        assert all(f["details"].get("seen_on_ranks") == ([1, 3] if rank == 0 else None) for f in grad["findings"])
    # bounded wait inside a subgroup: rank 3 skipped the exchange; rank 1 gets CHECK_FAILED after timeout_s=3,
    # ranks 0 and 2 (the other group) finish at once without a finding
    timeout = load(tmp_path, "hsdp4_timeout", 1)
    assert [f["code"] for f in timeout["findings"]] == ["CHECK_FAILED"]
    assert "within 3s" in timeout["findings"][0]["message"]
    assert timeout["waited_s"] < 20
    assert timeout["section"]["replicas"].startswith("stopped after a failed exchange with ranks [1, 3]")
    for rank in (0, 2):
        other = load(tmp_path, "hsdp4_timeout", rank)
        assert other["findings"] == [] and other["waited_s"] < 2


def mesh_of(*shape: int) -> SimpleNamespace:
    """A stand-in for a DeviceMesh over ``prod(shape)`` ranks: only its rank layout (``.mesh``) is read."""
    return SimpleNamespace(mesh=torch.arange(int(torch.tensor(shape).prod())).reshape(*shape))


def dtensor_like(mesh: SimpleNamespace, *placements) -> SimpleNamespace:
    return SimpleNamespace(device_mesh=mesh, placements=tuple(placements))


def test_partition_hsdp_2x2_groups_ranks_holding_the_same_shard():
    # mesh [[0, 1], [2, 3]] as (replicate, shard): ranks 0 and 2 hold shard 0, ranks 1 and 3 shard 1
    assert comparison_partition(dtensor_like(mesh_of(2, 2), Replicate(), Shard(0)), 4) == ((0, 2), (1, 3))
    # the replicate dimension last: rows agree
    assert comparison_partition(dtensor_like(mesh_of(2, 2), Shard(0), Replicate()), 4) == ((0, 1), (2, 3))


def test_partition_pure_fsdp_and_partial_never_compare():
    assert comparison_partition(dtensor_like(mesh_of(4), Shard(0)), 4) == ((0,), (1,), (2,), (3,))
    assert comparison_partition(dtensor_like(mesh_of(1, 2), Replicate(), Shard(0)), 2) == ((0,), (1,))
    # unreduced partial sums differ by design along their dimension
    assert comparison_partition(dtensor_like(mesh_of(2, 2), Replicate(), Partial()), 4) == ((0, 2), (1, 3))
    assert comparison_partition(dtensor_like(mesh_of(2), Partial()), 2) == ((0,), (1,))


def test_partition_replicated_everywhere_and_plain_tensors_are_one_group():
    assert comparison_partition(dtensor_like(mesh_of(2, 1), Replicate(), Shard(0)), 2) == ((0, 1),)
    assert comparison_partition(dtensor_like(mesh_of(2, 2), Replicate(), Replicate()), 4) == ((0, 1, 2, 3),)
    assert comparison_partition(torch.zeros(3), 4) == world_partition(4) == ((0, 1, 2, 3),)
