"""Adapter init audit on real PEFT models built from tiny configs: every failure reproduced, every healthy twin clean.

Drives :class:`callbacks.checks.adapter_init.AdapterInitCheck` through ``Monitor.dispatch`` (policy ``log``).
"""

from __future__ import annotations

import os
import pickle
import random

import pytest
import torch
from models import tiny_bert_mlm, tiny_gemma2, tiny_gpt2, tiny_vit_classifier
from torch import nn

from callbacks import Monitor
from callbacks.checks import REGISTRY
from callbacks.errors import ConfigError
from callbacks.primitives.adapters import discover_adapters

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")

ONLY = {name: {"enabled": False} for name in REGISTRY if name != "adapter_init"}


def monitor(**options) -> Monitor:
    """A log-policy monitor with only the adapter check on."""
    return Monitor(policy="log", checks={**ONLY, "adapter_init": options})


def codes(findings) -> list[str]:
    return [f.code for f in findings]


def of(findings, code):
    return [f for f in findings if f.code == code]


def gemma_lora(**kw):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], **kw)
    return peft.get_peft_model(tiny_gemma2(), config)


def batch_for(model) -> dict[str, torch.Tensor]:
    ids = torch.arange(24).reshape(2, 12) % 64
    return {"input_ids": ids, "labels": ids.clone()}


