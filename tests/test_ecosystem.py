"""The callbacks inside the tools users already run: HF's and TRL's reporters (a real TensorBoard event file
read back), Lightning's CLI of both packages, the pip-installed package's recipes."""

from __future__ import annotations

import glob

import pytest
from models import VOCAB, TokenDataset, tiny_gpt2
from transformers import Trainer, TrainerCallback, TrainingArguments

from callbacks.hf import IntegrityCallback

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under ``log_dir``: tag -> [(step, value)]."""
    found: dict[str, list[tuple[int, float]]] = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    # HF's closing summary log (train_runtime, ...) repeats the last step's values
    return {tag: sorted(set(points)) for tag, points in found.items()}


def tb_args(tmp_path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "out"), report_to=["tensorboard"],
                             max_steps=4, logging_steps=1, per_device_train_batch_size=4, save_strategy="no",
                             use_cpu=True, disable_tqdm=True, learning_rate=1e-2, **kwargs)


class UntieAfterFirstStep(TrainerCallback):
    """Replaces the head's Parameter after step 1: a silent untie the tie check reports at step 2."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            import torch

            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())


def test_hf_counts_reach_tensorboard_with_the_documented_one_liner(tmp_path):
    callback = IntegrityCallback(policy="log")
    trainer = Trainer(model=tiny_gpt2(), args=tb_args(tmp_path), train_dataset=TokenDataset(),
                      callbacks=[callback, UntieAfterFirstStep()])
    trainer.train()
    plotted = scalars(tmp_path / "out")
    assert "train/loss" in plotted
    assert plotted["train/integrity/errors"] == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0)]
    assert plotted["train/integrity/TIE_BROKEN"] == [(2, 1.0), (3, 1.0), (4, 1.0)]


def test_hf_clean_run_plots_a_flat_zero(tmp_path):
    trainer = Trainer(model=tiny_gpt2(), args=tb_args(tmp_path), train_dataset=TokenDataset(),
                      callbacks=[IntegrityCallback()])
    trainer.train()
    assert scalars(tmp_path / "out")["train/integrity/errors"] == [(1, 0.0), (2, 0.0), (3, 0.0), (4, 0.0)]


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 64 ids (no download)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="t1"))
    tokenizer.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="t0", pad_token="t0", unk_token="t1")


def test_trl_sft_trainer_with_lora_plots_the_counts(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = [{"input_ids": [int(t) for t in TokenDataset(n=16).ids[i]]} for i in range(16)]
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to=["tensorboard"],
                     max_steps=3, logging_steps=1, per_device_train_batch_size=4, save_strategy="no",
                     use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    callback = IntegrityCallback()
    trainer = SFTTrainer(model=tiny_gpt2(), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tiny_tokenizer(), callbacks=[callback],
                         peft_config=LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    trainer.train()
    assert [f for f in callback.findings if f.severity != "info"] == []
    assert scalars(tmp_path / "out")["train/integrity/errors"] == [(1, 0.0), (2, 0.0), (3, 0.0)]


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_lightning_plots_a_finding_at_the_step_the_report_names(tmp_path, package):
    """One step convention: a tie broken after step 2 is ``TIE_BROKEN step@3`` in the report, and the
    TensorBoard curve of the count jumps at step 3 (the user's loss stays at Lightning's own steps)."""
    pl = pytest.importorskip(package)
    import torch

    from callbacks.lightning import IntegrityCallback as LightningCallback

    class TiedModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(16, 8)
            self.head = torch.nn.Linear(8, 16, bias=False)
            self.head.weight = self.emb.weight

        def training_step(self, batch, batch_idx):
            (x,) = batch
            loss = torch.nn.functional.cross_entropy(self.head(self.emb(x)), x)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            tokens = torch.randint(0, 16, (64,), generator=torch.Generator().manual_seed(0))
            data = torch.utils.data.TensorDataset(tokens)
            return torch.utils.data.DataLoader(data, batch_size=8)

    class UntieAfterStep2(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2 and pl_module.head.weight is pl_module.emb.weight:
                pl_module.head.weight = torch.nn.Parameter(pl_module.emb.weight.detach().clone())

    callback = LightningCallback(policy="log", declare_ties=[("emb.weight", "head.weight")])
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=logger, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback, UntieAfterStep2()])
    trainer.fit(TiedModule())
    (broken,) = [f for f in callback.findings if f.code == "TIE_BROKEN"]
    assert (broken.event, broken.step) == ("step", 3)
    plotted = scalars(tmp_path / "tb")
    assert plotted["integrity/TIE_BROKEN"][0] == (3, 1.0)
    assert plotted["integrity/errors"] == [(1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0), (5, 1.0)]
    assert [step for step, _ in plotted["loss"]] == [0, 1, 2, 3, 4]  # Lightning's own convention, untouched
