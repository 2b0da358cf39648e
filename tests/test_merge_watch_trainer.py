"""``merge: {watch: true}`` in a real HF Trainer run: the user's own merge after training is checked."""

import warnings

import pytest
from models import TokenDataset, tiny_gemma2
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from callbacks.hf import IntegrityCallback

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize(("targets", "expected"), [(["lm_head"], ["MERGE_SIDE_EFFECT"]), (["q_proj", "v_proj"], [])],
                         ids=["tied_lm_head", "attention_only"])
def test_users_merge_after_train_is_checked_then_unwatched_after_close(tmp_path, targets, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_gemma2(tie=True), LoraConfig(r=4, target_modules=targets))
    callback = IntegrityCallback(policy="log", checks={"merge": {"watch": True}})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback]).train()
    before = len(callback.findings)

    merged = model.merge_and_unload()  # the user's own code, unchanged

    new = [f for f in callback.findings[before:] if f.severity == "error"]
    if not expected:
        assert new == []
    else:
        assert "MERGE_SIDE_EFFECT" in {f.code for f in new}
        (side,) = [f for f in new if f.code == "MERGE_SIDE_EFFECT"]
        assert side.params == ("model.embed_tokens.weight",) and (side.event, side.step) == ("merge", 2)
    assert merged is not None
    callback.monitor.close()
    assert "merge_and_unload" not in vars(model)  # the wrapper is gone from the instance
