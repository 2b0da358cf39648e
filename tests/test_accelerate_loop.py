"""The documented Monitor pattern for a custom ``accelerate`` loop, run for real."""

import torch
from accelerate import Accelerator
from models import LinguaLM, lm_batches
from recording import RecordingCheck
from torch import nn

from callbacks.accelerate import AcceleratorHooks

DECLARED = [("tok_embeddings.weight", "output.weight")]


def run_loop(tmp_path, untie_at=None, accumulation=2, steps=4):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = LinguaLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(lm_batches(steps * accumulation), batch_size=None)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    recorder = RecordingCheck()
    hooks = AcceleratorHooks(accelerator, policy="log", declare_ties=DECLARED, extra_checks=[recorder])
    hooks.begin(model)
    for batch in loader:
        with accelerator.accumulate(model):
            logits = model(batch["input_ids"])
            accelerator.backward(nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            hooks.before_optimizer_step(model, optimizer, grads_clipped=True)
            optimizer.step()
            hooks.after_optimizer_step(model, optimizer)
            optimizer.zero_grad()
        if untie_at is not None and hooks.step == untie_at:
            inner = accelerator.unwrap_model(model)
            inner.output.weight = nn.Parameter(inner.output.weight.detach().clone())
            untie_at = None
    accelerator.save_state(str(tmp_path / "state"))
    hooks.saved(model, str(tmp_path / "state"))
    hooks.end(model)
    return hooks, recorder


def test_loop_events_follow_real_optimizer_steps_and_run_clean(tmp_path):
    hooks, recorder = run_loop(tmp_path)
    steps = [s for s in recorder.seen if s[0] == "step"]
    assert steps == [("step", p, n) for n in (1, 2, 3, 4) for p in ("before_optimizer", "after_optimizer")]
    assert recorder.seen[-2:] == [("checkpoint", None, 4), ("end", None, 4)]
    assert [f for f in hooks.findings if f.severity != "info"] == []


def test_tie_broken_inside_the_loop_is_found_at_the_next_step(tmp_path):
    hooks, _ = run_loop(tmp_path, untie_at=2)
    broken = [f for f in hooks.findings if f.code == "TIE_BROKEN"]
    assert [(f.event, f.step, f.params) for f in broken] == [
        ("step", 3, ("output.weight", "tok_embeddings.weight"))]
