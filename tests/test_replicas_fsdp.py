"""Replica checks under FSDP2 (``fully_shard``), real torch.distributed (gloo, 2 CPU processes, one torchrun
launch running every job of tests/dist_scripts/fsdp_replicas.py in sequence), and the partition arithmetic that
decides which ranks must agree (HSDP meshes larger than 2 ranks, checked without launching them)."""

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
        assert fsdp["section"]["replicas"].startswith("not compared: parameters are sharded with no replicate")
        # the root left out of fully_shard: its plain ``scale`` is a DDP-style replica that nothing synchronises.
        # Its gradient differs from step 1; AdamW's first update is lr*sign(grad), equal on both ranks, so the
        # parameters part at step 2
        assert problems(load(tmp_path, "fsdp_root_unsharded", rank)) == [
            ("GRAD_REPLICA_MISMATCH", "step", 1, ("scale",), (0, 1)),
            ("PARAM_REPLICA_MISMATCH", "step", 2, ("scale",), (0, 1)),
        ]


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
