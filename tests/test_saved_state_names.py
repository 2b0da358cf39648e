"""Saved keys <-> live names: PEFT prefixes and adapter names, modules_to_save wrappers, wrapper prefixes."""

from __future__ import annotations

from callbacks.primitives.saved_names import SavedIndex, checkpoint_key, choose_prefix, live_key, saved_name

ADAPTERS = ("default", "second")


def test_peft_live_names_meet_their_adapter_file_keys():
    live = "base_model.model.vit.layers.0.attention.q_proj.lora_A.default.weight"
    saved = "base_model.model.vit.layers.0.attention.q_proj.lora_A.weight"
    assert live_key(live, ADAPTERS) == checkpoint_key(saved, "", ADAPTERS) == (
        "default", "vit.layers.0.attention.q_proj.lora_A.weight")
    assert checkpoint_key(saved, "second", ADAPTERS)[0] == "second"  # PEFT's sub-folder for adapter "second"


def test_modules_to_save_copy_is_saved_under_the_module_name_and_original_is_not():
    assert saved_name("base_model.model.classifier.modules_to_save.default.weight", ADAPTERS) == "classifier.weight"
    assert saved_name("base_model.model.classifier.original_module.weight", ADAPTERS) == \
        "classifier.original_module.weight"


def test_wrapper_prefixes_and_base_layer():
    assert saved_name("module._orig_mod.head.bias") == "head.bias"
    assert saved_name("base_model.model.x.q_proj.base_layer.weight", ADAPTERS) == "x.q_proj.weight"


def test_prefix_chosen_by_matching_live_names():
    live = {"model.layers.0.weight", "lm_head.weight"}  # a Llama-like model whose own names start with model.
    assert choose_prefix(["model.layers.0.weight", "lm_head.weight"], live) == ""
    assert choose_prefix(["model.model.layers.0.weight", "model.lm_head.weight", "optim.state.0"], live) == "model."


def test_index_lookup_by_tag_and_untagged_fallback():
    index = SavedIndex({"": ["base_model.model.a.lora_A.weight", "base_model.model.emb.weight"],
                        "second": ["base_model.model.a.lora_A.weight"]},
                       {"a.lora_A.weight", "emb.weight"}, ADAPTERS)
    assert index.lookup(("default", "a.lora_A.weight")) == ("", "base_model.model.a.lora_A.weight")
    assert index.lookup(("second", "a.lora_A.weight")) == ("second", "base_model.model.a.lora_A.weight")
    assert index.lookup(("", "emb.weight")) == ("", "base_model.model.emb.weight")  # no adapter: any tag
    assert index.lookup(("third", "a.lora_A.weight")) is None


def test_dora_magnitude_maps_to_the_key_peft_saves():
    from models import tiny_gpt2
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from callbacks.primitives.saved_names import adapter_names, saved_name

    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], use_dora=True))
    adapters = adapter_names(model)
    saved = {saved_name(k, adapters) for k in get_peft_model_state_dict(model)}
    live = {saved_name(n, adapters) for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_attn.lora_magnitude_vector" in saved
    assert live <= saved


def test_prompt_tuning_is_saved_as_prompt_embeddings(tmp_path):
    from models import tiny_gpt2
    from peft import PromptTuningConfig, get_peft_model

    from callbacks import Monitor

    model = get_peft_model(tiny_gpt2(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    monitor = Monitor(policy="log", checks={"saved_state": {"enabled": True}})
    assert [f.code for f in monitor.dispatch("init", model, step=0) if f.code == "UNSAVED_TRAINABLE"] == []
    model.save_pretrained(tmp_path)
    found = monitor.dispatch("checkpoint", model, step=1, checkpoint_dir=str(tmp_path))
    assert [f.code for f in found if f.severity == "error"] == []
