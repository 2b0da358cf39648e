"""Launched by tests/test_replicas_fsdp.py as
``python -m torch.distributed.run --nproc_per_node 2 fsdp_replicas.py OUT_DIR`` (gloo, 2 CPU processes).

A custom training loop over FSDP2 (``torch.distributed.fsdp.fully_shard``) on a tiny MLP, each rank fed its own
batches, with a plain :class:`callbacks.Monitor` (policy log, defaults otherwise) dispatched the way the
integrations do: init after sharding; ``step/before_optimizer`` after backward (FSDP2's reduce-scatter and the
replicate all-reduce are done by then); ``step/after_optimizer`` after ``optimizer.step``; end. Jobs, in one launch:

* ``hsdp_healthy``: HSDP mesh (2, 1) = 2 replicas x 1 shard: both ranks hold the whole tensors, must agree.
* ``hsdp_grad``: the same, the last rank adds 1e-3 to its local gradient shard of ``TARGET`` after backward of
  step 2.
* ``hsdp_param``: the same, the last rank adds 1e-3 to its local parameter shard of ``TARGET`` after optimizer
  step 2.
* ``fsdp_healthy``: pure FSDP mesh (1, 2): each rank holds half of every tensor; shards are never compared.
* ``fsdp_root_unsharded``: pure FSDP on the layers, but the root (holding a plain ``scale`` parameter) was not
  passed to ``fully_shard``: nothing reduces ``scale``'s gradient, so the ranks' copies drift apart from step 1.

Every check runs at its defaults beside the hashes (ties and saved_state read DTensor parameters through their
local shards), so the healthy runs also prove that no family misreads a sharded model.

Launched with 4 processes instead: ``hsdp4_healthy``, ``hsdp4_grad`` on an HSDP mesh (2, 2) and
``hsdp4_timeout`` (see :func:`run_timeout`).

Each rank writes ``OUT_DIR/<job>.rank<r>.json`` with its findings, the hashes report section, and the local
shard shapes (to prove the mesh really sharded).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from callbacks import Monitor  # noqa: E402

torch.set_num_threads(1)
OUT = sys.argv[1]
TARGET = "layers.1.weight"
STEPS = 3


class MLP(nn.Module):
    """3 linear layers (hidden 32) and a plain scalar ``scale`` on the output."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return h * self.scale


def build(mesh_shape, shard_root=True):
    """The MLP sharded per layer and (unless ``shard_root`` is False) at the root, on a (replicate, shard) mesh."""
    torch.manual_seed(0)  # every rank builds the same full model before sharding
    model = MLP()
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    if shard_root:
        fully_shard(model, mesh=mesh)
    return model


def run(job, mesh_shape, perturb=None, shard_root=True):
    rank = dist.get_rank()
    model = build(mesh_shape, shard_root)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = Monitor(policy="log", checks={"hashes": {"timeout_s": 30}})
    mon.dispatch("init", model, step=0, optimizer=optimizer)
    data = torch.Generator().manual_seed(100 + rank)  # data parallel: each rank its own batches
    for step in range(1, STEPS + 1):
        x = torch.randn(4, 16, generator=data)
        loss = model(x).pow(2).mean()
        loss.backward()
        target = model.get_parameter(TARGET)
        # a rank-dependent write after the reduction, on the last rank
        if perturb == "grad" and step == 2 and rank == dist.get_world_size() - 1:
            target.grad.to_local().add_(1e-3)
        mon.dispatch("step", model, step=step, phase="before_optimizer", optimizer=optimizer)
        optimizer.step()
        if perturb == "param" and step == 2 and rank == dist.get_world_size() - 1:
            with torch.no_grad():
                target.to_local().add_(1e-3)
        mon.dispatch("step", model, step=step, phase="after_optimizer", optimizer=optimizer)
        optimizer.zero_grad()
    mon.dispatch("end", model, step=STEPS)
    local_shapes = {n: list(getattr(p, "to_local", lambda p=p: p)().shape) for n, p in model.named_parameters()}
    with open(os.path.join(OUT, f"{job}.rank{rank}.json"), "w") as fh:
        json.dump({"findings": [f.to_dict() for f in mon.findings], "section": mon.check("hashes").report_section(),
                   "local_shapes": local_shapes}, fh, default=str)


def run_timeout():
    """HSDP (2, 2), one step; rank 3 never reaches the exchange (as if it crashed there). Only rank 1, its
    replicate peer, waits for it: CHECK_FAILED after timeout_s=3 instead of hanging; ranks 0 and 2 (the other
    group) exchange with each other and are unaffected."""
    rank = dist.get_rank()
    model = build((2, 2))
    mon = Monitor(policy="log", checks={"hashes": {"timeout_s": 3}})
    mon.dispatch("init", model, step=0)
    model(torch.ones(2, 16)).sum().backward()  # FSDP's own collectives span every rank
    start = time.monotonic()
    if rank != 3:
        mon.dispatch("step", model, step=1, phase="before_optimizer")
        mon.dispatch("step", model, step=1, phase="after_optimizer")  # rank 1: disabled, returns at once
    waited = time.monotonic() - start
    with open(os.path.join(OUT, f"hsdp4_timeout.rank{rank}.json"), "w") as fh:
        json.dump({"findings": [f.to_dict() for f in mon.findings], "waited_s": waited,
                   "section": mon.check("hashes").report_section()}, fh, default=str)


dist.init_process_group("gloo")
if dist.get_world_size() == 4:  # HSDP (2, 2): replicate groups {0, 2} and {1, 3} are real gloo subgroups
    run("hsdp4_healthy", (2, 2))
    run("hsdp4_grad", (2, 2), perturb="grad")
    run_timeout()
else:
    run("hsdp_healthy", (2, 1))
    run("hsdp_grad", (2, 1), perturb="grad")
    run("hsdp_param", (2, 1), perturb="param")
    run("fsdp_healthy", (1, 2))
    run("fsdp_root_unsharded", (1, 2), shard_root=False)
dist.barrier()
dist.destroy_process_group()
