"""The HF Trainer integration in real Trainer runs: event order, tie failures at the right event, resume."""

import json
import os

import pytest
import torch
from models import TokenDataset, tiny_bert_mlm, tiny_gemma2, tiny_gpt2
from recording import RecordingCheck
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from callbacks import IntegrityError
from callbacks.hf import IntegrityCallback

ONLY_TIES = {name: {"enabled": False} for name in ("adapter_init", "saved_state", "hashes", "merge")}


def train(model, tmp_path, callbacks, max_steps=4, save_steps=2, resume=None, **kwargs):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             save_steps=save_steps, report_to=[], logging_steps=1000, use_cpu=True,
                             disable_tqdm=True, learning_rate=1e-2, **kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def problems(findings):
    return [f for f in findings if f.severity != "info"]


def test_event_order_with_gradient_accumulation(tmp_path):
    recorder = RecordingCheck()
    callback = IntegrityCallback(policy="log", extra_checks=[recorder])
    train(tiny_gpt2(), tmp_path, [callback], max_steps=2, save_steps=2, gradient_accumulation_steps=2)
    assert recorder.seen == [
        ("init", None, 0),
        ("step", "before_optimizer", 1), ("step", "after_optimizer", 1),
        ("step", "before_optimizer", 2), ("step", "after_optimizer", 2),
        ("checkpoint", None, 2),
        ("end", None, 2),
    ]
    assert recorder.clipped == [True, True]  # HF clips before on_pre_optimizer_step


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_gemma2, tiny_bert_mlm], ids=["gpt2", "gemma2", "bert_mlm"])
def test_healthy_tied_models_train_clean_with_defaults(tmp_path, build):
    callback = IntegrityCallback(policy="raise")  # every check at its defaults
    train(build(), tmp_path, [callback])
    assert problems(callback.findings) == []
    assert callback.report.sections["ties"]["tie_map"]["groups"]


def test_replaced_head_raises_at_init(tmp_path):
    model = tiny_gemma2(tie=True)
    model.lm_head = nn.Linear(32, 64, bias=False)
    callback = IntegrityCallback(checks=ONLY_TIES)
    with pytest.raises(IntegrityError) as info:
        train(model, tmp_path, [callback])
    (finding,) = info.value.findings
    assert (finding.code, finding.event, finding.step) == ("TIE_BROKEN", "init", 0)
    assert finding.params == ("lm_head.weight", "model.embed_tokens.weight")


