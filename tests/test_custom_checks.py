"""A custom check can not kill training: each way it can break is one CHECK_FAILED naming it, in a real HF Trainer
run with checkpoints (policy ``raise``), and the report, the save and the resume still work."""

from __future__ import annotations

import json
import os

import pytest
import torch
from models import TokenDataset, tiny_gpt2
from transformers import Trainer, TrainingArguments

from callbacks import IntegrityError, Monitor
from callbacks.checks.base import Check
from callbacks.hf import IntegrityCallback


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("the message itself raises")


class RaisesUnprintable(Check):
    name = "unprintable"

    def on_step(self, ctx):
        raise Unprintable()


class BadSection(Check):
    name = "bad_section"

    def report_section(self):
        raise RuntimeError("section broke")


class NotAFinding(Check):
    name = "not_a_finding"

    def on_step(self, ctx):
        return ["a string, not a Finding"]


class TensorInDetails(Check):
    name = "tensor_details"

    def on_init(self, ctx):
        return [self.finding("CHECK_NOT_APPLICABLE", ctx, params=(), message="a fact with a tensor attached",
                             hint="none needed", tensor=torch.ones(2, 3))]


class BadState(Check):
    name = "bad_state"

    def state_dict(self):
        raise RuntimeError("state broke")


class Healthy(Check):
    name = "healthy_custom"

    def on_step(self, ctx):
        return ()

    def state_dict(self):
        return {"seen": 1}


BROKEN = {"unprintable": RaisesUnprintable, "bad_section": BadSection, "not_a_finding": NotAFinding,
          "tensor_details": TensorInDetails, "bad_state": BadState}


def train(tmp_path, check, steps=2, resume=None):
    callback = IntegrityCallback(policy="raise", extra_checks=[check])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, save_steps=1, per_device_train_batch_size=4,
                             report_to=[], logging_steps=1000, use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return callback, trainer


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_custom_check_never_stops_training(tmp_path, name):
    callback, trainer = train(tmp_path, BROKEN[name]())
    assert trainer.state.global_step == 2  # trained to the end under policy raise
    assert os.path.isdir(tmp_path / "checkpoint-2")  # HF saved its checkpoints (with the monitor's state)
    report = callback.report  # the report is not lost
    json.loads(report.to_json())
    failed = [f for f in callback.findings if f.code == "CHECK_FAILED"]
    if name == "bad_section":
        assert "report_section() raised RuntimeError: section broke" in report.sections[name]["check_failed"]
        assert failed == []
        return
    if name == "tensor_details":  # a fact, kept, with the tensor described in JSON-safe form
        (fact,) = [f for f in callback.findings if f.check == name]
        assert fact.details["tensor"] == "<Tensor shape [2, 3]>"
        return
    assert failed and {f.check for f in failed} == {name}
    expected = {"unprintable": "Unprintable (its message could not be rendered)",
                "not_a_finding": "where a Finding was expected", "bad_state": "state_dict() raised RuntimeError"}[name]
    assert expected in failed[0].message


def test_a_healthy_custom_check_is_silent_and_its_state_resumes(tmp_path):
    callback, _ = train(tmp_path, Healthy())
    assert callback.findings == [] or all(f.severity == "info" and f.code != "CHECK_FAILED" for f in callback.findings)
    resumed, _ = train(tmp_path, Healthy(), steps=3, resume=str(tmp_path / "checkpoint-2"))
    assert [f for f in resumed.findings if f.code == "CHECK_FAILED"] == []


def test_malformed_saved_state_is_check_failed_and_training_goes_on():
    monitor = Monitor(policy="raise")
    monitor.load_state_dict({"findings": [{"code": "NOT_A_CODE"}], "checks": []})
    (failed,) = monitor.findings
    assert failed.code == "CHECK_FAILED" and failed.check == "engine" and "could not be restored" in failed.message
    monitor.load_state_dict("not even a mapping")
    assert [f.code for f in monitor.findings] == ["CHECK_FAILED", "CHECK_FAILED"]


def test_raise_with_an_unwritable_report_path_still_raises(tmp_path, caplog):
    from models import LinguaLM

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = LinguaLM(tie=False)
    model.output.weight = model.tok_embeddings.weight  # then broken below: a declared tie that does not hold
    model.output.weight = torch.nn.Parameter(model.tok_embeddings.weight.detach().clone())
    monitor = Monitor(policy="raise", declare_ties=[("tok_embeddings.weight", "output.weight")],
                      report=str(blocker / "report.json"))
    with pytest.raises(IntegrityError):
        monitor.dispatch("init", model, step=0)
    assert "could not write the JSON report" in caplog.text


def test_resume_from_a_checkpoint_with_malformed_monitor_state_goes_on(tmp_path):
    """The saved monitor state edited into nonsense in trainer_state.json: the resumed run trains to the end with
    one CHECK_FAILED from the engine, and no other alarm."""
    train(tmp_path, Healthy())
    state_file = tmp_path / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    entry = state["stateful_callbacks"]["IntegrityCallback"]
    (entry[0] if isinstance(entry, list) else entry)["monitor_state"] = {"findings": [{"code": 7}], "checks": "x"}
    state_file.write_text(json.dumps(state))
    resumed, trainer = train(tmp_path, Healthy(), steps=3, resume=str(tmp_path / "checkpoint-2"))
    assert trainer.state.global_step == 3
    failed = [f for f in resumed.findings if f.code == "CHECK_FAILED"]
    assert [f.check for f in failed] == ["engine"] and "could not be restored" in failed[0].message
    assert [f for f in resumed.findings if f.severity == "error"] == []
