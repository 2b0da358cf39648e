"""Adapter init audit on the ``adapters`` library (bottleneck, LoRA, prefix tuning) with real models.

The library pins transformers 4.57.x, so this file runs in the second environment (transformers 4.57.6 +
adapters 1.3.0) that ``.ci/run`` builds; the main environment skips it.
"""

import math
import random

import pytest
import torch
from models import TokenDataset, tiny_bert_mlm, tiny_gpt2
from torch import nn

from callbacks import IntegrityError, Monitor
from callbacks.checks import REGISTRY
from callbacks.primitives.adapters import discover_adapters

adapters = pytest.importorskip("adapters")

ONLY = {name: {"enabled": False} for name in REGISTRY if name != "adapter_init"}


def monitor(**options):
    return Monitor(policy="log", checks={**ONLY, "adapter_init": options})


def of(findings, code):
    return [f for f in findings if f.code == code]


def bottleneck(init="mam_adapter", ln_before=False, train=True, **kw):
    model = tiny_bert_mlm()
    adapters.init(model)
    config = adapters.BnConfig(mh_adapter=False, output_adapter=True, reduction_factor=4, non_linearity="relu",
                               init_weights=init, ln_before=ln_before, **kw)
    model.add_adapter("bn", config=config)
    if train:
        model.train_adapter("bn")
    return model


def with_config(config, build=tiny_bert_mlm):
    model = build()
    adapters.init(model)
    model.add_adapter("x", config=config)
    model.train_adapter("x")
    return model


# -- healthy twins -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [
    lambda: bottleneck(),
    lambda: bottleneck(ln_before=True),
    lambda: bottleneck(ln_after=False, use_gating=True),
    lambda: with_config("lora"),
    lambda: with_config(adapters.ParBnConfig()),
], ids=["mam", "mam-ln-before", "mam-gated", "lora", "parallel"])
def test_identity_inits_are_clean_and_probed(build):
    model = build()
    assert discover_adapters(model)
    mon = monitor()
    assert mon.dispatch("init", model, step=0) == []
    assert mon.check("adapter_init").report_section()["probe_max_change"] == 0.0


@pytest.mark.parametrize("build", [
    lambda: bottleneck(init="bert"),
    lambda: bottleneck(init="houlsby"),
    lambda: with_config("mam"),  # prefix tuning + parallel bottleneck: the prefixes change the output
    lambda: with_config("prefix_tuning", build=tiny_gpt2),
], ids=["bert", "houlsby", "mam-union", "prefix"])
def test_non_identity_inits_are_reported_not_checked(build):
    found = monitor().dispatch("init", build(), step=0)
    assert [f.code for f in found] == ["CHECK_NOT_APPLICABLE"], [str(f) for f in found]
    assert found[0].severity == "info"


