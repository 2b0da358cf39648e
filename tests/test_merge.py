"""Checked merge: real PEFT merges of tiny models, each failure reproduced and asserted, each twin clean."""

from __future__ import annotations

import copy
import random
import warnings

import numpy as np
import peft
import pytest
import torch
from models import LinguaLM, tiny_bert_mlm, tiny_gemma2
from packaging.version import Version
from peft import LoraConfig, get_peft_model
from torch import nn
from untouched import assert_unchanged, snapshot

from callbacks import ConfigError, IntegrityError, Monitor
from callbacks.merging import checked_merge, install_merge_watch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def lora(model, targets, **kwargs):
    """PEFT LoRA with non-zero B (init_lora_weights=False), so that every merge changes its targets."""
    kwargs.setdefault("init_lora_weights", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kwargs))


def codes(findings):
    return sorted(f.code for f in findings)


def by_code(findings, code):
    return [f for f in findings if f.code == code]


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- tied heads: the failures this check exists for ----------------------------------------------------------------

def test_gemma2_tied_lm_head_merge_rewrites_embeddings():
    pm = lora(tiny_gemma2(tie=True), ["lm_head"])
    embed_before = pm.base_model.model.model.embed_tokens.weight.detach().clone()
    mon = Monitor(policy="log")
    merged = mon.checked_merge(pm, step=7)
    # the failure is real: PEFT rewrote the input embeddings through the tie
    assert not torch.equal(merged.model.embed_tokens.weight, embed_before)

    (side,) = by_code(mon.findings, "MERGE_SIDE_EFFECT")
    assert side.params == ("model.embed_tokens.weight",)
    assert side.event == "merge" and side.step == 7 and side.check == "merge"
    assert side.details["via"] == ["lm_head.weight"]
    assert "tied to lm_head.weight" in side.message
    assert "tie_word_embeddings" in side.hint and "target_modules" in side.hint

    (mismatch,) = by_code(mon.findings, "MERGE_MISMATCH")
    assert mismatch.params == ("model.embed_tokens.weight",) and mismatch.details["cause"] == "side_effect"
    assert mismatch.details["relative"] > mismatch.details["tolerance"]

    (tie,) = by_code(mon.findings, "TIE_BROKEN")
    assert tie.event == "merge" and tie.check == "merge"
    assert set(tie.params) == {"lm_head.weight", "model.embed_tokens.weight"}
    assert tie.details["merged"] == ["lm_head.weight"] and tie.details["unmerged"] == ["model.embed_tokens.weight"]


def test_gemma2_untied_lm_head_merge_is_clean():
    pm = lora(tiny_gemma2(tie=False), ["lm_head"])
    embed_before = pm.base_model.model.model.embed_tokens.weight.detach().clone()
    mon = Monitor(policy="raise")
    merged = mon.checked_merge(pm)
    assert mon.findings == []
    assert torch.equal(merged.model.embed_tokens.weight, embed_before)
    assert isinstance(merged.lm_head, nn.Linear)
    assert mon.check("merge").merges[0]["changed"] == 1


def test_policy_raise_stops_at_the_tied_merge():
    pm = lora(tiny_gemma2(tie=True), ["lm_head"])
    with pytest.raises(IntegrityError) as err:
        Monitor(policy="raise").checked_merge(pm)
    assert "MERGE_SIDE_EFFECT" in {f.code for f in err.value.findings}


def test_bert_mlm_decoder_targeted_rewrites_word_embeddings():
    pm = lora(tiny_bert_mlm(), ["decoder"])
    mon = Monitor(policy="log")
    mon.checked_merge(pm)
    (side,) = by_code(mon.findings, "MERGE_SIDE_EFFECT")
    assert side.params == ("bert.embeddings.word_embeddings.weight",)
    assert side.details["via"] == ["cls.predictions.decoder.weight"]
    assert by_code(mon.findings, "MERGE_MISMATCH")


