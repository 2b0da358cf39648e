"""HF resume with the callback's exported state, in real Trainer runs that save and resume.

HF rebuilds ``ExportableState`` callbacks from their exported ``args`` when
``restore_callback_states_from_checkpoint=True``, stores same-named callbacks as one list that grows at every save,
and writes ``trainer_state.json`` before ``on_save``. These tests pin that a resumed run gets the same
configuration back, the findings of the checkpoint it resumes from, and that two callbacks each get their own.
"""

from __future__ import annotations

import json
import warnings

from models import ImageDataset, tiny_vit_classifier
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from callbacks.hf import IntegrityCallback

SAVED_STATE_ONLY = {name: {"enabled": False} for name in ("ties", "adapter_init", "hashes", "merge")}
TIES_ONLY = {name: {"enabled": False} for name in ("saved_state", "adapter_init", "hashes", "merge")}


def vit_lora(unsaved: bool = True):
    """LoRA on q/v; with ``unsaved`` the position embeddings are unfrozen by hand, which PEFT never saves
    (an ``UNSAVED_TRAINABLE`` error at every checkpoint event: a finding each checkpoint's own event makes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_vit_classifier(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    if unsaved:
        model.base_model.model.vit.embeddings.position_embeddings.requires_grad_(True)
    return model


def train(tmp_path, callbacks, max_steps, resume=None, restore=True, unsaved=True):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             save_steps=1, report_to=[], logging_steps=1000, use_cpu=True, disable_tqdm=True,
                             learning_rate=1e-2, remove_unused_columns=False,
                             restore_callback_states_from_checkpoint=restore)
    trainer = Trainer(model=vit_lora(unsaved), args=args, train_dataset=ImageDataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def integrity_callbacks(trainer):
    return [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, IntegrityCallback)]


def stored_entries(checkpoint):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    entries = state["stateful_callbacks"]["IntegrityCallback"]
    return entries if isinstance(entries, list) else [entries]


def events(findings, code):
    return sorted({(f.event, f.step) for f in findings if f.code == code}, key=str)


def test_checkpoint_holds_its_own_events_findings(tmp_path):
    callback = IntegrityCallback(policy="log", checks=SAVED_STATE_ONLY)
    train(tmp_path, [callback], max_steps=2)
    (entry,) = stored_entries(tmp_path / "checkpoint-1")
    stored = [(f["code"], f["event"], f["step"]) for f in entry["monitor_state"]["findings"]]
    assert ("UNSAVED_TRAINABLE", "checkpoint", 1) in stored  # HF wrote the file before this event ran
    assert ("UNSAVED_TRAINABLE", "checkpoint", 2) not in stored
    assert entry["state_key"] == callback.state_key
    assert entry["args"] == callback.constructor_args()
    json.dumps(entry["args"])  # JSON data


def test_restore_rebuilds_the_same_configuration_with_checkpoint_findings(tmp_path):
    report = tmp_path / "integrity.json"
    first = IntegrityCallback(policy="log", checks=SAVED_STATE_ONLY, report=str(report))
    train(tmp_path, [first], max_steps=2)

    # HF replaces the callback given here by one rebuilt from checkpoint-1's args: policy raise would stop
    # this run at the unsaved parameter, the restored policy log does not
    resumed = train(tmp_path, [IntegrityCallback()], max_steps=3, resume=str(tmp_path / "checkpoint-1"))
    (rebuilt,) = integrity_callbacks(resumed)
    assert rebuilt.constructor_args() == first.constructor_args()
    assert rebuilt.state_key == first.state_key
    found = [(f.event, f.step) for f in rebuilt.findings if f.code == "UNSAVED_TRAINABLE"]
    assert found.count(("checkpoint", 1)) == 1  # restored from checkpoint-1, found by its own event
    # the first run's checkpoint-2 finding is not in checkpoint-1; the resumed run saves checkpoints 2 and 3 itself
    assert found.count(("checkpoint", 2)) == 1
    assert found.count(("checkpoint", 3)) == 1
    assert json.loads(report.read_text())["findings"]


def test_two_callbacks_each_restore_their_own_state(tmp_path):
    saved_state = IntegrityCallback(policy="log", checks=SAVED_STATE_ONLY)
    ties = IntegrityCallback(policy="log", checks=TIES_ONLY)
    train(tmp_path, [saved_state, ties], max_steps=2)
    entries = stored_entries(tmp_path / "checkpoint-2")
    assert len(entries) == 6  # HF appends both callbacks' states at every save, after the initial two
    assert {e["state_key"] for e in entries} == {saved_state.state_key, ties.state_key}

    resumed = train(tmp_path, [IntegrityCallback(), IntegrityCallback()], max_steps=3,
                    resume=str(tmp_path / "checkpoint-2"))
    by_key = {cb.state_key: cb for cb in integrity_callbacks(resumed)}
    assert set(by_key) == {saved_state.state_key, ties.state_key}
    restored_saved_state = by_key[saved_state.state_key]
    found = [(f.event, f.step) for f in restored_saved_state.findings if f.code == "UNSAVED_TRAINABLE"]
    # the first run's findings up to checkpoint-2's own event, then the resumed run's
    assert found == [("init", 0), ("checkpoint", 1), ("checkpoint", 2), ("init", 2), ("checkpoint", 3)]
    assert not [f for f in by_key[ties.state_key].findings if f.check == "saved_state"]


def test_resume_without_restore_keeps_the_users_callback_and_restores_its_state(tmp_path):
    train(tmp_path, [IntegrityCallback(policy="log", checks=SAVED_STATE_ONLY)], max_steps=2, restore=False)
    mine = IntegrityCallback(policy="log", checks=SAVED_STATE_ONLY)
    resumed = train(tmp_path, [mine], max_steps=3, resume=str(tmp_path / "checkpoint-2"), restore=False)
    assert integrity_callbacks(resumed) == [mine]
    assert {("checkpoint", 1), ("checkpoint", 2), ("checkpoint", 3)} <= set(events(mine.findings,
                                                                                    "UNSAVED_TRAINABLE"))


def test_healthy_resume_restores_clean(tmp_path):
    first = IntegrityCallback(policy="raise")
    train(tmp_path, [first], max_steps=2, unsaved=False)
    resumed = train(tmp_path, [IntegrityCallback(policy="log")], max_steps=3, resume=str(tmp_path / "checkpoint-2"),
                    unsaved=False)
    (rebuilt,) = integrity_callbacks(resumed)
    assert rebuilt.constructor_args() == first.constructor_args()
    assert [f for f in rebuilt.findings if f.severity != "info"] == []
