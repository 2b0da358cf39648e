"""One suite run on every registered check family (as Composer does for its callbacks).

For each family, on healthy models through a real optimizer step and a real save: no error or warning
findings; nothing the check may not touch changes (parameters, gradients, requires_grad, train/eval mode,
RNG states); its state is plain picklable data that round-trips.
"""

import pickle

import pytest
import torch
from models import LinguaLM, lm_batches, tiny_gpt2
from untouched import assert_unchanged, snapshot

from callbacks import Monitor
from callbacks.checks import REGISTRY


def lora_gpt2():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0))


HEALTHY = {
    "gpt2_full": (tiny_gpt2, []),
    "gpt2_lora": (lora_gpt2, []),
    "lingua_declared": (LinguaLM, [("tok_embeddings.weight", "output.weight")]),
}


def forward_loss(model, batch):
    out = model(batch["input_ids"])
    logits = out.logits if hasattr(out, "logits") else out
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


@pytest.mark.parametrize("family", list(REGISTRY))
@pytest.mark.parametrize("setup", list(HEALTHY))
def test_check_is_clean_read_only_and_stateful(family, setup, tmp_path):
    build, declared = HEALTHY[setup]
    model = build()
    model.train()
    only = {name: {"enabled": name == family} for name in REGISTRY}
    monitor = Monitor(policy="log", declare_ties=declared, checks=only)
    assert [c.name for c in monitor.checks] == [family]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    findings = []

    def dispatch(event, **ctx):
        before = snapshot(model)
        findings.extend(monitor.dispatch(event, model, optimizer=optimizer, **ctx))
        assert_unchanged(before, snapshot(model))

    dispatch("init", step=0)
    for step, batch in enumerate(lm_batches(2), start=1):
        forward_loss(model, batch).backward()
        dispatch("step", step=step, phase="before_optimizer", grads_clipped=False)
        optimizer.step()
        dispatch("step", step=step, phase="after_optimizer")
        optimizer.zero_grad()
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(tmp_path / "ckpt")
        files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
        stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").iterdir()}
        dispatch("checkpoint", step=2, checkpoint_dir=str(tmp_path / "ckpt"))
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == files, "checkpoint folder changed"
        assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").iterdir()}
    else:
        dispatch("checkpoint", step=2, state_dict=model.state_dict())
    dispatch("load", step=2, state_dict=model.state_dict())
    dispatch("end", step=2)

    assert [f for f in findings if f.severity != "info"] == []
    state = pickle.loads(pickle.dumps(monitor.state_dict()))
    fresh = Monitor(policy="log", declare_ties=declared, checks=only)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == monitor.state_dict()