def test_bert_mlm_attention_targets_are_clean():
    pm = lora(tiny_bert_mlm(), ["query", "value"])
    mon = Monitor(policy="log")
    mon.checked_merge(pm)
    assert mon.findings == []


def test_lora_on_embed_tokens_of_tied_model_rewrites_lm_head():
    pm = lora(tiny_gemma2(tie=True), ["embed_tokens"])
    mon = Monitor(policy="log")
    mon.checked_merge(pm)
    (side,) = by_code(mon.findings, "MERGE_SIDE_EFFECT")
    assert side.params == ("lm_head.weight",)
    assert side.details["via"] == ["model.embed_tokens.weight"]
    assert by_code(mon.findings, "MERGE_MISMATCH")
    assert by_code(mon.findings, "TIE_BROKEN")


def test_lora_on_embed_tokens_of_untied_model_is_clean():
    pm = lora(tiny_gemma2(tie=False), ["embed_tokens"])
    mon = Monitor(policy="log")
    mon.checked_merge(pm)
    assert mon.findings == []


def test_ensure_weight_tying_merge_adds_the_delta_twice():
    # peft 0.21.2: both tied layers are targets sharing one adapter; merge_and_unload merges each into the one
    # shared tensor, so the delta lands twice. Nothing outside the targets changed: only the probe sees it.
    pm = lora(tiny_gemma2(tie=True), ["lm_head"], ensure_weight_tying=True)
    head = pm.base_model.model.lm_head
    expected = head.base_layer.weight.detach() + head.get_delta_weight("default")
    mon = Monitor(policy="log")
    merged = mon.checked_merge(pm)
    if torch.allclose(merged.lm_head.weight, expected, atol=1e-5):
        pytest.skip("this PEFT merges tied adapters once")
    assert by_code(mon.findings, "MERGE_SIDE_EFFECT") == []
    (mismatch,) = by_code(mon.findings, "MERGE_MISMATCH")
    assert mismatch.details["cause"] == "double_merge"
    assert set(mismatch.params) == {"lm_head.weight", "model.embed_tokens.weight"}


# -- ties lost by a merge -------------------------------------------------------------------------------------------

def storage_tied_lingua():
    """LinguaLM whose head is a second Parameter object viewing the embedding's memory (a tie by storage)."""
    torch.manual_seed(0)
    model = LinguaLM(tie=False)
    model.output.weight = nn.Parameter(model.tok_embeddings.weight.data)
    return model


#: PEFT before 0.22 merged with safe_merge into a new Parameter (a storage tie lost one side); 0.22 writes in place
PEFT_SAFE_MERGE_REPLACES_THE_WEIGHT = Version(peft.__version__) < Version("0.22.0")


def test_safe_merge_replaces_one_side_of_a_storage_tie():
    model = storage_tied_lingua()
    pm = lora(model, ["output"])
    mon = Monitor(policy="log")
    mon.checked_merge(pm, safe_merge=True)
    (tie,) = by_code(mon.findings, "TIE_BROKEN")
    assert set(tie.params) == {"output.weight", "tok_embeddings.weight"}
    if not PEFT_SAFE_MERGE_REPLACES_THE_WEIGHT:  # in place: the tie now gives the embedding the delta too
        assert tie.details["cause"] == "tie_binds"
        (side,) = by_code(mon.findings, "MERGE_SIDE_EFFECT")
        assert side.params == ("tok_embeddings.weight",) and side.details["via"] == ["output.weight"]
        return
    assert tie.details["cause"] == "tie_lost"
    assert by_code(mon.findings, "MERGE_SIDE_EFFECT") == []  # the embedding kept its values


def test_in_place_merge_of_a_storage_tie_is_a_side_effect():
    pm = lora(storage_tied_lingua(), ["output"])
    mon = Monitor(policy="log")
    mon.checked_merge(pm)
    (side,) = by_code(mon.findings, "MERGE_SIDE_EFFECT")
    assert side.params == ("tok_embeddings.weight",) and side.details["via"] == ["output.weight"]