def train_steps(mon: Monitor, model, steps: int, lr: float = 1e-2):
    """A plain loop: forward, backward, step event (before_optimizer), optimizer step. Returns all findings."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    found = list(mon.dispatch("init", model, step=0))
    model.train()
    for step in range(1, steps + 1):
        loss = model(**batch_for(model)).loss
        loss.backward()
        found += mon.dispatch("step", model, step=step, phase="before_optimizer", optimizer=opt)
        opt.step()
        found += mon.dispatch("step", model, step=step, phase="after_optimizer", optimizer=opt)
        opt.zero_grad()
    return found


# -- healthy twins: every default init of every supported method is clean, and the probe ran ----------------------

def _vit_lora(**kw):
    config = peft.LoraConfig(r=4, target_modules=["query", "value", "projection"], **kw)
    return peft.get_peft_model(tiny_vit_classifier(), config)


HEALTHY = {
    "lora-default-gemma2": lambda: gemma_lora(),
    "lora-gaussian-gpt2": lambda: peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(
        r=4, target_modules=["c_attn", "c_fc"], init_lora_weights="gaussian", fan_in_fan_out=True)),
    "lora-orthogonal": lambda: gemma_lora(init_lora_weights="orthogonal"),
    "rslora": lambda: gemma_lora(use_rslora=True),
    "dora": lambda: gemma_lora(use_dora=True),
    "dora-gpt2-conv1d": lambda: peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(
        r=4, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True)),
    "lora-embedding": lambda: peft.get_peft_model(tiny_gemma2(tie=False), peft.LoraConfig(
        r=4, target_modules=["embed_tokens", "q_proj"])),
    "lora-bert": lambda: peft.get_peft_model(tiny_bert_mlm(), peft.LoraConfig(r=4, target_modules=["query", "value"])),
    "lora-vit-conv": _vit_lora,
    "adalora": lambda: peft.get_peft_model(tiny_gemma2(), peft.AdaLoraConfig(
        init_r=4, target_r=2, target_modules=["q_proj", "v_proj"], total_step=10)),
    "ia3": lambda: peft.get_peft_model(tiny_gemma2(), peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "loha": lambda: peft.get_peft_model(tiny_gemma2(), peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "lokr": lambda: peft.get_peft_model(tiny_gemma2(), peft.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "vera": lambda: peft.get_peft_model(tiny_gemma2(), peft.VeraConfig(r=4, target_modules=["q_proj", "o_proj"])),
    "oft": lambda: peft.get_peft_model(tiny_gemma2(), peft.OFTConfig(
        r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"])),
    "boft": lambda: peft.get_peft_model(tiny_gemma2(), peft.BOFTConfig(
        boft_block_size=8, target_modules=["q_proj", "v_proj"])),
}


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_default_init_is_clean_and_probed(name):
    model = HEALTHY[name]()
    units = discover_adapters(model)
    assert units, "discovery found no adapter"
    mon = monitor()
    found = mon.dispatch("init", model, step=0)
    assert found == [], [str(f) for f in found]
    section = mon.check("adapter_init").report_section()
    assert section["probe_max_change"] is not None and section["probe_max_change"] <= 1e-6


BROKEN = {  # method -> (builder, a parameter name fragment, the value an init routine left there)
    "lora-default-gemma2": ("lora_B", 0.05),
    "lora-gaussian-gpt2": ("lora_B", 0.05),
    "rslora": ("lora_B", 0.05),
    "dora": ("lora_magnitude_vector", 0.5),
    "lora-embedding": ("lora_embedding_A", 0.05),
    "lora-vit-conv": ("lora_B", 0.05),
    "adalora": ("lora_E", 0.05),
    "ia3": ("ia3_l", 0.5),
    "loha": ("hada_w2_b", 0.05),
    "lokr": ("lokr_w1", 0.05),
    "vera": ("vera_lambda_b", 0.05),
    "oft": ("oft_R", 0.05),
    "boft": ("boft_R", 0.05),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_twin_of_each_method_is_wrong(name):
    """Each healthy twin above has a broken twin: the parameter its contract fixes, changed, is reported."""
    fragment, value = BROKEN[name]
    model = HEALTHY[name]()
    with torch.no_grad():
        hit = [n for n, p in model.named_parameters() if fragment in n and not p.fill_(value).shape == ()]
    assert hit
    wrong = of(monitor(probe=False).dispatch("init", model, step=0), "ADAPTER_INIT_WRONG")
    assert wrong and {n for f in wrong for n in f.params} >= {n.removeprefix("base_model.model.") for n in hit}


def test_lora_contracts_are_read_from_config():
    """The expected spread of A follows init_lora_weights: kaiming (True) vs 1/r (gaussian)."""
    from callbacks.checks.adapter_init import init_contract

    unit = discover_adapters(gemma_lora())[0]
    rule = next(r for r in init_contract(unit).rules if r.role == "lora_A")
    assert rule.kind == "spread" and rule.value == pytest.approx(1 / (3 * 32) ** 0.5)
    unit = discover_adapters(gemma_lora(init_lora_weights="gaussian"))[0]
    rule = next(r for r in init_contract(unit).rules if r.role == "lora_A")
    assert rule.value == pytest.approx(1 / 4)


# -- inits that do not promise identity: reported as not checked, never as errors --------------------------------

@pytest.mark.parametrize("build", [
    lambda: gemma_lora(init_lora_weights=False),
    lambda: gemma_lora(init_lora_weights="pissa"),
    lambda: gemma_lora(init_lora_weights="olora"),
    lambda: peft.get_peft_model(tiny_gemma2(), peft.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)),
], ids=["lora-false", "pissa", "olora", "ia3-false"])
def test_non_identity_inits_are_not_checked(build):
    found = monitor().dispatch("init", build(), step=0)
    assert codes(found) == ["CHECK_NOT_APPLICABLE"], [str(f) for f in found]
    assert found[0].severity == "info" and "identity probe not run" in found[0].message


@pytest.mark.parametrize("config", [
    lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
], ids=["prompt", "prefix"])
def test_prompt_learning_is_found_and_judged_where_checkable(config):
    model = peft.get_peft_model(tiny_gpt2(), config())
    found = monitor().dispatch("init", model, step=0)
    assert [f.code for f in found] == ["CHECK_NOT_APPLICABLE"]  # virtual tokens change the output by design
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight[0, 0] = float("nan")
    model.requires_grad_(False)
    found = monitor().dispatch("init", model, step=0)
    assert {f.code for f in found} == {"ADAPTER_INIT_WRONG", "ADAPTER_NOT_TRAINABLE", "CHECK_NOT_APPLICABLE"}
    assert of(found, "ADAPTER_INIT_WRONG")[0].params == ("prompt_encoder.default.embedding.weight",)


# -- mis-initialisation reproductions -----------------------------------------------------------------------------

def test_post_init_after_get_peft_model_reinitialises_lora_b():
    model = gemma_lora()
    model.get_base_model().post_init()  # the HF init routine re-runs over the injected LoRA layers
    found = monitor().dispatch("init", model, step=0)
    wrong_b = [f for f in of(found, "ADAPTER_INIT_WRONG") if f.details["role"] == "lora_B"]
    assert len(wrong_b) == 1
    f = wrong_b[0]
    lora_b = sorted(n for n, _ in model.get_base_model().named_parameters() if "lora_B" in n)
    assert sorted(f.params) == lora_b and len(lora_b) == 6
    assert f.event == "init" and f.step == 0
    assert "expected 0" in f.message and "std 0.0" in f.message and "post_init" in f.hint
    identity = of(found, "ADAPTER_NOT_IDENTITY")
    assert len(identity) == 1 and identity[0].details["max_change"] > 1e-4


def test_orthogonal_init_is_checked_by_product_not_by_b():
    model = gemma_lora(init_lora_weights="orthogonal")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # a custom init that redraws A breaks B·A = 0 although B was never zero
        layer.lora_A["default"].weight.normal_(generator=torch.Generator().manual_seed(1))
    found = monitor().dispatch("init", model, step=0)
    wrong = of(found, "ADAPTER_INIT_WRONG")
    assert [f.details["problem"] for f in wrong] == ["product B·A not zero"]
    assert wrong[0].params == ("model.layers.0.self_attn.q_proj.lora_B.default.weight",)
    assert codes(found).count("ADAPTER_NOT_IDENTITY") == 1


def test_requires_grad_false_after_get_peft_model():
    model = gemma_lora()
    model.requires_grad_(False)  # meant to freeze the base, freezes the adapters too
    found = monitor().dispatch("init", model, step=0)
    frozen = of(found, "ADAPTER_NOT_TRAINABLE")
    assert len(frozen) == 1 and len(frozen[0].params) == 12
    assert all("lora_" in n for n in frozen[0].params)
    assert "before adding adapters" in frozen[0].hint


def test_from_pretrained_default_is_frozen(tmp_path):
    gemma_lora().save_pretrained(tmp_path)
    model = peft.PeftModel.from_pretrained(tiny_gemma2(), tmp_path)  # is_trainable=False by default
    found = monitor().dispatch("init", model, step=0)
    assert "ADAPTER_NOT_TRAINABLE" in codes(found) and "is_trainable=True" in of(found, "ADAPTER_NOT_TRAINABLE")[0].hint


def test_nan_adapter_loaded_from_corrupted_file(tmp_path):
    from safetensors.torch import load_file, save_file

    gemma_lora().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if "layers.1.self_attn.v_proj.lora_A" in k)
    tensors[key][0, :3] = float("nan")  # bytes damaged on disk
    save_file(tensors, path, metadata={"format": "pt"})
    model = peft.PeftModel.from_pretrained(tiny_gemma2(), tmp_path, is_trainable=True)
    found = monitor().dispatch("init", model, step=0)
    bad = [f for f in of(found, "ADAPTER_INIT_WRONG") if f.details["problem"] == "non-finite"]
    assert len(bad) == 1 and bad[0].params == ("model.layers.1.self_attn.v_proj.lora_A.default.weight",)
    assert "3 of" in bad[0].message and "corrupt" in bad[0].hint


def test_loaded_adapter_is_not_judged_against_init_contract(tmp_path):
    """A trained adapter loaded with from_pretrained(is_trainable=True): judged as loaded (one info), no
    contract error; fresh=True judges it as fresh anyway; fresh=False and a resume skip the contract."""
    trained = gemma_lora()
    train_steps(monitor(), trained, steps=3, lr=1e-2)
    trained.save_pretrained(tmp_path)
    model = peft.PeftModel.from_pretrained(tiny_gemma2(), tmp_path, is_trainable=True)
    found = monitor().dispatch("init", model, step=0)
    assert codes(found) == ["CHECK_NOT_APPLICABLE"] and "judged as loaded" in found[0].message
    assert "ADAPTER_INIT_WRONG" in codes(monitor(fresh=True).dispatch("init", model, step=0))
    assert monitor(fresh=False).dispatch("init", model, step=0) == []
    mon = monitor()
    mon.dispatch("load", model, step=5)  # a resume
    assert mon.dispatch("init", model, step=5) == []


def test_meta_device_adapters_from_low_cpu_mem_usage():
    model = peft.get_peft_model(tiny_gemma2(), peft.LoraConfig(r=4, target_modules=["q_proj"]),
                                low_cpu_mem_usage=True)
    found = monitor(probe=False).dispatch("init", model, step=0)
    wrong = of(found, "ADAPTER_INIT_WRONG")
    assert wrong and all(f.details["problem"] == "on another device than its base layer" for f in wrong)
    assert "meta" in wrong[0].message


def test_fp32_adapters_on_bf16_base_are_fine():
    model = peft.get_peft_model(tiny_gemma2().to(torch.bfloat16), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert monitor().dispatch("init", model, step=0) == []


def test_integer_adapter_parameter_is_wrong():
    model = gemma_lora()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_B["default"].weight = nn.Parameter(torch.zeros_like(layer.lora_B["default"].weight,
                                                                   dtype=torch.int32), requires_grad=False)
    found = monitor(probe=False).dispatch("init", model, step=0)
    wrong = [f for f in of(found, "ADAPTER_INIT_WRONG") if f.details["problem"] == "not floating point"]
    assert wrong and wrong[0].params == ("model.layers.0.self_attn.q_proj.lora_B.default.weight",)


def test_dora_on_zero_row_base_breaks_identity_with_finite_parameters():
    base = tiny_gemma2()
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight[3].zero_()  # a pruned row: DoRA divides 0/0
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    found = monitor().dispatch("init", model, step=0)
    assert codes(found) == ["ADAPTER_NOT_IDENTITY"], [str(f) for f in found]


# -- the identity probe is read-only -----------------------------------------------------------------------------

def test_probe_leaves_rng_mode_grads_and_flags_untouched():
    model = gemma_lora()
    model.train()
    model.base_model.model.model.layers[1].eval()  # a mixed mode must come back exactly
    loss = model(**batch_for(model)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: m._disable_adapters for n, m in model.named_modules() if hasattr(m, "_disable_adapters")}
    torch.manual_seed(123)
    random.seed(7)
    torch_state, py_state = torch.get_rng_state(), random.getstate()

    found = monitor().dispatch("init", model, step=0)

    assert found == []
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    assert {n: m._disable_adapters for n, m in model.named_modules() if hasattr(m, "_disable_adapters")} == flags
    after = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert after.keys() == grads.keys() and all(torch.equal(after[n], grads[n]) for n in grads)


def test_probe_sees_a_changed_output_the_parameter_checks_agree_on():
    """Twin of the DoRA test: a B set non-zero by hand is seen both by the contract and by the probe."""
    model = gemma_lora()
    with torch.no_grad():
        model.base_model.model.model.layers[0].mlp.up_proj.lora_B["default"].weight.fill_(0.05)
    found = monitor().dispatch("init", model, step=0)
    assert sorted(codes(found)) == ["ADAPTER_INIT_WRONG", "ADAPTER_NOT_IDENTITY"]
    assert of(found, "ADAPTER_INIT_WRONG")[0].params == ("model.layers.0.mlp.up_proj.lora_B.default.weight",)


# -- dead adapters ---------------------------------------------------------------------------------------------

def test_normal_lora_start_is_not_dead():
    model = gemma_lora()
    mon = monitor()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert mon.dispatch("init", model, step=0) == []
    model(**batch_for(model)).loss.backward()
    a_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert all(torch.count_nonzero(g) == 0 for g in a_grads)  # A's gradient is zero at step 1: B is zero
    assert mon.dispatch("step", model, step=1, phase="before_optimizer") == []
    opt.step()
    opt.zero_grad()
    for step in (2, 3):
        model(**batch_for(model)).loss.backward()
        assert mon.dispatch("step", model, step=step, phase="before_optimizer") == []
        opt.step()
        opt.zero_grad()
    assert mon.check("adapter_init").done


def test_a_and_b_both_zero_is_dead_at_first_step():
    model = gemma_lora()
    with torch.no_grad():  # an init routine that zeroes every adapter matrix
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.zero_()
    found = train_steps(monitor(), model, steps=1)
    assert [f.details["role"] for f in of(found, "ADAPTER_INIT_WRONG")] == ["lora_A"]
    dead = of(found, "ADAPTER_DEAD")
    assert len(dead) == 1 and dead[0].event == "step" and dead[0].step == 1
    assert len(dead[0].params) == 12 and "both zero" in dead[0].message


def test_inactive_adapter_is_dead():
    model = gemma_lora()
    model.add_adapter("second", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)  # a hand-written "unfreeze all LoRA" that also catches the inactive adapter
    found = train_steps(monitor(), model, steps=1)
    dead = of(found, "ADAPTER_DEAD")
    assert len(dead) == 1 and dead[0].details["adapter"] == "second" and "not active" in dead[0].message
    assert all(".second." in n for n in dead[0].params)


class TwoHeads(nn.Module):
    """``pooler`` is never called by the forward (a pooler, a contact head under ``all-linear``)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.pooler = nn.Linear(8, 8)

    def forward(self, x):
        return self.body(x)


