"""Saved-state coverage in real Lightning runs: an on_save_checkpoint keeping only adapter keys drops a trained head."""

from __future__ import annotations

import glob
import logging

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from callbacks import IntegrityError
from callbacks.checks.saved_state import check_checkpoint
from callbacks.lightning import IntegrityCallback
from callbacks.primitives.checkpoints import list_checkpoint

ONLY_SAVED_STATE = {name: {"enabled": False} for name in ("ties", "adapter_init", "hashes", "merge")}

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


class AdapterClassifier(pl.LightningModule):
    """A frozen backbone with a trainable bottleneck adapter and a trainable classification head.

    ``save`` picks what the user's checkpoint code keeps: ``adapter_only`` (the bug: a filter on names written
    for the adapter, while the head trains too), ``trainable`` (the fix: filter on requires_grad), ``all``.
    ``override_state_dict`` drops the head in ``state_dict()`` itself instead.
    """

    def __init__(self, save: str = "all", override_state_dict: bool = False):
        super().__init__()
        self.save, self.override_state_dict = save, override_state_dict
        self.backbone = nn.Linear(8, 8)
        self.adapter_down, self.adapter_up = nn.Linear(8, 2), nn.Linear(2, 8)
        nn.init.zeros_(self.adapter_up.weight)
        self.head = nn.Linear(8, 3)
        self.backbone.requires_grad_(False)

    def forward(self, x):
        h = self.backbone(x)
        return self.head(h + self.adapter_up(self.adapter_down(h)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def on_save_checkpoint(self, checkpoint):
        if self.save == "adapter_only":
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "adapter" in k}
        elif self.save == "trainable":
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self.override_state_dict:
            for key in [k for k in state if k.startswith("head.")]:
                del state[key]
        return state


def fit(module, tmp_path, callback, max_steps=2):
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[callback], default_root_dir=str(tmp_path), logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4))
    (ckpt,) = glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
    return ckpt


def test_on_save_checkpoint_keeping_only_adapter_keys_drops_the_trained_head(tmp_path):
    callback = IntegrityCallback(policy="log", checks=ONLY_SAVED_STATE)
    ckpt = fit(AdapterClassifier(save="adapter_only"), tmp_path, callback, max_steps=2)
    found = [f for f in callback.findings if f.check == "saved_state"]
    assert sorted((f.code, f.event, f.step, f.params) for f in found) == [
        ("UNSAVED_TRAINABLE", "checkpoint", 2, ("head.bias",)),
        ("UNSAVED_TRAINABLE", "checkpoint", 2, ("head.weight",)),
    ]
    assert "on_save_checkpoint" in found[0].hint and "requires_grad" in found[0].hint
    # the file Lightning wrote really lacks the head, and the file reader says so too
    assert not any(k.startswith("head.") for k in list_checkpoint(ckpt).keys)
    on_disk = check_checkpoint(AdapterClassifier(), ckpt, trainer="lightning")
    assert {f.params for f in on_disk} == {("head.weight",), ("head.bias",)}


@pytest.mark.parametrize("save", ["trainable", "all"])
def test_saving_every_trainable_parameter_is_clean(tmp_path, save):
    callback = IntegrityCallback(checks={**ONLY_SAVED_STATE, "saved_state": {"verify_values": True}})  # raise
    ckpt = fit(AdapterClassifier(save=save), tmp_path, callback)
    assert [f for f in callback.findings if f.check == "saved_state"] == []
    assert check_checkpoint(AdapterClassifier(), ckpt, trainer="lightning") == []


def test_state_dict_override_dropping_the_head_raises_at_init(tmp_path):
    callback = IntegrityCallback(checks=ONLY_SAVED_STATE)  # policy raise
    with pytest.raises(IntegrityError) as info:
        fit(AdapterClassifier(override_state_dict=True), tmp_path, callback)
    assert sorted((f.code, f.event, f.step, f.params) for f in info.value.findings) == [
        ("UNSAVED_TRAINABLE", "init", 0, ("head.bias",)),
        ("UNSAVED_TRAINABLE", "init", 0, ("head.weight",)),
    ]
