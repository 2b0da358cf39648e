"""Launched by tests/test_replicas.py as users launch HF Trainer jobs:
``python -m torch.distributed.run --nproc_per_node 2 hf_replicas.py OUT_DIR`` (gloo, CPU).

Runs, in one launch, short Trainer jobs with the IntegrityCallback (policy log, defaults otherwise):
``healthy``; ``saving`` (a checkpoint every step); ``grad`` (rank 1 adds 1e-3 to one gradient after the
all-reduce, before the optimizer step 2); ``param`` (rank 1 adds 1e-3 to one parameter after optimizer step 2);
``untie`` (rank 1 alone replaces the tied head's Parameter at step 2: a finding only rank 1 sees, which must
reach rank 0's report). Then plain Monitors: ``tied``, a tie kept by copying across two ranks (pipeline-like),
diverged on rank 1 at step 2; ``out_of_step``, rank 1 misses one exchange (tagged exchanges: CHECK_FAILED, no
mismatch); ``timeout``, rank 1 skips one exchange and rank 0 must get CHECK_FAILED within the bounded wait
instead of hanging.
Each rank writes ``OUT_DIR/<job>.rank<r>.json`` with its findings.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tests/ (models)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from models import TokenDataset, tiny_gpt2  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from callbacks import Monitor  # noqa: E402
from callbacks.hf import IntegrityCallback  # noqa: E402

torch.set_num_threads(1)
OUT = sys.argv[1]
TARGET = "transformer.h.1.mlp.c_fc.weight"


class PerturbOnRank1(TrainerCallback):
    """A rank-dependent bug: rank 1 nudges one tensor at step 2 (grad before the step, or param after it)."""

    def __init__(self, what):
        self.what = what

    def _target(self, model):
        return dict(model.named_parameters())[TARGET]

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.what == "grad" and state.global_step + 1 == 2 and dist.get_rank() == 1:
            self._target(model).grad.add_(1e-3)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.what == "param" and state.global_step + 1 == 2 and dist.get_rank() == 1:
            with torch.no_grad():
                self._target(model).add_(1e-3)
        if self.what == "untie" and state.global_step + 1 == 2 and dist.get_rank() == 1:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())


def dump(job, findings, **extra):
    path = os.path.join(OUT, f"{job}.rank{int(os.environ['RANK'])}.json")
    with open(path, "w") as fh:
        json.dump({"findings": [f.to_dict() for f in findings], **extra}, fh, default=str)


def run_trainer(job):
    callbacks = [] if job in ("healthy", "saving") else [PerturbOnRank1(job)]
    integrity = IntegrityCallback(policy="log", checks={"hashes": {"timeout_s": 30}})
    # "saving": a checkpoint at every step, which rank 0 writes while rank 1's on_save already runs
    save = {"save_strategy": "steps", "save_steps": 1} if job == "saving" else {"save_strategy": "no"}
    args = TrainingArguments(output_dir=os.path.join(OUT, job), max_steps=3, per_device_train_batch_size=2, **save,
                             report_to=[], logging_steps=1000, use_cpu=True,
                             disable_tqdm=True, learning_rate=1e-2, seed=0)
    # the perturbing callback runs before the integrity callback at the same hook, as a user's callback would
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(n=16),
                      callbacks=[*callbacks, integrity])
    trainer.train()
    dump(job, integrity.findings, section=integrity.report.sections.get("hashes"))


def run_timeout():
    """Rank 1 never reaches the step-1 exchange (as if it crashed there): rank 0 must not hang."""
    torch.manual_seed(0)  # replicas start equal (an unseeded init would be a PARAM_REPLICA_MISMATCH at init)
    model = torch.nn.Linear(4, 4)
    mon = Monitor(policy="log", checks={"hashes": {"timeout_s": 3}})
    mon.dispatch("init", model, step=0)
    model(torch.ones(1, 4)).sum().backward()
    start = time.monotonic()
    if dist.get_rank() == 0:
        mon.dispatch("step", model, step=1, phase="before_optimizer")
        mon.dispatch("step", model, step=1, phase="after_optimizer")  # disabled after the failure: returns at once
    dump("timeout", mon.findings, waited_s=time.monotonic() - start)


def run_out_of_step():
    """Rank 1 misses the gradient exchange of step 2 (as if its hashes check failed before exchanging): rank 0's
    step-2 gradients meet rank 1's step-2 parameters, the same layout. Tagged exchanges make that CHECK_FAILED on
    both ranks and stop the comparison, never a GRAD_REPLICA_MISMATCH."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(policy="log", checks={"hashes": {"timeout_s": 30}})
    mon.dispatch("init", model, step=0)
    for step in (1, 2, 3):
        optimizer.zero_grad()
        model(torch.ones(1, 4)).sum().backward()
        if not (step == 2 and dist.get_rank() == 1):
            mon.dispatch("step", model, step=step, phase="before_optimizer", optimizer=optimizer)
        optimizer.step()
        mon.dispatch("step", model, step=step, phase="after_optimizer", optimizer=optimizer)
    mon.dispatch("end", model, step=3)
    dump("out_of_step", mon.findings, section=mon.report.sections.get("hashes"))


def run_tied():
    """Pipeline-like: rank 0 holds the embedding, rank 1 the head, a tie kept by copying across ranks. Rank 1
    updates its copy at step 2 without syncing it back: TIE_DIVERGED on every rank. The ranks hold different
    layouts, so replica comparison (on by default) turns itself off with CHECK_NOT_APPLICABLE at init."""
    torch.manual_seed(0)
    weight = torch.randn(8, 4)
    model = torch.nn.Module()
    if dist.get_rank() == 0:
        model.emb = torch.nn.Embedding(8, 4, _weight=weight.clone())
    else:
        model.head = torch.nn.Linear(4, 8, bias=False)
        model.head.weight.data.copy_(weight)
    mon = Monitor(policy="log", checks={"hashes": {"tied_copies": [["emb.weight", "head.weight"]], "timeout_s": 30}})
    mon.dispatch("init", model, step=0)
    for step in (1, 2, 3):
        if step == 2 and dist.get_rank() == 1:
            with torch.no_grad():
                model.head.weight.add_(0.01)
        mon.dispatch("step", model, step=step, phase="before_optimizer")
        mon.dispatch("step", model, step=step, phase="after_optimizer")
    mon.dispatch("end", model, step=3)
    dump("tied", mon.findings)


for job in ("healthy", "saving", "grad", "param", "untie"):
    run_trainer(job)
run_tied()
run_out_of_step()
run_timeout()
dist.barrier()
