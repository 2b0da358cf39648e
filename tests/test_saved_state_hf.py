"""Saved-state coverage inside real HF Trainer runs: the ViT + LoRA position_embeddings case and its twins."""

from __future__ import annotations

import os
import warnings

import pytest
from models import ImageDataset, TokenDataset, tiny_gpt2, tiny_vit_classifier
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from callbacks import IntegrityError
from callbacks.hf import IntegrityCallback
from callbacks.primitives.checkpoints import list_checkpoint

ONLY_SAVED_STATE = {name: {"enabled": False} for name in ("ties", "adapter_init", "hashes", "merge")}


def vit_lora(modules_to_save):
    """The issue's setup: LoRA on q/v, ``modules_to_save`` as given, position_embeddings unfrozen by hand."""
    model = tiny_vit_classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"],
                                                      modules_to_save=modules_to_save))
    peft_model.base_model.model.vit.embeddings.position_embeddings.requires_grad_(True)
    return peft_model


def train(model, tmp_path, callback, dataset, max_steps=2, save_steps=1):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             save_steps=save_steps, report_to=[], logging_steps=1000, use_cpu=True,
                             disable_tqdm=True, learning_rate=1e-2, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    return trainer


def saved_state_findings(callback):
    return [f for f in callback.findings if f.check == "saved_state"]


def test_vit_lora_position_embeddings_unsaved_at_init_and_first_checkpoint(tmp_path):
    model = vit_lora(["classifier", "position_embeddings"])
    assert sum(p.requires_grad for p in model.parameters()) == 11
    callback = IntegrityCallback(policy="log", checks=ONLY_SAVED_STATE)
    train(model, tmp_path, callback, ImageDataset(), max_steps=2, save_steps=1)
    found = saved_state_findings(callback)
    assert [(f.code, f.event, f.step, f.params) for f in found] == [
        ("UNSAVED_TRAINABLE", "init", 0, ("vit.embeddings.position_embeddings",)),
        ("UNSAVED_TRAINABLE", "checkpoint", 1, ("vit.embeddings.position_embeddings",)),
        ("UNSAVED_TRAINABLE", "checkpoint", 2, ("vit.embeddings.position_embeddings",)),
    ]
    at_checkpoint = found[1]
    adapter_file = os.path.join(str(tmp_path), "checkpoint-1", "adapter_model.safetensors")
    assert at_checkpoint.details["files"] == [adapter_file]
    assert "11 trainable tensors, 10 saved" in at_checkpoint.message
    assert "'vit.embeddings', to modules_to_save" in at_checkpoint.hint
    assert "'position_embeddings' names a Parameter" in at_checkpoint.hint


def test_vit_lora_policy_raise_stops_before_training(tmp_path):
    callback = IntegrityCallback(checks=ONLY_SAVED_STATE)  # policy raise
    with pytest.raises(IntegrityError) as info:
        train(vit_lora(["classifier", "position_embeddings"]), tmp_path, callback, ImageDataset())
    (finding,) = info.value.findings
    assert (finding.code, finding.event, finding.step) == ("UNSAVED_TRAINABLE", "init", 0)
    assert not os.path.exists(os.path.join(str(tmp_path), "checkpoint-1"))


def test_vit_lora_with_parent_module_in_modules_to_save_is_clean(tmp_path):
    callback = IntegrityCallback(policy="log", checks={**ONLY_SAVED_STATE, "saved_state": {"verify_values": True}})
    train(vit_lora(["classifier", "embeddings"]), tmp_path, callback, ImageDataset(), max_steps=2, save_steps=1)
    assert saved_state_findings(callback) == []
    coverage = callback.report.sections["saved_state"]["coverage"]
    assert [(c["event"], c["step"], c["unsaved"]) for c in coverage] == [
        ("init", 0, []), ("checkpoint", 1, []), ("checkpoint", 2, [])]
    assert coverage[1]["trainable"] == coverage[1]["keys"] > 10


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_full_fine_tune_safetensors_clean(tmp_path, tie):
    """save_pretrained drops lm_head.weight of the tied model on purpose: its partner is saved and aliased."""
    callback = IntegrityCallback(policy="raise", checks={"saved_state": {"verify_values": True}})
    train(tiny_gpt2(tie=tie), tmp_path, callback, TokenDataset(n=8), max_steps=2, save_steps=2)
    assert [f for f in callback.findings if f.severity != "info"] == []
    coverage = callback.report.sections["saved_state"]["coverage"]
    assert [c["event"] for c in coverage] == ["init", "checkpoint"]
    written = os.path.join(str(tmp_path), "checkpoint-2", "model.safetensors")
    assert coverage[1]["files"] == [written]
    assert ("lm_head.weight" in list_checkpoint(written).keys) == (not tie)  # the tied copy is dropped on purpose
