"""Tie integrity through the engine: each real way a tie breaks is reproduced and found; healthy twins are clean."""

import pytest
import torch
from models import LinguaLM, tiny_bert_mlm, tiny_gemma2, tiny_gpt2
from torch import nn

from callbacks import Monitor
from callbacks.primitives.naming import user_name
from callbacks.primitives.tiemap import build_tie_map

DECLARED = [("tok_embeddings.weight", "output.weight")]


def codes(findings, severity=None):
    return [f.code for f in findings if severity is None or f.severity == severity]


def only_ties(**kwargs):
    return Monitor(policy="log", checks={name: {"enabled": False} for name in
                                         ("adapter_init", "saved_state", "hashes", "merge")}, **kwargs)


# -- tie map ------------------------------------------------------------------------------------------------------
def test_tie_map_counts_every_name_and_each_tensor_once():
    model = tiny_bert_mlm()
    tie_map = build_tie_map(model)
    named = list(model.named_parameters(remove_duplicate=False))
    unique = list(model.parameters())
    # the "133 vs 134 parameters" confusion: BERT-MLM ties the decoder weight and bias
    assert tie_map.tensors_with_duplicates == len(named) == len(unique) + 2
    assert tie_map.tensors_unique == len(unique)
    assert tie_map.count_unique == sum(p.numel() for p in unique)
    assert tie_map.count_with_duplicates == sum(p.numel() for _, p in named)
    assert {g.names for g in tie_map.groups} == {
        ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
        ("cls.predictions.bias", "cls.predictions.decoder.bias"),
    }


def test_tie_map_sees_views_of_one_storage_but_not_disjoint_slices():
    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            base = torch.zeros(4, 3)
            self.a = nn.Parameter(base)
            self.b = nn.Parameter(base.view(4, 3))  # a second Parameter over the same memory
            self.c = nn.Parameter(base[:2])  # overlapping, but not the same tensor: not a tie

    tie_map = build_tie_map(Fused())
    assert [g.names for g in tie_map.groups] == [("a", "b")]
    assert tie_map.groups[0].same_object is False


def test_user_names_strip_wrappers_in_one_place():
    assert user_name("module._orig_mod.base_model.model.lm_head.weight") == "lm_head.weight"
    assert user_name("base_model.model.model.layers.0.q_proj.base_layer.weight") == "model.layers.0.q_proj.weight"
    assert user_name("model.layers.0.q_proj.lora_A.default.weight") == "model.layers.0.q_proj.lora_A.default.weight"


# -- init: expected ties that do not hold ----------------------------------------------------------------------------
def test_meta_device_init_then_to_empty_breaks_hand_written_tie():
    with torch.device("meta"):
        model = LinguaLM()
    assert model.output.weight is model.tok_embeddings.weight  # tied on meta...
    model.to_empty(device="cpu")  # ...and no longer tied after materialising
    findings = only_ties(declare_ties=DECLARED).dispatch("init", model, step=0)
    broken = [f for f in findings if f.code == "TIE_BROKEN"]
    assert len(broken) == 1
    assert broken[0].params == ("output.weight", "tok_embeddings.weight")
    assert (broken[0].event, broken[0].step, broken[0].severity) == ("init", 0, "error")
    assert "to_empty" in broken[0].hint


def test_hand_written_tie_healthy_twin_is_clean():
    findings = only_ties(declare_ties=DECLARED).dispatch("init", LinguaLM(), step=0)
    assert findings == []


def test_undeclared_sharing_is_reported_as_info_only():
    findings = only_ties().dispatch("init", LinguaLM(), step=0)
    assert codes(findings) == ["TIE_UNDECLARED"]
    assert findings[0].severity == "info"
    assert findings[0].params == ("output.weight", "tok_embeddings.weight")
    assert only_ties().dispatch("init", LinguaLM(tie=False), step=0) == []


