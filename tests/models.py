"""Tiny models for tests, built from configs or written by hand. Nothing is downloaded."""

from __future__ import annotations

import torch

from callbacks.runner import gallery

VOCAB = 64


def tiny_gpt2(tie: bool = True, seed: int = 0, n_layer: int = 2):
    """GPT2LMHeadModel with a 64-token vocabulary; ``tie`` sets ``tie_word_embeddings``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=n_layer, n_head=2,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie)
    return GPT2LMHeadModel(config)


def tiny_gemma2(tie: bool = True, seed: int = 0):
    """Gemma2ForCausalLM (``tie_word_embeddings=True`` by default, as the released models)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                          tie_word_embeddings=tie, attn_implementation="eager")
    return Gemma2ForCausalLM(config)


def tiny_bert_mlm(seed: int = 0):
    """BertForMaskedLM: decoder weight tied to word embeddings, decoder bias tied to cls.predictions.bias."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return BertForMaskedLM(config)


def tiny_vit_classifier(seed: int = 0, num_labels: int = 3):
    """ViTForImageClassification on 16x16 images (bare ``position_embeddings`` / ``cls_token`` Parameters)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=num_labels)
    return ViTForImageClassification(config)


class LinguaLM(gallery.LinguaLM):
    """The gallery's Lingua-style LM (head tied by hand: ``output.weight = tok_embeddings.weight``) with a
    64-token vocabulary, whose forward returns the logits tensor (batch, seq, vocab)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, n_layers: int = 2, tie: bool = True):
        super().__init__(vocab_size=vocab, dim=dim, n_layers=n_layers, tie=tie)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, seq, vocab)."""
        return super().forward(input_ids)["logits"]


def lm_batches(n: int = 8, batch: int = 4, seq: int = 16, vocab: int = VOCAB, seed: int = 0):
    """Deterministic random token batches as a list of dicts with ``input_ids`` and ``labels``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class TokenDataset(torch.utils.data.Dataset):
    """Rows of random token ids for HF Trainer (``input_ids`` and ``labels``)."""

    def __init__(self, n: int = 32, seq: int = 16, vocab: int = VOCAB, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


class ImageDataset(torch.utils.data.Dataset):
    """16x16 RGB images with 3 labels, for the tiny ViT classifier."""

    def __init__(self, n: int = 16):
        gen = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(n, 3, 16, 16, generator=gen)
        self.labels = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def hf_lightning_module(model):
    """A LightningModule holding an HF (or PEFT) model as ``self.model``, trained on its own loss.

    Built on call: the adapters-library environment imports this file without Lightning installed.
    """
    import pytorch_lightning as pl

    class HFModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    return HFModule()
