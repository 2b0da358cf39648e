"""The adapter audit inside real HF Trainer and Lightning runs on real PEFT models: failures found at the right
event and step, healthy twins clean, and the identity probe leaves training bit-for-bit unchanged."""

import logging

import pytest
import torch
from models import TokenDataset, hf_lightning_module, lm_batches, tiny_gemma2, tiny_gpt2

from callbacks import IntegrityError
from callbacks.checks import REGISTRY

peft = pytest.importorskip("peft")

ONLY_ADAPTERS = {name: {"enabled": False} for name in REGISTRY if name != "adapter_init"}


def lora(model, targets=("q_proj", "v_proj"), **kw):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=list(targets), **kw))


def zero_every_lora_matrix(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.zero_()


# -- HF Trainer ----------------------------------------------------------------------------------------------------

class CountingDataset(TokenDataset):
    """TokenDataset that records which rows the data loader read."""

    def __init__(self):
        super().__init__()
        self.read = []

    def __getitem__(self, i):
        self.read.append(int(i))
        return super().__getitem__(i)


def hf_train(model, tmp_path, callbacks, max_steps=3, dataset=None, save_steps=None, resume=None):
    from transformers import Trainer, TrainingArguments

    saving = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {"save_strategy": "no"}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             report_to=[], logging_steps=1, use_cpu=True, disable_tqdm=True, learning_rate=1e-2,
                             seed=0, **saving)
    trainer = Trainer(model=model, args=args, train_dataset=dataset or TokenDataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_hf_post_init_after_get_peft_model_raises_at_init(tmp_path):
    from callbacks.hf import IntegrityCallback

    model = lora(tiny_gemma2())
    model.get_base_model().post_init()
    callback = IntegrityCallback(checks=ONLY_ADAPTERS)  # policy raise
    with pytest.raises(IntegrityError) as info:
        hf_train(model, tmp_path, [callback])
    wrong = [f for f in info.value.findings if f.code == "ADAPTER_INIT_WRONG" and f.details["role"] == "lora_B"]
    assert len(wrong) == 1 and (wrong[0].event, wrong[0].step) == ("init", 0)
    assert len(wrong[0].params) == 4 and all("lora_B" in n for n in wrong[0].params)
    assert "ADAPTER_NOT_IDENTITY" in {f.code for f in info.value.findings}


def test_hf_both_factors_zero_is_dead_at_step_one(tmp_path):
    from callbacks.hf import IntegrityCallback

    model = lora(tiny_gemma2())
    zero_every_lora_matrix(model)
    callback = IntegrityCallback(policy="log", checks=ONLY_ADAPTERS)
    hf_train(model, tmp_path, [callback])
    dead = [f for f in callback.findings if f.code == "ADAPTER_DEAD"]
    assert len(dead) == 1 and (dead[0].event, dead[0].step) == ("step", 1)
    assert len(dead[0].params) == 8


def test_hf_healthy_lora_is_clean_and_the_probe_changes_nothing(tmp_path):
    """Same seed, with and without the probe: identical losses (dropout on, so RNG use would show) and the data
    loader read the same rows in the same order."""
    from callbacks.hf import IntegrityCallback

    runs = []
    for probe in (True, False):
        dataset = CountingDataset()
        callback = IntegrityCallback(policy="raise", checks={**ONLY_ADAPTERS, "adapter_init": {"probe": probe}})
        model = lora(tiny_gpt2(), targets=["c_attn", "c_fc"], lora_dropout=0.1)
        trainer = hf_train(model, tmp_path / str(probe), [callback], dataset=dataset)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs.append((losses, dataset.read, callback))
    (losses_on, read_on, cb_on), (losses_off, read_off, _) = runs
    assert cb_on.findings == []
    assert cb_on.report.sections["adapter_init"]["probe_max_change"] == 0.0
    assert len(losses_on) == 3 and losses_on == losses_off
    assert read_on == read_off


def test_hf_resumed_run_does_not_judge_trained_adapters_as_fresh(tmp_path):
    """After a resume, B is non-zero by training: no init-contract finding, no probe (the run is not fresh)."""
    from callbacks.hf import IntegrityCallback

    hf_train(lora(tiny_gemma2()), tmp_path, [IntegrityCallback(policy="raise", checks=ONLY_ADAPTERS)],
             max_steps=2, save_steps=2)
    callback = IntegrityCallback(policy="raise", checks=ONLY_ADAPTERS)
    hf_train(lora(tiny_gemma2()), tmp_path, [callback], max_steps=4, save_steps=2, resume=True)
    assert callback.findings == []
    assert callback.monitor.check("adapter_init").loaded
    forced = IntegrityCallback(policy="log", checks={**ONLY_ADAPTERS, "adapter_init": {"fresh": True}})
    hf_train(lora(tiny_gemma2()), tmp_path, [forced], max_steps=4, save_steps=2, resume=True)
    assert {f.details.get("role") for f in forced.findings if f.code == "ADAPTER_INIT_WRONG"} >= {"lora_B"}


# -- Lightning -----------------------------------------------------------------------------------------------------

def lightning_fit(module, tmp_path, callbacks, max_steps=3):
    import pytorch_lightning as pl

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    trainer = pl.Trainer(max_steps=max_steps, callbacks=callbacks, default_root_dir=str(tmp_path), logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         enable_checkpointing=False)
    loader = torch.utils.data.DataLoader(lm_batches(8), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def test_lightning_both_factors_zero_is_dead_at_step_one(tmp_path):
    from callbacks.lightning import IntegrityCallback

    model = lora(tiny_gemma2())
    zero_every_lora_matrix(model)
    callback = IntegrityCallback(policy="log", checks=ONLY_ADAPTERS)
    lightning_fit(hf_lightning_module(model), tmp_path, [callback])
    dead = [f for f in callback.findings if f.code == "ADAPTER_DEAD"]
    assert len(dead) == 1 and (dead[0].event, dead[0].step) == ("step", 1)
    assert all(n.startswith("model.") and "lora_" in n for n in dead[0].params)


def test_lightning_post_init_raises_at_fit_start(tmp_path):
    from callbacks.lightning import IntegrityCallback

    model = lora(tiny_gemma2())
    model.get_base_model().post_init()
    with pytest.raises(IntegrityError) as info:
        lightning_fit(hf_lightning_module(model), tmp_path, [IntegrityCallback(checks=ONLY_ADAPTERS)])
    assert {f.code for f in info.value.findings} == {"ADAPTER_INIT_WRONG", "ADAPTER_NOT_IDENTITY"}


def test_lightning_healthy_lora_is_clean_and_probed(tmp_path):
    from callbacks.lightning import IntegrityCallback

    callback = IntegrityCallback(policy="raise", checks=ONLY_ADAPTERS)
    lightning_fit(hf_lightning_module(lora(tiny_gemma2())), tmp_path, [callback])
    assert callback.findings == []
    assert callback.report.sections["adapter_init"]["probe_max_change"] == 0.0
