"""Launched by tests/test_replicas.py as ``python lightning_replicas.py OUT_DIR``: Lightning's ``ddp`` strategy
with 2 CPU processes re-runs this script for rank 1 itself (gloo).

Runs ``healthy``, ``grad`` (rank 1 adds 1e-3 to one gradient in on_before_optimizer_step of step 2, after
DDP's all-reduce), ``param`` (rank 1 adds 1e-3 to one parameter after optimizer step 2) and ``untie`` (rank 1
alone replaces the hand-tied head's Parameter after step 2: a finding only rank 1 sees, which must reach rank 0's
report) in sequence, with the IntegrityCallback (policy log, defaults otherwise). Each rank writes
``OUT_DIR/<job>.rank<r>.json``.
"""

import json
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tests/ (models)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from models import LinguaLM, lm_batches  # noqa: E402
from torch import nn  # noqa: E402

from callbacks.lightning import IntegrityCallback  # noqa: E402

torch.set_num_threads(1)
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
OUT = sys.argv[1]
TARGET = "model.layers.1.1.weight"


class LinguaModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = LinguaLM()

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["input_ids"])
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class PerturbOnRank1(pl.Callback):
    """A rank-dependent bug at step 2: a gradient after the all-reduce, or a parameter after the step."""

    def __init__(self, what):
        self.what = what

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.what == "grad" and trainer.global_step + 1 == 2 and trainer.global_rank == 1:
            pl_module.get_parameter(TARGET).grad.add_(1e-3)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.what == "param" and trainer.global_step == 2 and trainer.global_rank == 1:
            with torch.no_grad():
                pl_module.get_parameter(TARGET).add_(1e-3)
        if self.what == "untie" and trainer.global_step == 2 and trainer.global_rank == 1:
            pl_module.model.output.weight = nn.Parameter(pl_module.model.output.weight.detach().clone())


def run(job):
    integrity = IntegrityCallback(policy="log", checks={"hashes": {"timeout_s": 30}})
    callbacks = ([] if job == "healthy" else [PerturbOnRank1(job)]) + [integrity]
    trainer = pl.Trainer(max_steps=3, callbacks=callbacks, default_root_dir=os.path.join(OUT, job), logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accelerator="cpu", devices=2, strategy="ddp")
    loader = torch.utils.data.DataLoader(lm_batches(8, batch=2), batch_size=None)
    trainer.fit(LinguaModule(), train_dataloaders=loader)
    with open(os.path.join(OUT, f"{job}.rank{trainer.global_rank}.json"), "w") as fh:
        json.dump({"findings": [f.to_dict() for f in integrity.findings],
                   "section": integrity.report.sections.get("hashes")}, fh, default=str)


for job in ("healthy", "grad", "param", "untie"):
    run(job)
