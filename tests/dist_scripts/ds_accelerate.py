"""Launched by tests/test_deepspeed_checkpoints.py:
``DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 ds_accelerate.py OUT_DIR`` (gloo, CPU).

A plain accelerate loop with ``AcceleratorHooks`` and a ``DeepSpeedPlugin``, as the README shows it, for ZeRO-2 and
ZeRO-3, LoRA and full fine-tune (healthy), and ``zero3_lora_bad_b``: LoRA whose first block's adapter a user's
init loop over every ``nn.Linear`` re-initialised (lora_B not zero, lora_A at the wrong spread).
Each rank writes ``OUT_DIR/<job>.rank<r>.json`` with its findings.
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
from accelerate import Accelerator, DeepSpeedPlugin  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from models import TokenDataset, tiny_gpt2  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from callbacks.accelerate import AcceleratorHooks  # noqa: E402

torch.set_num_threads(1)
OUT = sys.argv[1]
BAD_B = "transformer.h.0.attn.c_attn"
JOBS = {"zero2_lora": 2, "zero2_full": 2, "zero3_lora": 3, "zero3_full": 3, "zero3_lora_bad_b": 3}


def build(job):
    torch.manual_seed(0)
    model = tiny_gpt2()
    if "lora" not in job:
        return model
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    if job.endswith("bad_b"):
        # the user's init loop over nn.Linear (normal, std 0.02) reached one layer's adapter after it was added
        layer = dict(model.named_modules())[f"base_model.model.{BAD_B}"]
        for factor in (layer.lora_A, layer.lora_B):
            torch.nn.init.normal_(factor["default"].weight, std=0.02)
    return model


for job, stage in JOBS.items():
    AcceleratorState._reset_state(reset_partial_state=False)  # one Accelerator per job in this process
    plugin = DeepSpeedPlugin(hf_ds_config={"train_micro_batch_size_per_gpu": 2, "train_batch_size": 4,
                                           "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage}})
    accelerator = Accelerator(deepspeed_plugin=plugin)
    model = build(job)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(TokenDataset(n=16), batch_size=2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    hooks = AcceleratorHooks(accelerator, policy="log")
    hooks.begin(model, optimizer=optimizer)
    for step, batch in enumerate(loader):
        if step == 3:
            break
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            hooks.before_optimizer_step(model, optimizer)
            optimizer.step()
            hooks.after_optimizer_step(model, optimizer)
            optimizer.zero_grad()
    hooks.end(model)
    with open(os.path.join(OUT, f"{job}.rank{dist.get_rank()}.json"), "w") as fh:
        json.dump({"findings": [f.to_dict() for f in hooks.findings]}, fh, default=str)
    dist.barrier()
