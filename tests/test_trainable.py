"""Everything that should train does train, in real trainers: parameters no optimizer holds, a trainable set that
changes mid-run, parameters that never move; and the healthy twins (optimizer built after wrapping, a
BackboneFinetuning schedule, a frozen module left out on purpose, LoRA starting with B = 0, a GradScaler that skips
its first steps) clean."""

import pytest
import pytorch_lightning as pl
import torch
from accelerate import Accelerator
from models import LinguaLM, TokenDataset, lm_batches, tiny_gpt2
from torch import nn

from callbacks import IntegrityError, Monitor
from callbacks.accelerate import AcceleratorHooks
from callbacks.checks import REGISTRY

peft = pytest.importorskip("peft")

ONLY_TRAINABLE = {name: {"enabled": False} for name in REGISTRY if name != "trainable"}


def loud(findings):
    return [f for f in findings if f.severity in ("error", "warning") or f.code == "CHECK_FAILED"]


def codes(findings):
    return {f.code for f in findings}


# -- HF Trainer ----------------------------------------------------------------------------------------------------

def hf_train(model, tmp_path, callback, optimizer=None, max_steps=4):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-2, seed=0,
                             save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback],
                      optimizers=(optimizer, None) if optimizer is not None else (None, None))
    trainer.train()
    return trainer


def lora(model):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"]))


def test_hf_optimizer_built_before_get_peft_model_holds_no_adapter(tmp_path):
    from callbacks.hf import IntegrityCallback

    base = tiny_gpt2()
    optimizer = torch.optim.AdamW(base.parameters(), lr=1e-2)  # built on the base model, then wrapped
    model = lora(base)
    callback = IntegrityCallback(checks=ONLY_TRAINABLE)  # policy raise
    with pytest.raises(IntegrityError) as info:
        hf_train(model, tmp_path, callback, optimizer=optimizer)
    (finding,) = [f for f in info.value.findings if f.code == "TRAINABLE_NOT_OPTIMIZED"]
    assert (finding.event, finding.step) == ("init", 0)
    assert len(finding.params) == 4 and all("lora_" in n for n in finding.params)
    assert "transformer.h.0.attn.c_attn.lora_A.default.weight" in finding.params


def test_hf_lora_with_the_trainers_own_optimizer_is_clean(tmp_path):
    """Healthy twin: the Trainer builds the optimizer from the wrapped model; LoRA starts with B = 0, so A has
    a zero gradient at the first step and moves from the second."""
    from callbacks.hf import IntegrityCallback

    callback = IntegrityCallback(checks=ONLY_TRAINABLE)
    hf_train(lora(tiny_gpt2()), tmp_path, callback)
    assert loud(callback.findings) == []
    assert callback.monitor.check("trainable").moved >= {"transformer.h.0.attn.c_attn.lora_A.default.weight",
                                                         "transformer.h.0.attn.c_attn.lora_B.default.weight"}


def test_hf_parameter_group_with_learning_rate_zero_is_not_updated(tmp_path):
    from callbacks.hf import IntegrityCallback

    model = tiny_gpt2()
    head = [p for n, p in model.named_parameters() if n.startswith("transformer.ln_f")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("transformer.ln_f")]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": 1e-2}, {"params": head, "lr": 0.0}])
    callback = IntegrityCallback(policy="log", checks=ONLY_TRAINABLE)
    hf_train(model, tmp_path, callback, optimizer=optimizer)
    (finding,) = [f for f in callback.findings if f.code == "PARAM_NOT_UPDATED"]
    assert (finding.event, finding.step) == ("step", 3)
    assert set(finding.params) == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    assert "learning rate is 0" in finding.message


# -- Lightning -----------------------------------------------------------------------------------------------------

class Classifier(pl.LightningModule):
    """A backbone and a head; ``optimize`` says which parameters configure_optimizers returns."""

    def __init__(self, optimize="trainable", freeze_backbone=False):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)
        self.optimize = optimize
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        if self.optimize == "head":
            return torch.optim.AdamW(self.head.parameters(), lr=1e-2)
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def fit(module, tmp_path, callbacks, max_steps=6, epochs=None):
    trainer = pl.Trainer(max_steps=max_steps if epochs is None else -1, max_epochs=epochs, callbacks=callbacks,
                         default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4))
    return trainer


def test_lightning_configure_optimizers_listing_only_the_head(tmp_path):
    from callbacks.lightning import IntegrityCallback

    callback = IntegrityCallback(checks=ONLY_TRAINABLE)
    with pytest.raises(IntegrityError) as info:
        fit(Classifier(optimize="head"), tmp_path, [callback])
    (finding,) = [f for f in info.value.findings if f.code == "TRAINABLE_NOT_OPTIMIZED"]
    assert (finding.event, finding.step) == ("init", 0)
    assert set(finding.params) == {"backbone.0.weight", "backbone.0.bias", "backbone.2.weight", "backbone.2.bias"}


def test_lightning_frozen_backbone_left_out_of_the_optimizer_on_purpose_is_clean(tmp_path):
    from callbacks.lightning import IntegrityCallback

    callback = IntegrityCallback(checks=ONLY_TRAINABLE)
    fit(Classifier(freeze_backbone=True), tmp_path, [callback])
    assert loud(callback.findings) == []


class Unfreezing(pl.callbacks.BackboneFinetuning):
    """BackboneFinetuning that unfreezes at epoch 1 (the module's ``backbone`` attribute)."""

    def __init__(self):
        super().__init__(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0, backbone_initial_ratio_lr=0.1,
                         should_align=True, verbose=False)


