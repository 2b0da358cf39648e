"""Launched by tests/test_deepspeed_checkpoints.py:
``DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 ds_checkpoints.py OUT_DIR`` (gloo, CPU).

Full fine-tunes of a tiny tied GPT-2 through the HF Trainer with a DeepSpeed config dict, saving a checkpoint at
step 2, under ``zero3`` (only DeepSpeed's partitioned shards are written), ``zero3_gathered``
(``stage3_gather_16bit_weights_on_model_save``: a consolidated ``model.safetensors`` too) and ``zero2``
(``model.safetensors`` beside the shards). Then ``zero2_unfreeze``: LoRA, and the user's callback unfreezes the
position embedding after step 1, when DeepSpeed's optimizer groups are already built (it gets gradients and
never changes): TRAINABLE_SET_CHANGED and TRAINABLE_NOT_OPTIMIZED at step 2. Then ``zero3_merge``: LoRA under
ZeRO-3 and ``checked_merge`` after training, on every rank (the parameters are placeholders); ``zero3_verify``:
``saved_state.verify_values`` under ZeRO-3 (live placeholders: nothing to compare); ``zero3_resume``: LoRA under
ZeRO-3, then a second run resuming from checkpoint-2 (its findings are written). Each rank writes
``OUT_DIR/<job>.rank<r>.json`` with its findings.
"""

import json
import os
import sys

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
OUT = sys.argv[1]
JOBS = {"zero3": {"stage": 3}, "zero3_gathered": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        "zero2": {"stage": 2}, "zero2_unfreeze": {"stage": 2}, "zero3_merge": {"stage": 3},
        "zero3_verify": {"stage": 3}, "zero3_resume": {"stage": 3}}


class UnfreezeAfterStep1(TrainerCallback):
    """Gradual unfreezing done after the optimizer exists (DeepSpeed built its groups from the trainable set)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            model.base_model.model.transformer.wpe.weight.requires_grad_(True)


def build(job):
    model = tiny_gpt2()
    if job in ("zero2_unfreeze", "zero3_merge", "zero3_resume"):
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    return model


for job, zero in JOBS.items():
    deepspeed = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": zero,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    checks = {"saved_state": {"verify_values": True}} if job == "zero3_verify" else {}
    integrity = IntegrityCallback(policy="log", checks=checks)
    args = TrainingArguments(output_dir=os.path.join(OUT, job), max_steps=2, per_device_train_batch_size=2,
                             save_strategy="steps", save_steps=2, report_to=[], logging_steps=1000,
                             disable_tqdm=True, learning_rate=1e-2, seed=0, deepspeed=deepspeed)
    callbacks = [UnfreezeAfterStep1()] if job == "zero2_unfreeze" else []
    trainer = Trainer(model=build(job), args=args, train_dataset=TokenDataset(n=16),
                      callbacks=[*callbacks, integrity])
    trainer.train()
    if job == "zero3_resume":  # a second run resumes from checkpoint-2: every rank restores rank 0's saved state
        integrity = IntegrityCallback(policy="log", checks=checks)
        args = TrainingArguments(output_dir=os.path.join(OUT, job), max_steps=4, per_device_train_batch_size=2,
                                 save_strategy="steps", save_steps=2, report_to=[], logging_steps=1000,
                                 disable_tqdm=True, learning_rate=1e-2, seed=0, deepspeed=deepspeed)
        trainer = Trainer(model=build(job), args=args, train_dataset=TokenDataset(n=16), callbacks=[integrity])
        trainer.train(resume_from_checkpoint=True)
    if job == "zero3_merge":
        integrity.monitor.checked_merge(trainer.model)
    names = sorted(n for n, _ in trainer.model.named_parameters(remove_duplicate=False))
    with open(os.path.join(OUT, f"{job}.rank{dist.get_rank()}.json"), "w") as fh:
        json.dump({"findings": [f.to_dict() for f in integrity.findings], "names": names,
                   "sections": integrity.report.sections}, fh, default=str)
    dist.barrier()