def test_load_state_dict_assign_with_separate_tensors_unties_hf_model():
    model = tiny_gpt2(tie=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # separate tensors under both keys
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    model.load_state_dict(state, assign=True)
    assert model.lm_head.weight is not model.transformer.wte.weight
    findings = only_ties().dispatch("init", model, step=0)
    assert codes(findings) == ["TIE_BROKEN"]
    assert findings[0].params == ("lm_head.weight", "transformer.wte.weight")
    assert "tie_word_embeddings" in findings[0].hint
    assert "equal values" in findings[0].message


def test_replaced_head_of_tied_hf_model_is_broken_tie():
    model = tiny_gemma2(tie=True)
    model.lm_head = nn.Linear(32, 64, bias=False)
    findings = only_ties().dispatch("init", model, step=0)
    assert codes(findings) == ["TIE_BROKEN"]
    assert findings[0].params == ("lm_head.weight", "model.embed_tokens.weight")
    assert "different values" in findings[0].message


@pytest.mark.parametrize("build", [lambda: tiny_gpt2(tie=True), lambda: tiny_gemma2(tie=True), tiny_bert_mlm,
                                   lambda: tiny_gpt2(tie=False), lambda: tiny_gemma2(tie=False)])
def test_healthy_hf_models_are_clean(build):
    assert only_ties().dispatch("init", build(), step=0) == []


def test_untied_config_expects_nothing_even_with_separate_head():
    model = tiny_gemma2(tie=False)
    model.lm_head = nn.Linear(32, 64, bias=False)
    assert only_ties().dispatch("init", model, step=0) == []


# -- later events: a recorded tie that goes ---------------------------------------------------------------------------
def test_tie_broken_mid_training_found_at_that_step_once():
    model = LinguaLM()
    monitor = only_ties(declare_ties=DECLARED)
    monitor.dispatch("init", model, step=0)
    assert monitor.dispatch("step", model, step=1, phase="after_optimizer") == []
    model.output.weight = nn.Parameter(model.output.weight.detach().clone())  # untie during training
    found = monitor.dispatch("step", model, step=2, phase="after_optimizer")
    assert codes(found) == ["TIE_BROKEN"]
    assert (found[0].event, found[0].step) == ("step", 2)
    # reported once, not at every later step
    assert monitor.dispatch("step", model, step=3, phase="after_optimizer") == []
    model.output.weight = model.tok_embeddings.weight  # re-tied: a later break is reported again
    assert monitor.dispatch("step", model, step=4, phase="after_optimizer") == []
    model.output.weight = nn.Parameter(model.output.weight.detach().clone())
    assert codes(monitor.dispatch("checkpoint", model, step=5)) == ["TIE_BROKEN"]


def test_recorded_tie_is_watched_without_any_declaration():
    model = LinguaLM()
    monitor = only_ties()
    monitor.dispatch("init", model, step=0)
    model.output.weight = nn.Parameter(model.output.weight.detach().clone())
    found = monitor.dispatch("end", model, step=7)
    assert codes(found) == ["TIE_BROKEN"] and found[0].details["source"] == "recorded"


def test_every_n_steps_skips_other_steps():
    model = LinguaLM()
    monitor = Monitor(policy="log", declare_ties=DECLARED, checks={"ties": {"every_n_steps": 5}})
    monitor.dispatch("init", model, step=0)
    model.output.weight = nn.Parameter(model.output.weight.detach().clone())
    assert "TIE_BROKEN" not in codes(monitor.dispatch("step", model, step=4, phase="after_optimizer"))
    assert "TIE_BROKEN" in codes(monitor.dispatch("step", model, step=5, phase="after_optimizer"))


# -- load: a checkpoint that disagrees with the model's ties -----------------------------------------------------------
def test_checkpoint_with_different_values_for_tied_keys_is_a_conflict():
    model = tiny_gpt2(tie=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] + 0.5
    findings = only_ties().dispatch("load", model, step=0, state_dict=state)
    assert codes(findings) == ["TIE_CHECKPOINT_CONFLICT"]
    assert findings[0].params == ("lm_head.weight", "transformer.wte.weight")
    assert findings[0].details["max_abs_diff"] == pytest.approx(0.5)
    # and it is real: load_state_dict silently keeps one of the two
    model.load_state_dict(state)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)


def test_consistent_checkpoint_is_clean():
    model = tiny_gpt2(tie=True)
    assert only_ties().dispatch("load", model, step=0, state_dict=model.state_dict()) == []


def test_unknown_declared_name_is_name_not_found_and_the_check_still_runs():
    findings = only_ties(declare_ties=[("tok_embeddings.weight", "head.weight")]).dispatch("init", LinguaLM(), step=0)
    assert codes(findings, "error") == ["NAME_NOT_FOUND"]
    assert "CHECK_FAILED" not in codes(findings)
    (unknown,) = [f for f in findings if f.code == "NAME_NOT_FOUND"]
    assert unknown.params == ("head.weight",) and unknown.details["where"] == "declare_ties"
    assert "output.weight" in unknown.details["closest"]
    assert "TIE_UNDECLARED" in codes(findings)  # the tie check judged the model all the same


@pytest.mark.parametrize("method", ["prompt_tuning", "lora"])
def test_peft_wrapped_tied_model_keeps_its_expected_tie(method):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    config = (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4) if method == "prompt_tuning"
              else LoraConfig(r=4, target_modules=["q_proj"]))
    model = get_peft_model(tiny_gemma2(tie=True), config)
    assert [f.code for f in only_ties().dispatch("init", model, step=0) if f.severity != "info"] == []
    inner = model.get_base_model()
    inner.lm_head.weight = nn.Parameter(inner.lm_head.weight.detach().clone())
    assert codes(only_ties().dispatch("init", model, step=0), "error") == ["TIE_BROKEN"]
