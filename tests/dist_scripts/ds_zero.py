"""Launched by tests/test_deepspeed.py as users launch HF Trainer jobs under DeepSpeed:
``DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 ds_zero.py STAGE OUT_DIR`` (gloo, CPU).

Runs, in one launch, short Trainer jobs with a DeepSpeed ZeRO config dict (``TrainingArguments(deepspeed=...)``)
and the IntegrityCallback (policy log, defaults otherwise). A tiny GPT-2 built from a config:

* ``lora``: PEFT LoRA, healthy (every ZeRO stage).
* ``lora_bad_b``: LoRA whose first block's ``c_attn`` adapter was re-initialised (normal, std 0.02: a user's init
  loop over every ``nn.Linear``) before training, so its lora_B is not zero: ``ADAPTER_INIT_WRONG`` naming that
  lora_B (ZeRO-3: the values are partitioned when the check runs).
* ``full``: full fine-tune, healthy (ZeRO-1, ZeRO-2).
* ``full_nan``: full fine-tune where a gradient hook of one parameter writes a NaN at step 2 on rank 1
  (fp32): DeepSpeed skips the step ("OVERFLOW!") and ``GRAD_NONFINITE`` must say so.
* ``full_param``: full fine-tune where rank 1 nudges one parameter after optimizer step 2 (ZeRO-2: parameters
  are replicated after the step): ``PARAM_REPLICA_MISMATCH``.
* ``untied``: full fine-tune of a GPT-2 built untied while ``declare_ties`` says embedding and head are one
  tensor (ZeRO-3): ``TIE_BROKEN``, its values compared gathered (different values), not as two empty placeholders.
* ``lora_frozen``: LoRA where the user's code writes into the frozen embedding at step 2 through DeepSpeed's
  own API (``GatheredParameters(modifier_rank=0)``; ZeRO-3): ``FROZEN_CHANGED`` from the shards' hashes.

Each rank writes ``OUT_DIR/<job>.rank<r>.json`` with its findings and the report's sections, and the job's wall
time.
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
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from callbacks.hf import IntegrityCallback  # noqa: E402

torch.set_num_threads(1)
STAGE = int(sys.argv[1])
OUT = sys.argv[2]
JOBS = sys.argv[3].split(",") if len(sys.argv) > 3 else None
TARGET = "transformer.h.1.mlp.c_fc.weight"
BAD_B = "transformer.h.0.attn.c_attn"
FROZEN_TARGET = "base_model.model.transformer.wpe.weight"


class NanGradOnRank1(TrainerCallback):
    """A rank-dependent bug: at step 2 rank 1's backward writes a NaN into one gradient (a tensor hook, which
    fires before DeepSpeed reduces the gradient into its partitions)."""

    def __init__(self):
        self.handle = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == 2 and dist.get_rank() == 1:
            param = dict(model.named_parameters())[TARGET]
            self.handle = param.register_hook(lambda g: torch.full_like(g, float("nan")))

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class NudgeParamOnRank1(TrainerCallback):
    """Rank 1 changes one parameter after optimizer step 2, outside the synchronised update."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == 2 and dist.get_rank() == 1:
            with torch.no_grad():
                dict(model.named_parameters())[TARGET].add_(1e-3)


class WriteFrozen(TrainerCallback):
    """A manual update of a frozen weight, done the way DeepSpeed documents for ZeRO-3 (every rank enters the
    gather, rank 0 writes, the new values are scattered back into every shard)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == 2:
            import deepspeed

            weight = dict(model.named_parameters())[FROZEN_TARGET]
            with deepspeed.zero.GatheredParameters([weight], modifier_rank=0), torch.no_grad():
                if dist.get_rank() == 0:
                    weight.add_(1e-3)


def build(job):
    model = tiny_gpt2(tie=job != "untied")
    if not job.startswith("lora"):
        return model
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    if job == "lora_bad_b":
        # the user's init loop over nn.Linear (normal, std 0.02) reached one layer's adapter after it was added
        layer = dict(model.named_modules())[f"base_model.model.{BAD_B}"]
        for factor in (layer.lora_A, layer.lora_B):
            torch.nn.init.normal_(factor["default"].weight, std=0.02)
    return model


def dump(job, integrity, seconds, **extra):
    path = os.path.join(OUT, f"{job}.rank{dist.get_rank()}.json")
    with open(path, "w") as fh:
        json.dump({"findings": [f.to_dict() for f in integrity.findings], "sections": integrity.report.sections,
                   "seconds": seconds, **extra}, fh, default=str)


def run(job):
    start = time.monotonic()
    # no "optimizer" section: DeepSpeed wraps the Trainer's torch AdamW, so the only op JIT-built on a clean
    # machine is DeepSpeed's shared-memory comm op (its own AdamW would also build fused_adam, ~1 min on 2 cores)
    deepspeed = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": STAGE}, "zero_allow_untested_optimizer": True}
    ties = [("transformer.wte.weight", "lm_head.weight")] if job == "untied" else []
    integrity = IntegrityCallback(policy="log", declare_ties=ties, checks={"hashes": {"timeout_s": 60}})
    callbacks = {"full_nan": [NanGradOnRank1()], "full_param": [NudgeParamOnRank1()],
                 "lora_frozen": [WriteFrozen()]}.get(job, [])
    args = TrainingArguments(output_dir=os.path.join(OUT, job), max_steps=3, per_device_train_batch_size=2,
                             save_strategy="no", report_to=[], logging_steps=1000, disable_tqdm=True,
                             learning_rate=1e-2, seed=0, deepspeed=deepspeed)
    trainer = Trainer(model=build(job), args=args, train_dataset=TokenDataset(n=16),
                      callbacks=[*callbacks, integrity])
    trainer.train()
    # DeepSpeed's own count of the steps it skipped (the NaN job's step 2): the fault really happened
    dump(job, integrity, time.monotonic() - start, skipped_steps=trainer.model_wrapped.skipped_steps)


default = {1: ["lora", "full"], 2: ["lora", "full", "full_nan", "full_param"],
           3: ["lora", "lora_bad_b", "lora_frozen", "untied"]}[STAGE]
for name in JOBS or default:
    run(name)
dist.barrier()