def test_lost_expected_tie_is_reported_once_with_the_tie_check():
    model = storage_tied_lingua()
    pm = lora(model, ["output"])
    mon = Monitor(policy="log", declare_ties=[("tok_embeddings.weight", "output.weight")])
    mon.dispatch("init", pm)
    assert [f for f in mon.findings if f.severity != "info"] == []
    mon.checked_merge(pm, safe_merge=True)
    ties = by_code(mon.findings, "TIE_BROKEN")
    # the tie is lost (PEFT < 0.22): the tie check reports its expected tie; kept and binding the merged weight
    # (PEFT 0.22 merges in place): the merge check reports it; either way once
    reporter = "ties" if PEFT_SAFE_MERGE_REPLACES_THE_WEIGHT else "merge"
    assert len(ties) == 1 and ties[0].event == "merge" and ties[0].check == reporter


def test_tie_check_sees_no_false_break_after_merge_and_unload():
    # init saw `base_model.model.lm_head.base_layer.weight`; after unloading the name is `...lm_head.weight`
    pm = lora(tiny_gemma2(tie=True), ["q_proj", "v_proj"])
    mon = Monitor(policy="raise")
    mon.dispatch("init", pm)
    mon.checked_merge(pm)
    assert [f for f in mon.findings if f.severity != "info"] == []


def test_tied_head_merge_after_init_is_reported_by_the_merge_check_only():
    # init saw `lm_head.base_layer.weight`; the tie itself still holds after the merge (one tensor): the tie check
    # finds nothing to report, the merge check reports what the merge did through it
    pm = lora(tiny_gemma2(tie=True), ["lm_head"])
    mon = Monitor(policy="log")
    mon.dispatch("init", pm)
    mon.checked_merge(pm)
    merge_findings = [f for f in mon.findings if f.event == "merge"]
    assert {f.check for f in merge_findings} == {"merge"}
    assert {f.code for f in merge_findings} == {"MERGE_SIDE_EFFECT", "MERGE_MISMATCH", "TIE_BROKEN"}


# -- healthy merges: DoRA, several adapters, merge_adapter ---------------------------------------------------------

def test_dora_merge_is_clean():
    pm = lora(tiny_gemma2(tie=True), ["q_proj", "v_proj", "o_proj"], use_dora=True)
    mon = Monitor(policy="raise")
    mon.checked_merge(pm)
    assert mon.findings == []
    assert mon.check("merge").merges[0]["changed"] == 6