def test_lightning_backbone_finetuning_schedule_is_info_only(tmp_path):
    """Healthy twin of a changing trainable set: BackboneFinetuning announces its schedule; its unfreezing is
    info, and the parameters it adds to the optimizer are held."""
    from callbacks.lightning import IntegrityCallback

    callback = IntegrityCallback(checks=ONLY_TRAINABLE)
    fit(Classifier(), tmp_path, [Unfreezing(), callback], epochs=2)
    assert loud(callback.findings) == []
    (changed,) = [f for f in callback.findings if f.code == "TRAINABLE_SET_CHANGED"]
    assert changed.severity == "info"
    assert changed.details["change"] == "became trainable" and "backbone.0.weight" in changed.params
    assert "Unfreezing" in changed.message


# -- accelerate loop -----------------------------------------------------------------------------------------------

def accelerate_loop(tmp_path, change_at=None, change=None, steps=5, checks=None):
    accelerator = Accelerator(cpu=True)
    model = lora(tiny_gpt2())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    hooks = AcceleratorHooks(accelerator, policy="log", checks=checks or ONLY_TRAINABLE)
    hooks.begin(model, optimizer=optimizer)
    for batch in lm_batches(steps):
        accelerator.backward(model(**batch).loss)
        hooks.before_optimizer_step(model, optimizer)
        optimizer.step()
        hooks.after_optimizer_step(model, optimizer)
        optimizer.zero_grad()
        if hooks.step == change_at:
            change(model)
    hooks.end(model)
    return hooks


def freeze_adapters(model):
    """Freeze the first layer's adapter (the loop's backward still has the second one to train)."""
    for name, p in model.named_parameters():
        if "lora_" in name and ".h.0." in name:
            p.requires_grad_(False)


def reregister_base_weights(model):
    """A parallelising step that re-creates parameters as ``nn.Parameter(t)``: requires_grad=True by default."""
    for module in model.modules():
        if isinstance(getattr(module, "base_layer", None), nn.Module):
            module.base_layer.weight = nn.Parameter(module.base_layer.weight.detach())


def test_accelerate_adapter_frozen_mid_run_is_reported_at_that_step(tmp_path):
    hooks = accelerate_loop(tmp_path, change_at=2, change=freeze_adapters)
    (changed,) = [f for f in hooks.findings if f.code == "TRAINABLE_SET_CHANGED"]
    assert (changed.event, changed.step, changed.severity) == ("step", 3, "error")
    assert changed.details["change"] == "became frozen" and len(changed.params) == 2
    assert all(".h.0." in n and "lora_" in n for n in changed.params)


def test_accelerate_base_weights_made_trainable_mid_run(tmp_path):
    hooks = accelerate_loop(tmp_path, change_at=2, change=reregister_base_weights)
    changed = [f for f in hooks.findings if f.code == "TRAINABLE_SET_CHANGED"]
    assert len(changed) == 1 and (changed[0].event, changed[0].step) == ("step", 3)
    assert set(changed[0].params) == {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"}
    (unheld,) = [f for f in hooks.findings if f.code == "TRAINABLE_NOT_OPTIMIZED"]
    assert set(unheld.params) == set(changed[0].params) and unheld.step == 3


def test_accelerate_declared_schedule_is_info(tmp_path):
    checks = {**ONLY_TRAINABLE, "trainable": {"expect_changes": ["*lora_*"]}}
    hooks = accelerate_loop(tmp_path, change_at=2, change=freeze_adapters, checks=checks)
    assert loud(hooks.findings) == []
    assert [f.severity for f in hooks.findings if f.code == "TRAINABLE_SET_CHANGED"] == ["info"]


def test_accelerate_healthy_lora_loop_is_clean(tmp_path):
    hooks = accelerate_loop(tmp_path)
    assert loud(hooks.findings) == []


# -- a custom loop with a GradScaler ---------------------------------------------------------------------------------

def scaled_loop(overflow_scale, steps):
    """A torch loop with a real GradScaler: a term whose gradient overflows while the scale is above
    ``overflow_scale`` (every step when it is 0) makes the scaler skip those steps."""
    model = LinguaLM()
    spike = nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([*model.parameters(), spike], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    monitor = Monitor(policy="log", checks=ONLY_TRAINABLE)
    holder = nn.ModuleDict({"lm": model})
    holder.register_parameter("spike", spike)
    monitor.dispatch("init", holder, step=0, optimizer=optimizer)
    for step, batch in enumerate(lm_batches(steps), 1):
        logits = model(batch["input_ids"])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        factor = float("inf") if overflow_scale == 0 else 3e38 / overflow_scale
        scaler.scale(loss + spike.sum() * factor).backward()
        scaler.unscale_(optimizer)
        monitor.dispatch("step", holder, step=step, phase="before_optimizer", optimizer=optimizer,
                         grad_scaler=scaler)
        scaler.step(optimizer)
        scaler.update()
        monitor.dispatch("step", holder, step=step, phase="after_optimizer", optimizer=optimizer,
                         grad_scaler=scaler)
        optimizer.zero_grad()
    monitor.dispatch("end", holder, step=steps)
    return monitor


def test_grad_scaler_skipping_its_first_steps_is_clean():
    monitor = scaled_loop(overflow_scale=2.0**11, steps=10)
    assert loud(monitor.findings) == []
    assert monitor.check("trainable").skipped_steps >= 3  # it did skip, and the check tolerated it


def test_grad_scaler_skipping_every_step_is_not_updated():
    monitor = scaled_loop(overflow_scale=0, steps=30)
    (finding,) = [f for f in monitor.findings if f.code == "PARAM_NOT_UPDATED"]
    assert finding.step == 25 and "tok_embeddings.weight" in " ".join(finding.params)
    assert "skipped" in finding.message