def _steps(mon, model, forward, steps, first=1):
    """Real SGD steps (B leaves zero, so A gets gradients from the second step on)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    found = []
    for step in range(first, first + steps):
        optimizer.zero_grad()
        forward(step).pow(2).sum().backward()
        found += mon.dispatch("step", model, step=step, phase="before_optimizer")
        optimizer.step()
    return found


def test_adapter_outside_forward_path_is_unused_while_others_train():
    model = peft.get_peft_model(TwoHeads(), peft.LoraConfig(r=2, target_modules=["body", "pooler"]))
    mon = monitor(probe=False)
    mon.dispatch("init", model, step=0)
    assert _steps(mon, model, lambda step: model(torch.ones(2, 8)), 2) == []  # judged after dead_after_steps
    found = _steps(mon, model, lambda step: model(torch.ones(2, 8)), 1, first=3)
    assert codes(found) == ["ADAPTER_UNUSED"] and found[0].severity == "warning" and found[0].step == 3
    assert "in 3 step(s)" in found[0].message
    assert set(found[0].params) == {"pooler.lora_A.default.weight", "pooler.lora_B.default.weight"}
    assert "target_modules" in found[0].hint and "pooler" in found[0].hint


class SkippedAtFirst(TwoHeads):
    """``pooler`` is skipped at the first step only (LayerDrop, data-dependent routing): used, not unused."""

    def forward(self, x, use_pooler=True):
        x = self.body(x)
        return self.pooler(x) if use_pooler else x


def test_layer_idle_at_the_first_step_only_is_not_unused():
    model = peft.get_peft_model(SkippedAtFirst(), peft.LoraConfig(r=2, target_modules=["body", "pooler"]))
    mon = monitor(probe=False)
    mon.dispatch("init", model, step=0)
    found = _steps(mon, model, lambda step: model(torch.ones(2, 8), use_pooler=step > 1), 4)
    assert found == []


def test_layer_drop_lengthens_the_unused_horizon():
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    from callbacks.checks.adapter_init import steps_past_layer_drop

    config = M2M100Config(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
                          encoder_layerdrop=0.05, decoder_layerdrop=0.0)
    assert steps_past_layer_drop(M2M100ForConditionalGeneration(config)) == 5  # 0.05**5 < 1e-6
    assert steps_past_layer_drop(TwoHeads()) == 0


def test_every_adapter_outside_forward_path_is_dead():
    # ``body`` trains as a full copy: no adapter of the model trains, so the idle one is dead, not unused
    model = peft.get_peft_model(TwoHeads(), peft.LoraConfig(r=2, target_modules=["pooler"], modules_to_save=["body"]))
    mon = monitor(probe=False)
    mon.dispatch("init", model, step=0)
    model(torch.ones(2, 8)).pow(2).sum().backward()
    dead = of(mon.dispatch("step", model, step=1, phase="before_optimizer"), "ADAPTER_DEAD")
    assert len(dead) == 1 and "forward path" in dead[0].message and dead[0].severity == "error"
    assert set(dead[0].params) == {"pooler.lora_A.default.weight", "pooler.lora_B.default.weight"}


def test_parameter_without_gradient_after_k_steps():
    """lr 0 (a warmup that never leaves 0): B stays zero, so A never gets a gradient; flagged at step K."""
    model = gemma_lora()
    found = train_steps(monitor(dead_after_steps=3), model, steps=3, lr=0.0)
    dead = of(found, "ADAPTER_DEAD")
    assert len(dead) == 1 and dead[0].step == 3
    assert len(dead[0].params) == 6 and all("lora_A" in n for n in dead[0].params)


def test_dead_state_round_trips_through_pickle():
    model = gemma_lora()
    mon = monitor()
    train_steps(mon, model, steps=1)
    check = mon.check("adapter_init")
    state = pickle.loads(pickle.dumps(check.state_dict()))
    fresh = monitor().check("adapter_init")
    fresh.load_state_dict(state)
    assert fresh.first_step == 1 and fresh.nonzero == check.nonzero


# -- hand-written adapters by declared roles ---------------------------------------------------------------------

class Bottleneck(nn.Module):
    def __init__(self, dim=16, hidden=4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.down.bias)

    def forward(self, x):
        return x + self.up(torch.relu(self.down(self.norm(x))))


class WithAdapters(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.adapters = nn.ModuleList(Bottleneck() for _ in range(2))
        for block in self.blocks:
            block.requires_grad_(False)

    def forward(self, x):
        for block, adapter in zip(self.blocks, self.adapters, strict=True):
            x = adapter(block(x))
        return x


ROLES = {"adapters.*.down": "down", "adapters.*.up": "up", "adapters.*.norm": "norm"}


def test_hand_written_adapter_healthy_is_clean():
    assert monitor(modules=ROLES).dispatch("init", WithAdapters(), step=0) == []


def test_hand_written_adapter_reinitialised_by_model_init():
    model = WithAdapters()
    for module in model.modules():  # a model-wide init loop that also catches the adapters
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, std=0.02)
    found = monitor(modules=ROLES).dispatch("init", model, step=0)
    problems = {(f.details["role"], f.details["problem"]) for f in of(found, "ADAPTER_INIT_WRONG")}
    assert problems == {("up.weight", "not zero"), ("norm.weight", "not 1")}
    up = next(f for f in found if f.details["role"] == "up.weight")
    assert set(up.params) == {"adapters.0.up.weight", "adapters.1.up.weight"}


def test_hand_written_roles_are_validated_at_construction():
    with pytest.raises((ConfigError, ValueError)):
        Monitor(policy="log", checks={"adapter_init": {"modules": {"adapters.*.up": "upp"}}})
