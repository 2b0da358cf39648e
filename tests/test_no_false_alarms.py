"""Healthy fine-tuning setups run clean through a real HF Trainer run with checkpoints and a checked merge, and
each keeps catching its faulty twin: loaded adapters, LoRA on a tied decoder, PEFT-wrapped tied heads
(``modules_to_save``, ``ensure_weight_tying``), fused MoE experts, prompt learning, and a configured name the model
lacks."""

from __future__ import annotations

import pytest
import torch
from models import TokenDataset, tiny_bert_mlm
from packaging.version import Version
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from callbacks.hf import IntegrityCallback

peft = pytest.importorskip("peft")


def llama(tied: bool = True, hidden: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, intermediate_size=2 * hidden,
                                        tie_word_embeddings=tied))


def train(model, out, callback=None, steps=4, resume=None, merge=False, **kwargs):
    """A real Trainer run with a checkpoint every two steps (and the monitor's checked merge); the callback."""
    callback = callback or IntegrityCallback(policy="log", **kwargs)
    args = TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=2, per_device_train_batch_size=4,
                             report_to=[], logging_steps=1000, use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    if merge:
        callback.monitor.checked_merge(trainer.model)
    return callback


def alarms(callback):
    """error/warning findings and CHECK_FAILED: what a healthy run must not have."""
    return [f for f in callback.findings if f.severity != "info" or f.code == "CHECK_FAILED"]


def codes(findings):
    return sorted({f.code for f in findings})


# -- 1. continuing to train a saved adapter --------------------------------------------------------------------

def saved_adapter(tmp_path):
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert alarms(train(model, tmp_path / "first", steps=3)) == []
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_loaded_adapter_trains_clean_and_says_it_was_judged_as_loaded(tmp_path):
    adapter = saved_adapter(tmp_path)
    model = peft.PeftModel.from_pretrained(llama(), adapter, is_trainable=True)
    callback = train(model, tmp_path / "second", IntegrityCallback(policy="raise"), merge=True)
    assert alarms(callback) == []
    loaded = [f for f in callback.findings if f.code == "CHECK_NOT_APPLICABLE" and "loaded" in f.message]
    assert len(loaded) == 1 and loaded[0].event == "init"


def test_load_adapter_under_a_second_name_trains_clean(tmp_path):
    adapter = saved_adapter(tmp_path)
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.load_adapter(adapter, adapter_name="loaded", is_trainable=True)
    model.set_adapter("loaded")
    callback = train(model, tmp_path / "second", IntegrityCallback(policy="raise"))
    assert alarms(callback) == []


def test_hf_resume_of_a_peft_run_with_a_new_callback_is_clean(tmp_path):
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert alarms(train(model, tmp_path, steps=2)) == []
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    callback = train(model, tmp_path, IntegrityCallback(policy="raise"), steps=4, resume=str(tmp_path / "checkpoint-2"))
    assert alarms(callback) == []


def test_fresh_adapter_redrawn_by_a_module_wide_init_is_still_init_wrong(tmp_path):
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.get_base_model().apply(model.get_base_model()._init_weights)  # a late post_init(): A and B redrawn
    callback = train(model, tmp_path, steps=1)
    wrong = [f for f in callback.findings if f.code == "ADAPTER_INIT_WRONG"]
    assert wrong and wrong[0].event == "init" and wrong[0].step == 0
    assert any("lora_B" in name for f in wrong for name in f.params)
    assert "ADAPTER_NOT_IDENTITY" in codes(callback.findings)


# -- 2. BERT-style masked LM with LoRA on the tied decoder -----------------------------------------------------

def test_lora_on_a_tied_mlm_decoder_trains_clean(tmp_path):
    model = peft.get_peft_model(tiny_bert_mlm(), peft.LoraConfig(r=2, target_modules=["query", "decoder"]))
    callback = train(model, tmp_path, IntegrityCallback(policy="raise"))
    assert alarms(callback) == []
    groups = callback.report.sections["ties"]["tie_map"]["groups"]
    assert any("cls.predictions.decoder.weight" in group["names"] for group in groups)


