"""Replica checks under real torch.distributed (gloo, 2 CPU processes), launched the way users launch:
torchrun for HF Trainer, Lightning's own ``ddp`` launcher. One launch per trainer; each runs the healthy twin
and the perturbed jobs in sequence (scripts in tests/dist_scripts/)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TARGET = "transformer.h.1.mlp.c_fc.weight"

pytestmark = pytest.mark.slow


def free_port() -> int:
    """A TCP port free now on localhost (for the rendezvous of one launch)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], out_dir, timeout: int = 120, env: dict[str, str] | None = None) -> str:
    """Run a launcher in its own session (``env``: more environment variables); on timeout kill the whole group
    (workers included), never leave orphaned ranks behind. Returns what every rank printed (stdout)."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, *args, str(out_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"launch timed out after {timeout}s:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return stdout


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
        # a checkpoint every step: only the writer (rank 0) judges the folder, never rank 1 while it is written
        assert problems(load(tmp_path, "saving", rank)) == []
        # one gradient nudged on rank 1 after the all-reduce: named with both ranks, and the update it feeds
        # makes that parameter differ after the same step (reported once although it stays different)
        assert problems(load(tmp_path, "grad", rank)) == [
            ("GRAD_REPLICA_MISMATCH", "step", 2, (TARGET,), (0, 1)),
            ("PARAM_REPLICA_MISMATCH", "step", 2, (TARGET,), (0, 1)),
        ]
        # a parameter nudged on rank 1 after the step: DDP keeps averaging gradients, so gradients still agree
        assert problems(load(tmp_path, "param", rank)) == [("PARAM_REPLICA_MISMATCH", "step", 2, (TARGET,), (0, 1))]
        untie = load(tmp_path, "untie", rank)["findings"]
        assert "CHECK_FAILED" not in [f["code"] for f in untie]
        (broken,) = [f for f in untie if f["code"] == "TIE_BROKEN"]
        assert (broken["step"], broken["params"]) == (2, ["lm_head.weight", "transformer.wte.weight"])
        if rank == 0:  # seen by rank 1 alone, gathered into rank 0's report (the job's report and exit code)
            assert broken["details"]["seen_on_ranks"] == [1] and broken["message"].endswith("(seen on rank 1)")
        else:
            assert "seen_on_ranks" not in broken["details"]
        tied = [(f["code"], f["event"], f["step"], tuple(f["params"]))
                for f in load(tmp_path, "tied", rank)["findings"]]
        assert tied == [("CHECK_NOT_APPLICABLE", "init", 0, ()),
                        ("TIE_DIVERGED", "step", 2, ("emb.weight", "head.weight"))]
        # rank 1 missed step 2's gradient exchange: tags tell the ranks are out of step (no false mismatch)
        out_of_step = load(tmp_path, "out_of_step", rank)
        found = [(f["code"], f["event"], f["step"]) for f in out_of_step["findings"]]
        assert found == [("CHECK_FAILED", "step", 2)], out_of_step["findings"]
        message = out_of_step["findings"][0]["message"]
        assert "out of step" in message and "gradients before the optimizer step of step 2" in message
        assert out_of_step["section"]["replicas"].startswith("stopped: ranks [0, 1] were at different exchanges")
    # bounded wait: rank 1 skipped an exchange; rank 0 gets CHECK_FAILED after timeout_s=3 instead of hanging
    timeout = load(tmp_path, "timeout", 0)
    assert [f["code"] for f in timeout["findings"]] == ["CHECK_FAILED"]
    assert "within 3s" in timeout["findings"][0]["message"]
    assert timeout["waited_s"] < 20


def test_lightning_ddp_strategy(tmp_path):
    """Lightning re-runs the script for rank 1 itself (``strategy="ddp"``, 2 CPU devices); hashes are taken in
    on_before_optimizer_step (after DDP's all-reduce, before clipping) and after the optimizer stepped."""
    stdout = launch([os.path.join(HERE, "dist_scripts", "lightning_replicas.py")], tmp_path)
    # rank 1 is started by Lightning without RANK, after its callback was built: the rank is resolved when the
    # job runs, so only rank 0 prints the report table, once per job (healthy, grad, param, untie)
    assert stdout.count("integrity report") == 4, stdout[-3000:]
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
        untie = load(tmp_path, "untie", rank)["findings"]
        assert "CHECK_FAILED" not in [f["code"] for f in untie]
        (broken,) = [f for f in untie if f["code"] == "TIE_BROKEN"]
        assert broken["params"] == ["model.output.weight", "model.tok_embeddings.weight"]
        # seen by rank 1 alone (Lightning's launcher started it), gathered into rank 0's report at the end
        assert broken["details"].get("seen_on_ranks") == ([1] if rank == 0 else None)