def test_dora_adapters_merged_together_with_a_lora_are_clean():
    pm = lora(tiny_gemma2(tie=False), ["q_proj", "v_proj"], use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("second", LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False,
                                            use_dora=True))
        pm.add_adapter("third", LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    mon = Monitor(policy="raise")
    mon.checked_merge(pm, adapter_names=["default", "second", "third"])
    assert mon.findings == []
    assert mon.check("merge").merges[0]["changed"] == 6


def test_several_adapters_merged_together_are_probed_together():
    pm = lora(tiny_gemma2(tie=False), ["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "v_proj"],
                                            init_lora_weights=False))
    assert pm.active_adapters == ["default"]  # "second" is merged without ever being active
    requires_grad = {n: p.requires_grad for n, p in pm.named_parameters()}
    mon = Monitor(policy="raise")
    mon.checked_merge(pm, "merge_adapter", adapter_names=["default", "second"])
    assert mon.findings == []
    record = mon.check("merge").merges[0]
    assert record["adapters"] == ["default", "second"] and record["layers"] == 6 and record["changed"] == 6
    # the probe's adapter switch left the active adapter and requires_grad as they were
    assert pm.active_adapters == ["default"]
    assert {n: p.requires_grad for n, p in pm.named_parameters()} == requires_grad


def test_several_adapters_merge_and_unload_with_adapter_names():
    pm = lora(tiny_gemma2(tie=False), ["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("second", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    mon = Monitor(policy="raise")
    merged = mon.checked_merge(pm, adapter_names=["default", "second"])
    assert mon.findings == [] and isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)


# -- NaN adapters --------------------------------------------------------------------------------------------------

def poison(pm, layer: int):
    with torch.no_grad():
        pm.base_model.model.model.layers[layer].self_attn.q_proj.lora_B["default"].weight[0, 0] = float("nan")


def test_nan_adapter_merged_without_safe_merge_writes_nan():
    pm = lora(tiny_gemma2(tie=False), ["q_proj"])
    poison(pm, 1)
    mon = Monitor(policy="log")
    merged = mon.checked_merge(pm)
    assert torch.isnan(merged.model.layers[1].self_attn.q_proj.weight).any()
    (mismatch,) = by_code(mon.findings, "MERGE_MISMATCH")
    assert mismatch.params == ("model.layers.1.self_attn.q_proj.weight",)
    assert mismatch.details["cause"] == "nonfinite" and "safe_merge=True" in mismatch.hint
    assert by_code(mon.findings, "MERGE_SIDE_EFFECT") == []


def test_nan_adapter_with_safe_merge_on_the_first_layer_changes_nothing():
    pm = lora(tiny_gemma2(tie=False), ["q_proj"])
    poison(pm, 0)
    before = {n.replace(".base_layer", ""): p.detach().clone() for n, p in pm.base_model.model.named_parameters()
              if "lora_" not in n}
    mon = Monitor(policy="log")
    with pytest.raises(ValueError, match="NaN"):
        mon.checked_merge(pm, safe_merge=True)
    assert mon.findings == []
    after = {n.replace(".base_layer", ""): p for n, p in pm.base_model.model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_nan_adapter_with_safe_merge_after_a_merged_layer_is_a_partial_merge():
    pm = lora(tiny_gemma2(tie=False), ["q_proj"])
    poison(pm, 1)
    mon = Monitor(policy="log")
    with pytest.raises(ValueError, match="NaN"):
        mon.checked_merge(pm, safe_merge=True)
    (partial,) = by_code(mon.findings, "MERGE_MISMATCH")
    assert partial.details["cause"] == "partial"
    assert partial.params == ("model.layers.0.self_attn.q_proj.weight",)


def test_partial_merge_under_policy_raise_chains_the_merge_error():
    pm = lora(tiny_gemma2(tie=False), ["q_proj"])
    poison(pm, 1)
    with pytest.raises(IntegrityError) as err:
        Monitor(policy="raise").checked_merge(pm, safe_merge=True)
    assert isinstance(err.value.__cause__, ValueError)


# -- unmerge -------------------------------------------------------------------------------------------------------

def test_merge_unmerge_round_trip_is_clean():
    pm = lora(tiny_gemma2(tie=True), ["q_proj", "v_proj", "gate_proj"])
    base = {n: p.detach().clone() for n, p in pm.named_parameters() if "base_layer" in n}
    mon = Monitor(policy="raise")
    assert mon.checked_merge(pm, "merge_adapter") is pm
    assert any(not torch.equal(p, base[n]) for n, p in pm.named_parameters() if n in base)
    assert mon.checked_merge(pm, "unmerge_adapter") is pm
    assert mon.findings == []
    assert all(torch.allclose(p, base[n], atol=1e-6) for n, p in pm.named_parameters() if n in base)
    assert mon.check("merge").record.weights == {}  # the recorded base weights are released at unmerge


def test_training_while_merged_breaks_the_unmerge():
    pm = lora(tiny_gemma2(tie=False), ["q_proj", "v_proj"])
    mon = Monitor(policy="log")
    mon.checked_merge(pm, "merge_adapter")
    with torch.no_grad():  # an optimizer step on the adapter while its delta sits in the base weights
        pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(0.5)
    mon.checked_merge(pm, "unmerge_adapter")
    unmerge = by_code(mon.findings, "UNMERGE_MISMATCH")
    weights_finding = [f for f in unmerge if "relative" in f.details and isinstance(f.details["relative"], dict)]
    assert len(weights_finding) == 1
    assert weights_finding[0].params == ("model.layers.0.self_attn.q_proj.weight",)
    assert "while merged" in weights_finding[0].hint
    assert by_code(mon.findings, "MERGE_SIDE_EFFECT") == []


def test_tied_head_merge_is_reported_and_its_unmerge_restores_it():
    pm = lora(tiny_gemma2(tie=True), ["lm_head"])
    embed = pm.base_model.model.model.embed_tokens.weight.detach().clone()
    mon = Monitor(policy="log")
    mon.checked_merge(pm, "merge_adapter")
    merge_findings = mon.findings
    assert {f.code for f in merge_findings} == {"MERGE_SIDE_EFFECT", "MERGE_MISMATCH", "TIE_BROKEN"}
    mon.checked_merge(pm, "unmerge_adapter")
    # the unmerge moved the embedding back (not a new side effect) and the adapter model is whole again
    assert mon.findings == merge_findings
    assert torch.allclose(pm.base_model.model.model.embed_tokens.weight, embed, atol=1e-6)


def test_unmerge_without_a_checked_merge_is_judged_by_the_probe():
    pm = lora(tiny_gemma2(tie=False), ["q_proj"])
    pm.merge_adapter()  # not checked: no record of the weights before
    mon = Monitor(policy="raise")
    mon.checked_merge(pm, "unmerge_adapter")
    assert mon.findings == []
    assert mon.check("merge").merges[0]["probe"] == "compared"


# -- read-only -----------------------------------------------------------------------------------------------------

def test_checked_merge_leaves_rng_modes_grads_and_requires_grad_untouched():
    pm = lora(tiny_gemma2(tie=False), ["q_proj", "v_proj"], lora_dropout=0.1)
    pm.train()
    pm.base_model.model.model.layers[0].mlp.eval()  # a mixed state must survive too
    for p in pm.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.25)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    before = snapshot(pm)

    mon = Monitor(policy="raise")
    mon.checked_merge(pm, "merge_adapter")
    mon.checked_merge(pm, "unmerge_adapter")

    # the weights went through merge and unmerge (restored within rounding); everything else is bitwise as it was
    assert_unchanged(before, snapshot(pm), params=False)


def test_checked_merge_rejects_a_model_without_adapters():
    with pytest.raises(ConfigError, match="PEFT model"):
        checked_merge(Monitor(policy="log"), tiny_gemma2())
    pm = lora(tiny_gemma2(), ["q_proj"])
    with pytest.raises(ConfigError, match="merge_and_unload"):
        Monitor(policy="log").checked_merge(pm, "merge_everything")


def test_merge_check_disabled_still_merges_and_dispatches():
    pm = lora(tiny_gemma2(tie=True), ["lm_head"])
    mon = Monitor(policy="log", checks={"merge": {"enabled": False}})
    merged = mon.checked_merge(pm)
    assert isinstance(merged.lm_head, nn.Linear) and mon.findings == []


def test_probe_tolerance_is_configurable():
    pm = lora(tiny_gemma2(tie=False), ["q_proj"])
    mon = Monitor(policy="log", checks={"merge": {"tolerance": 0.0}})  # any rounding is now a mismatch
    mon.checked_merge(pm)
    (mismatch,) = by_code(mon.findings, "MERGE_MISMATCH")
    assert mismatch.details["cause"] == "numeric" and mismatch.details["tolerance"] == 0.0


# -- watching ------------------------------------------------------------------------------------------------------

def test_watch_checks_the_users_own_merge_and_is_removed_at_teardown():
    pm = lora(tiny_gemma2(tie=True), ["lm_head"])
    mon = Monitor(policy="log", checks={"merge": {"watch": True}})
    handle = install_merge_watch(mon, pm, step=lambda: 11)
    assert handle.active
    pm.merge_adapter()  # the user's code, unchanged
    assert {f.code for f in mon.findings} >= {"MERGE_SIDE_EFFECT", "TIE_BROKEN"}
    assert all(f.step == 11 for f in mon.findings)
    count = len(mon.findings)
    handle.remove()
    assert not handle.active and "merge_and_unload" not in pm.__dict__
    pm.unmerge_adapter()
    pm.merge_and_unload()
    assert len(mon.findings) == count  # no longer watched


def test_watch_is_off_unless_the_recipe_asks():
    pm = lora(tiny_gemma2(tie=True), ["lm_head"])
    mon = Monitor(policy="log")
    handle = install_merge_watch(mon, pm)
    assert not handle.active
    pm.merge_and_unload()
    assert mon.findings == []
    handle.remove()  # always safe


def test_watch_finds_the_peft_model_inside_a_container_and_does_not_check_twice():
    class Wrapper(nn.Module):  # a LightningModule holds the PEFT model as an attribute
        def __init__(self, model):
            super().__init__()
            self.model = model

    pm = lora(tiny_gemma2(tie=True), ["lm_head"])
    mon = Monitor(policy="log", checks={"merge": {"watch": True}})
    handle = install_merge_watch(mon, Wrapper(pm))
    again = install_merge_watch(mon, pm)  # a second callback on the same model wraps nothing more
    assert handle.active and not again.active
    merged = pm.merge_and_unload()
    assert isinstance(merged.lm_head, nn.Linear)
    assert len(by_code(mon.findings, "MERGE_SIDE_EFFECT")) == 1
    handle.remove()


def test_a_copy_of_a_watched_model_merges_on_its_own_unchecked():
    pm = lora(tiny_gemma2(tie=False), ["q_proj"])
    mon = Monitor(policy="log", checks={"merge": {"watch": True}})
    handle = install_merge_watch(mon, pm)
    original = weights(pm)
    clone = copy.deepcopy(pm)
    clone.merge_and_unload()
    assert all(torch.equal(p, original[n]) for n, p in pm.named_parameters())
    assert mon.check("merge").merges == []
    handle.remove()


def test_recipe_merge_section(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("integrity:\n  policy: log\n  checks:\n    merge: {tolerance: 1.0e-3, watch: true}\n")
    mon = Monitor.from_recipe(recipe)
    assert mon.check("merge").config.watch and mon.check("merge").config.tolerance == 1e-3
    recipe.write_text("integrity:\n  checks:\n    merge: {wach: true}\n")
    with pytest.raises(ConfigError, match="checks.merge"):
        Monitor.from_recipe(recipe)


class TiedPair(nn.Module):
    """Two square layers sharing one weight, with no config and no embedding: nothing to build a probe from."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_without_a_probe_the_hashes_still_find_the_side_effect():
    mon = Monitor(policy="log")
    mon.checked_merge(lora(TiedPair(), ["second"]))
    assert [f.code for f in mon.findings] == ["MERGE_SIDE_EFFECT", "TIE_BROKEN"]
    assert mon.findings[0].params == ("first.weight",)
    assert mon.check("merge").merges[0]["probe"].startswith("no probe: ProbeUnavailable")


def test_explicit_probe_inputs_are_used():
    mon = Monitor(policy="log")
    mon.checked_merge(lora(TiedPair(), ["second"]), probe_inputs={"x": torch.ones(2, 8)})
    assert {f.code for f in mon.findings} == {"MERGE_SIDE_EFFECT", "MERGE_MISMATCH", "TIE_BROKEN"}
    assert mon.check("merge").merges[0]["probe"] == "compared"


def test_a_failing_observation_never_stops_the_users_merge(monkeypatch):
    import callbacks.merging as merge_module

    def broken(*args, **kwargs):
        raise RuntimeError("hash backend unavailable")

    monkeypatch.setattr(merge_module, "snapshot_parameters", broken)
    pm = lora(tiny_gemma2(tie=False), ["q_proj"])
    mon = Monitor(policy="raise")
    merged = mon.checked_merge(pm)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)  # merged and unloaded
    (failed,) = mon.findings
    assert failed.code == "CHECK_FAILED" and "hash backend unavailable" in failed.message