def test_lora_on_an_untied_mlm_decoder_is_tie_broken_at_init(tmp_path):
    model = peft.get_peft_model(tiny_bert_mlm(), peft.LoraConfig(r=2, target_modules=["query", "decoder"]))
    decoder = model.get_base_model().cls.predictions.decoder.base_layer
    decoder.weight = nn.Parameter(decoder.weight.detach().clone())
    callback = train(model, tmp_path, steps=2)
    broken = [f for f in callback.findings if f.code == "TIE_BROKEN"]
    assert broken and broken[0].event == "init"
    assert "cls.predictions.decoder.weight" in broken[0].params
    assert "CHECK_FAILED" not in codes(callback.findings)


# -- 3. PEFT-wrapped tied heads --------------------------------------------------------------------------------

def test_modules_to_save_on_a_tied_head_is_information_and_merges_clean(tmp_path):
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    callback = train(model, tmp_path, IntegrityCallback(policy="raise"), merge=True)
    assert alarms(callback) == []
    replaced = [f for f in callback.findings if f.code == "TIE_REPLACED"]
    assert len(replaced) == 1 and replaced[0].severity == "info" and "lm_head.weight" in replaced[0].params


def test_ensure_weight_tying_trains_clean_and_its_merge_is_a_true_mismatch(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head", "embed_tokens"], ensure_weight_tying=True)
    model = peft.get_peft_model(llama(), config)
    callback = train(model, tmp_path)
    assert alarms(callback) == []
    callback.monitor.checked_merge(model)
    merge = [f for f in callback.findings if f.event == "merge" and f.severity == "error"]
    assert codes(merge) == ["MERGE_MISMATCH"]  # the shared delta is added twice: PEFT's merge of the tie
    assert {f.step for f in merge} == {4}  # the README's call, no step given: the last step trained


def test_ensure_weight_tying_with_a_redrawn_head_adapter_is_init_wrong(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head", "embed_tokens"], ensure_weight_tying=True)
    model = peft.get_peft_model(llama(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lm_head.lora_B" in name:
                p.normal_(std=0.02)  # also writes the embedding adapter's A, which it views
    callback = train(model, tmp_path, steps=1)
    wrong = [f for f in callback.findings if f.code == "ADAPTER_INIT_WRONG"]
    assert wrong and any("lm_head.lora_B" in name for f in wrong for name in f.params)


# -- 4. nested PEFT wrappers: fused MoE experts ----------------------------------------------------------------

def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                                            num_local_experts=2, num_experts_per_tok=1))


def test_lora_on_fused_moe_experts_trains_clean_with_distinct_names(tmp_path):
    from callbacks.primitives.naming import named_parameters_all

    model = peft.get_peft_model(mixtral(), peft.LoraConfig(r=2, target_modules="all-linear"))
    rows = list(named_parameters_all(model))  # experts.lora_* and experts.base_layer.lora_* (nested wrappers)
    assert len({user for _, user, _ in rows}) == len({raw for raw, _, _ in rows})  # no two share a user name
    assert sum("experts" in user and "lora_A" in user for _, user, _ in rows) == 2
    callback = train(model, tmp_path, IntegrityCallback(policy="raise"), merge=True)
    assert alarms(callback) == []


# -- 5. prompt learning ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["prompt", "prefix", "p_tuning"])
def test_prompt_learning_trains_clean_with_user_names(tmp_path, method):
    config = {"prompt": peft.PromptTuningConfig, "prefix": peft.PrefixTuningConfig,
              "p_tuning": peft.PromptEncoderConfig}[method](task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = peft.get_peft_model(llama(), config)
    from callbacks.primitives.naming import named_parameters_all

    users = {user for _, user, _ in named_parameters_all(model)}
    assert "model.embed_tokens.weight" in users and "lm_head.weight" in users  # not "embed_tokens.weight"
    callback = train(model, tmp_path, IntegrityCallback(policy="raise"))
    assert alarms(callback) == []
    assert not [f for f in callback.findings if f.code == "NAME_NOT_FOUND"]


# -- 6. configuration that names the model ---------------------------------------------------------------------

def test_a_declared_tie_with_a_typo_is_name_not_found_and_the_config_tie_is_still_checked(tmp_path):
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.get_base_model().lm_head.weight = nn.Parameter(model.get_base_model().lm_head.weight.detach().clone())
    callback = train(model, tmp_path, steps=2, declare_ties=[("model.embed_tokens.weight", "lm_hed.weight")])
    missing = [f for f in callback.findings if f.code == "NAME_NOT_FOUND"]
    assert len(missing) == 1 and missing[0].event == "init" and "lm_hed.weight" in missing[0].params
    assert "lm_head.weight" in missing[0].message  # the closest name
    broken = [f for f in callback.findings if f.code == "TIE_BROKEN"]
    assert broken and "lm_head.weight" in broken[0].params


# -- 7. a second adapter named like a module -------------------------------------------------------------------

#: PEFT before 0.22 filtered saved keys by adapter name as a substring: a second adapter named "mlp" dropped the
#: first adapter's keys under ".mlp." (fixed in 0.22.0)
PEFT_DROPS_KEYS_OF_AN_ADAPTER_NAMED_LIKE_A_MODULE = Version(peft.__version__) < Version("0.22.0")


@pytest.mark.parametrize("second", ["second", "mlp"])
def test_a_second_adapter_named_like_a_module_loses_keys_and_the_fix_says_rename(tmp_path, second):
    from models import tiny_gpt2

    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    model.add_adapter(second, peft.LoraConfig(r=2, target_modules=["c_attn"]))
    model.set_adapter("default")
    callback = train(model, tmp_path, steps=2)
    if second == "second" or not PEFT_DROPS_KEYS_OF_AN_ADAPTER_NAMED_LIKE_A_MODULE:
        assert alarms(callback) == []  # PEFT >= 0.22 saves them: the healthy twin
        return
    unsaved = [f for f in callback.findings if f.code == "UNSAVED_TRAINABLE"]
    assert {f.event for f in unsaved} == {"init", "checkpoint"}
    assert {p for f in unsaved for p in f.params} == {f"transformer.h.{i}.mlp.c_fc.lora_{ab}.default.weight"
                                                    for i in (0, 1) for ab in "AB"}
    assert all("named 'mlp'" in f.hint and "rename" in f.hint for f in unsaved)


# -- 5. adapters outside the forward path, in a real Trainer run -----------------------------------------------

def esm():
    from transformers import EsmConfig, EsmForMaskedLM

    torch.manual_seed(0)
    return EsmForMaskedLM(EsmConfig(vocab_size=33, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, pad_token_id=1, mask_token_id=32,
                                    position_embedding_type="absolute"))


def test_esm_all_linear_warns_that_the_contact_head_is_unused(tmp_path):
    model = peft.get_peft_model(esm(), peft.LoraConfig(r=2, target_modules="all-linear"))
    callback = IntegrityCallback(policy="raise")  # a warning does not stop training
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             report_to=[], logging_steps=1000, use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=TokenDataset(vocab=33), callbacks=[callback]).train()
    found = alarms(callback)
    assert codes(found) == ["ADAPTER_UNUSED"] and found[0].severity == "warning" and found[0].step == 3
    assert {p.split(".lora_")[0] for p in found[0].params} == {"esm.contact_head.regression"}
    assert "exclude_modules=['regression']" in found[0].hint


# -- 7. one source of truth for declared ties ------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_tie_declared_by_argument_or_by_recipe_section_gives_the_same_verdicts(tmp_path, tied):
    """A checkpoint that stores the tied pair once (as HF does): saved in full when the tie holds, ``output``
    unsaved when it does not. Both ways of declaring the tie give the same findings at init and checkpoint."""
    from models import LinguaLM
    from safetensors.torch import save_file

    from callbacks import Monitor

    verdicts = []
    for how in ("argument", "section"):
        model = LinguaLM(tie=tied)
        kwargs = ({"declare_ties": [("tok_embeddings.weight", "output.weight")]} if how == "argument" else
                  {"checks": {"ties": {"declare": [["tok_embeddings.weight", "output.weight"]]}}})
        monitor = Monitor(policy="log", **kwargs)
        found = monitor.dispatch("init", model, step=0)
        folder = tmp_path / how / "checkpoint-1"
        folder.mkdir(parents=True)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "output.weight"}
        save_file(state, str(folder / "model.safetensors"))
        found += monitor.dispatch("checkpoint", model, step=1, checkpoint_dir=str(folder))
        verdicts.append(sorted((f.code, f.event, f.params) for f in found if f.severity != "info"))
    assert verdicts[0] == verdicts[1]
    if tied:
        assert verdicts[0] == []
    else:
        assert ("TIE_BROKEN", "init", ("output.weight", "tok_embeddings.weight")) in verdicts[0]
        assert ("UNSAVED_TRAINABLE", "checkpoint", ("output.weight",)) in verdicts[0]


# -- 10. tensor subclasses: torchao int8 weight-only quantisation ----------------------------------------------

def quantised_llama(head: bool = True):
    """Every Linear (the tied ``lm_head`` too unless ``head=False``) as torchao ``Int8Tensor`` weights, then LoRA."""
    quantization = pytest.importorskip("torchao.quantization")
    model = llama()
    keep_head = None if head else (lambda module, name: isinstance(module, nn.Linear) and name != "lm_head")
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig(), filter_fn=keep_head)
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