def test_gate_reinitialised_is_wrong():
    model = bottleneck(ln_after=False, use_gating=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".gate.bias" in name:
                p.fill_(2.0)  # a gate opened by hand-written init code
    wrong = of(monitor().dispatch("init", model, step=0), "ADAPTER_INIT_WRONG")
    assert [f.details["role"] for f in wrong] == ["gate.bias"] and len(wrong[0].params) == 2


def test_bottleneck_contract_is_read_from_config():
    from callbacks.checks.adapter_init import init_contract

    (unit, *_) = discover_adapters(bottleneck(ln_before=True))
    contract = init_contract(unit)
    assert contract.identity is True and contract.init == "init_weights='mam_adapter'"
    kinds = {r.role: r.kind for r in contract.rules}
    assert kinds["up.weight"] == "zero" and kinds["norm_before.weight"] == "ones"
    assert unit.part("norm_before.weight").name.endswith("adapter_norm_before.weight")
    (unit, *_) = discover_adapters(bottleneck(init="bert"))
    assert init_contract(unit).identity is False


# -- reproductions -------------------------------------------------------------------------------------------------

def adapter_transformers_mam_init(adapter_module):
    """The layout-assuming mam_adapter init of adapter-transformers: it takes ``adapter_down[0]`` to be the down
    projection. With ``ln_before=True`` that element is the LayerNorm, which gets the Linear's uniform init."""
    first = adapter_module.adapter_down[0]
    bound = 1 / math.sqrt(first.weight.shape[-1])  # kaiming_uniform_(a=sqrt(5)) of an nn.Linear
    with torch.no_grad():
        first.weight.uniform_(-bound, bound)
        first.bias.zero_()
        adapter_module.adapter_up.weight.zero_()
        adapter_module.adapter_up.bias.zero_()


def test_init_routine_touching_the_ln_before_layernorm():
    model = bottleneck(ln_before=True)
    layers = [m for m in model.modules() if isinstance(m, adapters.methods.modeling.Adapter)]
    assert isinstance(layers[0].adapter_down[0], nn.LayerNorm)
    for layer in layers:
        adapter_transformers_mam_init(layer)
    found = monitor().dispatch("init", model, step=0)
    wrong = of(found, "ADAPTER_INIT_WRONG")
    assert [(f.details["role"], f.details["problem"]) for f in wrong] == [("norm_before.weight", "not 1")]
    assert set(wrong[0].params) == {f"bert.encoder.layer.{i}.output.adapters.bn.adapter_norm_before.weight"
                                    for i in range(2)}
    assert "expected 1" in wrong[0].message and "ln_before" in wrong[0].hint
    # adapter_up is still zero, so the output is unchanged: only the parameter check can see this bug (it shows
    # once the up-projection starts learning from a badly scaled input)
    assert not of(found, "ADAPTER_NOT_IDENTITY")


def test_hf_init_weights_over_adapters_model_reinitialises_adapter_up():
    model = bottleneck()
    model.apply(model._init_weights)  # post_init-style re-init after add_adapter
    found = monitor().dispatch("init", model, step=0)
    up = [f for f in of(found, "ADAPTER_INIT_WRONG") if f.details["role"] == "up.weight"]
    assert len(up) == 1 and "expected 0" in up[0].message and "std 0.0" in up[0].message
    assert len(up[0].params) == 2
    assert of(found, "ADAPTER_NOT_IDENTITY")


def test_frozen_after_train_adapter():
    model = bottleneck()
    model.requires_grad_(False)
    frozen = of(monitor().dispatch("init", model, step=0), "ADAPTER_NOT_TRAINABLE")
    assert len(frozen) == 1 and len(frozen[0].params) == 8 and "train_adapter" in frozen[0].hint


def test_probe_restores_active_setup_rng_and_modes():
    model = bottleneck()
    model.train()
    setup = model.adapters_config.active_setup
    modes = {n: m.training for n, m in model.named_modules()}
    torch.manual_seed(5)
    random.seed(5)
    states = torch.get_rng_state(), random.getstate()
    assert monitor().dispatch("init", model, step=0) == []
    assert model.adapters_config.active_setup is setup
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]


# -- real HF Trainer runs under transformers 4.57 ----------------------------------------------------------------

def hf_train(model, tmp_path, callback, steps=3):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback]).train()


def test_hf_train_adapter_never_called_is_dead(tmp_path):
    from callbacks.hf import IntegrityCallback

    model = bottleneck(train=False)  # add_adapter only: the adapter is trainable but never activated
    callback = IntegrityCallback(policy="log", checks=ONLY)
    hf_train(model, tmp_path, callback)
    dead = of(callback.findings, "ADAPTER_DEAD")
    assert len(dead) == 1 and (dead[0].event, dead[0].step) == ("step", 1)
    assert "not active" in dead[0].message and len(dead[0].params) == 8


def test_hf_init_weights_raises_at_init(tmp_path):
    from callbacks.hf import IntegrityCallback

    model = bottleneck()
    model.apply(model._init_weights)
    with pytest.raises(IntegrityError) as info:
        hf_train(model, tmp_path, IntegrityCallback(checks=ONLY))
    assert {f.code for f in info.value.findings} >= {"ADAPTER_INIT_WRONG", "ADAPTER_NOT_IDENTITY"}


def test_hf_healthy_mam_bottleneck_trains_clean(tmp_path):
    from callbacks.hf import IntegrityCallback

    callback = IntegrityCallback(policy="raise", checks=ONLY)
    hf_train(bottleneck(ln_before=True), tmp_path, callback)
    assert callback.findings == []
    assert callback.report.sections["adapter_init"]["probe_max_change"] == 0.0