class UntieAt(TrainerCallback):
    """A user's callback that replaces the head's Parameter after a given step (a silent untie)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())


def test_tie_broken_during_training_found_at_next_step(tmp_path):
    callback = IntegrityCallback(policy="log", checks=ONLY_TIES)
    train(tiny_gpt2(), tmp_path, [callback, UntieAt(1)])
    broken = [f for f in callback.findings if f.code == "TIE_BROKEN"]
    assert len(broken) == 1
    assert (broken[0].event, broken[0].step) == ("step", 2)
    assert broken[0].params == ("lm_head.weight", "transformer.wte.weight")


def test_healthy_twin_without_untie_is_clean(tmp_path):
    callback = IntegrityCallback(policy="log", checks=ONLY_TIES)
    train(tiny_gpt2(), tmp_path, [callback])
    assert problems(callback.findings) == []


def test_resume_from_checkpoint_with_conflicting_tied_values(tmp_path):
    first = IntegrityCallback(policy="log", checks=ONLY_TIES)
    train(tiny_gpt2(), tmp_path, [first], max_steps=2, save_steps=2)
    checkpoint = tmp_path / "checkpoint-2"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert "IntegrityCallback" in state["stateful_callbacks"]  # the monitor's state travels with checkpoints
    # an edited/merged checkpoint stores the head separately with other values than the embedding
    weights = load_file(str(checkpoint / "model.safetensors"))
    weights["lm_head.weight"] = weights["transformer.wte.weight"] + 0.25
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})

    resumed = IntegrityCallback(policy="log", checks=ONLY_TIES)
    train(tiny_gpt2(), tmp_path, [resumed], max_steps=3, save_steps=10, resume=str(checkpoint))
    conflicts = [f for f in resumed.findings if f.code == "TIE_CHECKPOINT_CONFLICT"]
    assert len(conflicts) == 1
    assert (conflicts[0].event, conflicts[0].step) == ("load", 2)
    assert conflicts[0].params == ("lm_head.weight", "transformer.wte.weight")
    assert conflicts[0].details["max_abs_diff"] == pytest.approx(0.25)


def test_resume_from_consistent_checkpoint_is_clean(tmp_path):
    train(tiny_gpt2(), tmp_path, [IntegrityCallback(policy="log", checks=ONLY_TIES)], max_steps=2, save_steps=2)
    resumed = IntegrityCallback(policy="log", checks=ONLY_TIES)
    train(tiny_gpt2(), tmp_path, [resumed], max_steps=3, save_steps=10,
          resume=os.path.join(tmp_path, "checkpoint-2"))
    assert problems(resumed.findings) == []
    assert ("load" in {f.event for f in resumed.findings}) is False


def test_checks_do_not_change_training(tmp_path):
    """Read-only: the same seeded run gives bitwise the same weights with and without the callback."""
    torch.manual_seed(0)
    plain = train(tiny_gpt2(), tmp_path / "a", [], max_steps=3, save_steps=10, seed=1)
    checked = train(tiny_gpt2(), tmp_path / "b", [IntegrityCallback(policy="log")], max_steps=3, save_steps=10,
                    seed=1)
    for (name, a), (_, b) in zip(plain.model.state_dict().items(), checked.model.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


class LinguaForTrainer(nn.Module):
    """The hand-written Lingua-style LM with the loss HF Trainer expects; ``meta_init`` materialises it from meta."""

    def __init__(self, meta_init=False):
        super().__init__()
        from models import LinguaLM

        if meta_init:
            with torch.device("meta"):
                self.lm = LinguaLM()
            self.lm.to_empty(device="cpu")
            for p in self.lm.parameters():
                nn.init.normal_(p, std=0.02)
        else:
            self.lm = LinguaLM()

    def forward(self, input_ids, labels):
        logits = self.lm(input_ids)
        return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


@pytest.mark.parametrize("meta_init", [True, False], ids=["meta_to_empty", "healthy"])
def test_hand_written_lingua_model_in_hf_trainer(tmp_path, meta_init):
    callback = IntegrityCallback(policy="log", declare_ties=[("tok_embeddings.weight", "output.weight")])
    train(LinguaForTrainer(meta_init), tmp_path, [callback], max_steps=2, save_strategy="no")
    broken = [(f.code, f.event, f.step, f.params) for f in problems(callback.findings)]
    expected = [("TIE_BROKEN", "init", 0, ("lm.output.weight", "lm.tok_embeddings.weight"))] if meta_init else []
    assert broken == expected


def test_the_callback_writes_the_html_report_beside_the_json_and_prints_the_table_once(tmp_path, capsys):
    report = tmp_path / "reports" / "integrity.json"
    callback = IntegrityCallback(policy="log", checks=ONLY_TIES, report=str(report))
    train(tiny_gpt2(), tmp_path, [callback, UntieAt(1)])
    out = capsys.readouterr().out
    assert out.count("integrity report") == 1
    assert out.strip().splitlines()[-2:] == [f"integrity: JSON report {report}",
                                             f"integrity: HTML report {report.with_suffix('.html')}"]
    assert "TIE_BROKEN" in report.with_suffix(".html").read_text()
    assert json.loads(report.read_text())["counts"] == {"TIE_BROKEN": 1}


def test_checked_merge_after_training_as_the_readme_shows_reports_the_last_step(tmp_path):
    """``cb.monitor.checked_merge(model)`` with no step: the merge's findings are ``merge@<last step>``, the
    convention of every other event (not ``merge@None``)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_gemma2(tie=True), LoraConfig(r=4, target_modules=["lm_head"]))
    callback = IntegrityCallback(policy="log")
    train(model, tmp_path, [callback], max_steps=3, save_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        callback.monitor.checked_merge(model)
    merged = [f for f in callback.findings if f.event == "merge"]
    assert {f.code for f in merged} >= {"MERGE_SIDE_EFFECT", "TIE_BROKEN"}
    assert {f.where for f in merged} == {"merge@3"}