def test_int8_quantised_lora_trains_clean_and_a_quantised_tied_head_is_information(tmp_path):
    callback = train(quantised_llama(), tmp_path, IntegrityCallback(policy="raise"))
    assert alarms(callback) == []
    replaced = [f for f in callback.findings if f.code == "TIE_REPLACED"]
    assert len(replaced) == 1 and "Int8Tensor" in replaced[0].message and "lm_head.weight" in replaced[0].params


def test_int8_quantised_frozen_weight_written_in_place_is_frozen_changed(tmp_path):
    model = quantised_llama()
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer

    def corrupt(module, args):
        with torch.no_grad():
            module.weight.qdata.add_(1)  # a hook writing a frozen quantised weight during the step

    q_proj.register_forward_pre_hook(corrupt)
    callback = train(model, tmp_path, steps=2)
    changed = [f for f in callback.findings if f.code == "FROZEN_CHANGED"]
    assert changed and changed[0].details["changed_in_steps"][0] == 1
    assert changed[0].params == ("model.layers.0.self_attn.q_proj.weight",)


def test_int8_quantised_model_keeps_its_tie_check(tmp_path):
    model = quantised_llama(head=False)
    head = model.get_base_model().lm_head
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untied while quantised
    callback = train(model, tmp_path, steps=2)
    broken = [f for f in callback.findings if f.code == "TIE_BROKEN"]
    assert broken and broken[0].event == "init" and "lm_head.weight" in broken[0].params
    assert "CHECK_FAILED" not in codes(callback.findings)


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_qlora_trains_clean_and_a_frozen_quantised_weight_written_in_place_is_caught(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    llama().save_pretrained(tmp_path / "base")
    quantization = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32) if bits == 4
                    else BitsAndBytesConfig(load_in_8bit=True))

    def qlora():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization,
                                                     device_map="cpu")
        model = peft.prepare_model_for_kbit_training(model)
        return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))

    callback = train(qlora(), tmp_path / "healthy", IntegrityCallback(policy="raise"))
    assert alarms(callback) == []
    model = qlora()
    v_proj = model.get_base_model().model.layers[0].self_attn.v_proj.base_layer

    def corrupt(module, args):
        with torch.no_grad():
            module.weight.data.view(torch.uint8 if bits == 4 else torch.int8).add_(1)

    v_proj.register_forward_pre_hook(corrupt)
    changed = [f for f in train(model, tmp_path / "faulty", steps=2).findings if f.code == "FROZEN_CHANGED"]
    assert changed and changed[0].params == ("model.layers.0.self_attn.v_proj.weight",)

