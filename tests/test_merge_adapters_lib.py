"""Checked merges of the `adapters` library (runs in .venv-adapters: transformers 4.57 + adapters 1.3)."""

import warnings

import pytest
import torch

adapters = pytest.importorskip("adapters")
from adapters import LoRAConfig, SeqBnConfig  # noqa: E402
from transformers import BertConfig, BertForMaskedLM  # noqa: E402

from callbacks import Monitor  # noqa: E402
from callbacks.merging import install_merge_watch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def bert_with(name, config):
    """A tiny BertForMaskedLM with one `adapters` adapter, active."""
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=64))
    adapters.init(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter(name, config=config)
    model.set_active_adapters(name)
    return model


def query_layer(model, i=0):
    return model.bert.encoder.layer[i].attention.self.query


def test_lora_merge_and_reset_round_trip_is_clean():
    model = bert_with("lora", LoRAConfig(r=4, alpha=8, init_weights="bert"))  # non-zero B: the merge changes W
    base = query_layer(model).weight.detach().clone()
    active = model.adapters_config.active_setup
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    mon = Monitor(policy="raise")
    mon.checked_merge(model, "merge_adapter", name="lora")
    assert query_layer(model).merged == "lora"  # the probes did not reset (unmerge) the LoRA
    assert not torch.equal(query_layer(model).weight, base)
    mon.checked_merge(model, "reset_adapter")
    assert mon.findings == []
    assert torch.allclose(query_layer(model).weight, base, atol=1e-6)
    assert model.adapters_config.active_setup == active
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
    merge, reset = mon.check("merge").merges
    assert (merge["layers"], merge["changed"], reset["changed"]) == (4, 4, 4)


def test_bottleneck_merge_merges_nothing():
    model = bert_with("bn", SeqBnConfig())  # default init "bert": the adapter changes the output
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mon = Monitor(policy="log")
    mon.checked_merge(model, "merge_adapter", name="bn")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the library did nothing
    (mismatch,) = mon.findings
    assert mismatch.code == "MERGE_MISMATCH" and mismatch.event == "merge"
    assert mismatch.details["cause"] == "nothing_merged" and "LoRA" in mismatch.hint


def test_dora_reset_does_not_restore_the_base_weights():
    # adapters 1.3.0: LoRALinear.reset_adapter computes the DoRA inverse but never writes it back
    model = bert_with("dora", LoRAConfig(r=4, alpha=8, init_weights="bert", use_dora=True))
    base = query_layer(model).weight.detach().clone()
    mon = Monitor(policy="log")
    mon.checked_merge(model, "merge_adapter", name="dora")
    # and its DoRA merge computes another function than its DoRA forward (same 6e-4 in float64)
    (merge,) = [f for f in mon.findings if f.code == "MERGE_MISMATCH"]
    assert merge.details["cause"] == "formula" and merge.details["relative"] > 1e-4
    merged = query_layer(model).weight.detach().clone()
    mon.checked_merge(model, "reset_adapter")
    if torch.allclose(query_layer(model).weight, base, atol=1e-6):
        pytest.skip("this adapters version restores DoRA weights on reset")
    assert torch.equal(query_layer(model).weight, merged)
    unmerge = [f for f in mon.findings if f.code == "UNMERGE_MISMATCH"]
    assert unmerge and unmerge[0].details["cause"] == "unmerge_weights"
    assert "bert.encoder.layer.0.attention.self.query.weight" in unmerge[0].params


def test_watch_checks_the_users_merge_adapter_call():
    model = bert_with("bn", SeqBnConfig())
    mon = Monitor(policy="log", checks={"merge": {"watch": True}})
    handle = install_merge_watch(mon, model)
    assert handle.active
    model.merge_adapter("bn")
    assert [f.code for f in mon.findings] == ["MERGE_MISMATCH"]
    handle.remove()
    assert "merge_adapter" not in model.__dict__
