"""Replica checks under real torch.distributed (gloo, 2 CPU processes), launched the way users launch:
torchrun for HF Trainer, Lightning's own ``ddp`` launcher. One launch per trainer; each runs the healthy twin
and the perturbed jobs in sequence (scripts in tests/dist_scripts/)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
    """A TCP port free now on localhost (for the rendezvous of one launch)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TARGET = "transformer.h.1.mlp.c_fc.weight"

pytestmark = pytest.mark.slow


def launch(args: list[str], out_dir, timeout: int = 120) -> None:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    env.pop("WORLD_SIZE", None)
    run = subprocess.run([sys.executable, *args, str(out_dir)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]


def load(out_dir, job: str, rank: int) -> dict:
    with open(os.path.join(out_dir, f"{job}.rank{rank}.json")) as fh:
        return json.load(fh)


def problems(data: dict) -> list[tuple]:
    return [(f["code"], f["event"], f["step"], tuple(f["params"]), tuple(f["details"].get("ranks") or ()))
            for f in data["findings"] if f["severity"] != "info"]


def test_hf_trainer_under_torchrun(tmp_path):
    launch(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), os.path.join(HERE, "dist_scripts", "hf_replicas.py")], tmp_path)
    for rank in (0, 1):  # every rank gathers every rank's hashes and reaches the same verdict
        healthy = load(tmp_path, "healthy", rank)
        assert problems(healthy) == []
        assert healthy["section"]["replicas"] == "compared across 2 ranks"
        # one gradient nudged on rank 1 after the all-reduce: named with both ranks, and the update it feeds
        # makes that parameter differ after the same step (reported once although it stays different)
        assert problems(load(tmp_path, "grad", rank)) == [
            ("GRAD_REPLICA_MISMATCH", "step", 2, (TARGET,), (0, 1)),
            ("PARAM_REPLICA_MISMATCH", "step", 2, (TARGET,), (0, 1)),
        ]
        # a parameter nudged on rank 1 after the step: DDP keeps averaging gradients, so gradients still agree
        assert problems(load(tmp_path, "param", rank)) == [("PARAM_REPLICA_MISMATCH", "step", 2, (TARGET,), (0, 1))]
    # bounded wait: rank 1 skipped an exchange; rank 0 gets CHECK_FAILED after timeout_s=3 instead of hanging
    timeout = load(tmp_path, "timeout", 0)
    assert [f["code"] for f in timeout["findings"]] == ["CHECK_FAILED"]
    assert "within 3s" in timeout["findings"][0]["message"]
    assert timeout["waited_s"] < 20


def test_lightning_ddp_strategy(tmp_path):
    """Lightning re-runs the script for rank 1 itself (``strategy="ddp"``, 2 CPU devices); hashes are taken in
    on_before_optimizer_step (after DDP's all-reduce, before clipping) and after the optimizer stepped."""
    launch([os.path.join(HERE, "dist_scripts", "lightning_replicas.py")], tmp_path)
    target = "model.layers.1.1.weight"
    for rank in (0, 1):
        healthy = load(tmp_path, "healthy", rank)
        assert problems(healthy) == []
        assert healthy["section"]["replicas"] == "compared across 2 ranks"
        assert problems(load(tmp_path, "grad", rank)) == [
            ("GRAD_REPLICA_MISMATCH", "step", 2, (target,), (0, 1)),
            ("PARAM_REPLICA_MISMATCH", "step", 2, (target,), (0, 1)),
        ]
        assert problems(load(tmp_path, "param", rank)) == [("PARAM_REPLICA_MISMATCH", "step", 2, (target,), (0, 1))]
