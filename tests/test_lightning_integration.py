"""The Lightning integration in real Lightning Trainer runs: event order, meta-device ties, resume, state."""

import glob
import logging

import pytest
import pytorch_lightning as pl
import torch
from models import LinguaLM, hf_lightning_module, lm_batches
from recording import RecordingCheck
from torch import nn

from callbacks import IntegrityError
from callbacks.lightning import IntegrityCallback

DECLARED = [("model.tok_embeddings.weight", "model.output.weight")]
ONLY_TIES = {name: {"enabled": False} for name in ("adapter_init", "saved_state", "hashes", "merge")}

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


class LinguaModule(pl.LightningModule):
    """LinguaLM trained as a causal LM; ``meta_init`` builds it on the meta device in ``configure_model``."""

    def __init__(self, meta_init=False):
        super().__init__()
        self.meta_init = meta_init
        self.model = None if meta_init else LinguaLM()

    def configure_model(self):
        if self.model is None:
            with torch.device("meta"):
                self.model = LinguaLM()
            self.model.to_empty(device="cpu")  # materialise: the hand-written tie does not survive
            for p in self.model.parameters():
                nn.init.normal_(p, std=0.02)

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["input_ids"])
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def fit(module, tmp_path, callbacks, max_steps=4, ckpt_path=None, **kwargs):
    trainer = pl.Trainer(max_steps=max_steps, callbacks=callbacks, default_root_dir=str(tmp_path), logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **kwargs)
    loader = torch.utils.data.DataLoader(lm_batches(16), batch_size=None)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


def test_event_order_acts_only_when_the_optimizer_stepped(tmp_path):
    recorder = RecordingCheck()
    callback = IntegrityCallback(policy="log", extra_checks=[recorder])
    fit(LinguaModule(), tmp_path, [callback], max_steps=2, accumulate_grad_batches=2)
    assert recorder.seen == [
        ("init", None, 0),
        ("step", "before_optimizer", 1), ("step", "after_optimizer", 1),
        ("step", "before_optimizer", 2), ("step", "after_optimizer", 2),
        ("checkpoint", None, 2),
        ("end", None, 2),
    ]
    assert recorder.clipped == [False, False]  # Lightning's hook runs before clipping


def test_healthy_hand_tied_model_is_clean(tmp_path):
    callback = IntegrityCallback(declare_ties=DECLARED)  # policy raise, every check at its defaults
    fit(LinguaModule(), tmp_path, [callback])
    assert [f for f in callback.findings if f.severity != "info"] == []


def test_meta_device_model_built_in_configure_model_has_broken_tie(tmp_path):
    callback = IntegrityCallback(declare_ties=DECLARED, checks=ONLY_TIES)
    with pytest.raises(IntegrityError) as info:
        fit(LinguaModule(meta_init=True), tmp_path, [callback])
    (finding,) = info.value.findings
    assert (finding.code, finding.event, finding.step) == ("TIE_BROKEN", "init", 0)
    assert finding.params == ("model.output.weight", "model.tok_embeddings.weight")


def test_resume_with_conflicting_tied_values_and_restored_state(tmp_path):
    first = IntegrityCallback(policy="log", declare_ties=DECLARED, checks=ONLY_TIES)
    fit(LinguaModule(), tmp_path / "a", [first], max_steps=2)
    (ckpt,) = glob.glob(str(tmp_path / "a" / "**" / "*.ckpt"), recursive=True)
    checkpoint = torch.load(ckpt, weights_only=True)
    assert first.state_key in checkpoint["callbacks"]
    state = checkpoint["state_dict"]
    state["model.output.weight"] = state["model.tok_embeddings.weight"] + 1.0  # a checkpoint edited elsewhere
    torch.save(checkpoint, tmp_path / "edited.ckpt")

    resumed = IntegrityCallback(policy="log", declare_ties=DECLARED, checks=ONLY_TIES)
    fit(LinguaModule(), tmp_path / "b", [resumed], max_steps=3, ckpt_path=str(tmp_path / "edited.ckpt"))
    conflicts = [f for f in resumed.findings if f.code == "TIE_CHECKPOINT_CONFLICT"]
    assert len(conflicts) == 1
    assert (conflicts[0].event, conflicts[0].step) == ("load", 2)
    assert conflicts[0].params == ("model.output.weight", "model.tok_embeddings.weight")


def test_resume_from_untouched_checkpoint_is_clean(tmp_path):
    fit(LinguaModule(), tmp_path / "a", [IntegrityCallback(policy="log", declare_ties=DECLARED)], max_steps=2)
    (ckpt,) = glob.glob(str(tmp_path / "a" / "**" / "*.ckpt"), recursive=True)
    resumed = IntegrityCallback(policy="log", declare_ties=DECLARED)
    fit(LinguaModule(), tmp_path / "b", [resumed], max_steps=3, ckpt_path=ckpt)
    assert [f for f in resumed.findings if f.severity != "info"] == []


def test_two_callbacks_keep_separate_state(tmp_path):
    a = IntegrityCallback(policy="log", declare_ties=DECLARED)
    b = IntegrityCallback(policy="log", checks={"ties": {"every_n_steps": 2}})
    assert a.state_key != b.state_key
    assert a.state_key == IntegrityCallback(policy="log", declare_ties=DECLARED).state_key
    fit(LinguaModule(), tmp_path, [a, b], max_steps=1)
    (ckpt,) = glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
    stored = torch.load(ckpt, weights_only=True)["callbacks"]
    assert {a.state_key, b.state_key} <= set(stored)


@pytest.mark.parametrize("peft", [False, True], ids=["plain", "lora"])
def test_hf_config_ties_are_expected_inside_a_lightning_module(tmp_path, peft):
    from models import tiny_gemma2

    model = tiny_gemma2(tie=True)
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    inner = model.get_base_model() if peft else model
    inner.lm_head.weight = nn.Parameter(inner.lm_head.weight.detach().clone())  # the head replaced
    callback = IntegrityCallback(policy="log", checks=ONLY_TIES)
    fit(hf_lightning_module(model), tmp_path, [callback], max_steps=1)
    broken = [f for f in callback.findings if f.code == "TIE_BROKEN"]
    expected = ("model.lm_head.weight", "model.model.embed_tokens.weight")
    assert [(f.event, f.params) for f in broken] == [("init", expected)]
