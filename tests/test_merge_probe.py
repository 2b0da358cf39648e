"""The probe primitive: synthetic batches from configs, runs that leave no trace."""

import random

import numpy as np
import pytest
import torch
from models import LinguaLM, tiny_gemma2, tiny_vit_classifier
from torch import nn
from untouched import assert_unchanged, snapshot

from callbacks.primitives.probe import ProbeUnavailable, build_probe_batch, output_tensor, run_probe


def test_text_model_batch_comes_from_its_config_without_touching_the_global_rng():
    model = tiny_gemma2()
    state = torch.get_rng_state()
    batch = build_probe_batch(model, batch_size=3, seq_len=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert batch["input_ids"].shape == (3, 5) and int(batch["input_ids"].max()) < model.config.vocab_size
    assert torch.equal(batch["attention_mask"], torch.ones(3, 5, dtype=torch.long))
    assert torch.equal(build_probe_batch(model, batch_size=3, seq_len=5)["input_ids"], batch["input_ids"])


def test_vision_model_gets_pixel_values():
    model = tiny_vit_classifier()
    batch = build_probe_batch(model)
    assert set(batch) == {"pixel_values"} and batch["pixel_values"].shape == (2, 3, 16, 16)
    assert run_probe(model, batch).shape == (2, 3)


def test_model_without_config_uses_its_embedding_vocabulary():
    model = LinguaLM(vocab=40)
    batch = build_probe_batch(model)
    assert set(batch) == {"input_ids"} and int(batch["input_ids"].max()) < 40
    assert run_probe(model, batch).shape == (2, 8, 40)


def test_model_without_any_input_hint_is_unavailable():
    with pytest.raises(ProbeUnavailable):
        build_probe_batch(nn.Sequential(nn.Linear(4, 4)))


def test_run_probe_leaves_modes_rng_grads_and_flags_untouched():
    model = LinguaLM()
    model.train()
    model.layers[0].eval()
    model.layers[1][1].weight.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    dropout = nn.Dropout(0.5)  # a random op in the forward would consume RNG if the probe let it
    model.layers[0].append(dropout)
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    before = snapshot(model)
    out = run_probe(model, build_probe_batch(model))
    assert not out.requires_grad
    assert_unchanged(before, snapshot(model))
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    # eval mode inside: two probes agree although the model is in train mode with dropout
    assert torch.equal(out, run_probe(model, build_probe_batch(model)))


def test_output_tensor_finds_logits_or_the_first_tensor():
    logits = torch.zeros(2)
    assert output_tensor(logits) is logits
    assert output_tensor((None, logits)) is logits
    assert output_tensor({"loss": None, "logits": logits}) is logits
    with pytest.raises(ProbeUnavailable):
        output_tensor((None, "text"))
