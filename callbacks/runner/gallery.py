"""The models and faults the gallery recipes (``recipes/failures/``) name by import path.

A recipe names a model factory as ``model.factory: callbacks.runner.gallery:lingua_lm`` (its ``model.args``
are validated against the function's signature) and faults as
``faults: [{fault: callbacks.runner.gallery:ReinitAfterWrap}]`` (each fault's ``args`` are validated by its
pydantic ``Config``). Each fault reproduces what real user code did in a reported failure; the job runner calls
a fault's hooks from every trainer (HF, Lightning, accelerate), before the integrity checks run at the same
moment, so a check sees the fault's effect at that event.

Nothing here checks anything: these are the failures, not the detectors.
"""

from __future__ import annotations

import copy
import os
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from callbacks.primitives.collectives import distributed_rank
from callbacks.primitives.naming import unwrap_model


# -- models ---------------------------------------------------------------------------------------------------
class LinguaLM(nn.Module):
    """A Lingua-style causal LM written by hand; the head is tied by assignment (``output.weight = tok_embeddings
    .weight``), the pattern HF's ``tie_weights`` does not know about.

    ``forward(input_ids, labels=None)`` returns ``{"loss", "logits"}`` like an HF model, so every trainer runs it.
    """

    def __init__(self, vocab_size: int = 256, dim: int = 32, n_layers: int = 2, tie: bool = True,
                 embedding_max_norm: float | None = None):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab_size, dim, max_norm=embedding_max_norm)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        if tie:
            self.output.weight = self.tok_embeddings.weight

    def init_weights(self) -> None:
        """Lingua's explicit init (run after ``to_empty`` when the model was built on the meta device)."""
        dim = self.tok_embeddings.embedding_dim
        nn.init.trunc_normal_(self.tok_embeddings.weight, std=dim ** -0.5)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight is not self.tok_embeddings.weight:
                nn.init.trunc_normal_(module.weight, std=module.in_features ** -0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Logits (batch, seq, vocab) and, with ``labels``, the next-token cross-entropy."""
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = h + layer(h)
        logits = self.output(self.norm(h))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return out


def lingua_lm(vocab_size: int = 256, dim: int = 32, n_layers: int = 2, tie: bool = True, meta_init: bool = False,
              embedding_max_norm: float | None = None) -> LinguaLM:
    """A :class:`LinguaLM`; ``meta_init`` builds it on the meta device, then ``to_empty`` + ``init_weights``.

    That is Lingua's (and torchtitan's) fast-init pattern. ``to_empty`` gives every parameter name its own
    storage, so the hand-written tie silently stops being one: the head trains apart from the embedding.
    """
    if not meta_init:
        model = LinguaLM(vocab_size, dim, n_layers, tie, embedding_max_norm)
        model.init_weights()
        return model
    with torch.device("meta"):
        model = LinguaLM(vocab_size, dim, n_layers, tie, embedding_max_norm)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


# -- faults -----------------------------------------------------------------------------------------------------
class FaultConfig(BaseModel):
    """Arguments of a fault (``faults[i].args``); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Fault:
    """What user code did wrong in a reported failure, at the moment it did it.

    Subclasses set :attr:`Config` and override the hooks they need. ``setup`` runs once after the model (and
    adapter) are built and before the trainer starts; the step hooks run on every rank at the same moment as
    the checks' ``step`` events (gradients reduced / optimizer stepped), just before them.
    """

    Config: ClassVar[type[FaultConfig]] = FaultConfig

    def __init__(self, config: FaultConfig | None = None):
        self.config = config if config is not None else self.Config()

    def setup(self, model: nn.Module, output_dir: str) -> None:
        """Once, before training (``output_dir`` is the trainer's)."""

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Gradients are reduced; the optimizer has not stepped (``step`` is 1-based)."""

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """The optimizer stepped."""


class ReinitAfterWrap(Fault):
    """``model.init_weights()`` called on the base model after ``get_peft_model``.

    The base model's ``_init_weights`` treats LoRA's ``lora_B`` as any ``nn.Linear`` and draws it from N(0, 0.02):
    the adapter no longer starts as identity and the step-0 output is not the pretrained model's.
    """

    def setup(self, model: nn.Module, output_dir: str) -> None:
        """Re-run the base model's weight init over the wrapped modules."""
        base = unwrap_model(model)
        base.init_weights() if hasattr(base, "init_weights") else base.apply(base._init_weights)


class LegacyMamAdapterInit(Fault):
    """adapter-transformers' ``mam_adapter`` init, which assumes ``adapter_down[0]`` is the down projection.

    With ``ln_before=True`` that element is the LayerNorm: it gets the Linear's uniform init (weights around 0
    instead of 1), so every adapter input is scaled by noise. ``adapter_up`` is still zero, so the output is
    unchanged at step 0 and the run looks healthy; the damage shows once ``adapter_up`` starts learning.
    """

    def setup(self, model: nn.Module, output_dir: str) -> None:
        """Run the layout-assuming init over every bottleneck adapter of the ``adapters`` library."""
        import math

        from adapters.methods.modeling import Adapter

        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, Adapter):
                    first = module.adapter_down[0]
                    bound = 1 / math.sqrt(first.weight.shape[-1])  # kaiming_uniform_(a=sqrt(5)) of an nn.Linear
                    first.weight.uniform_(-bound, bound)
                    first.bias.zero_()
                    module.adapter_up.weight.zero_()
                    module.adapter_up.bias.zero_()


class RankGradientNoiseConfig(FaultConfig):
    """``rank``: the rank whose gradients change; ``from_step``: the first step it happens at."""

    rank: int = Field(1, ge=0)
    from_step: int = Field(1, ge=1)
    scale: float = Field(1.0e-3, gt=0)


class RankGradientNoise(Fault):
    """Gradient noise drawn from a per-rank generator and added *after* the all-reduce: only the noisy rank's
    gradients change, so replicas take different optimizer steps and drift apart silently."""

    Config = RankGradientNoiseConfig

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        """On ``rank``, add noise to every gradient."""
        rank = distributed_rank()
        if rank != self.config.rank or step < self.config.from_step:
            return
        gen = torch.Generator().manual_seed(1000 + rank * 7919 + step)
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    noise = torch.randn(param.grad.shape, generator=gen, dtype=param.grad.dtype)
                    param.grad.add_(noise.to(param.grad.device), alpha=self.config.scale)


class UntiedCheckpointConfig(FaultConfig):
    """``step``: the global step the written checkpoint claims; ``folder``: its name under ``output_dir``."""

    step: int = Field(2, ge=1)
    folder: str = "checkpoint-2"
    head_scale: float = 1.5
    batch_size: int = Field(8, ge=1)


class UntiedCheckpoint(Fault):
    """A checkpoint written by a run whose head was no longer tied (an ``assign=True`` load, a replaced head, a
    meta-device init), so ``lm_head.weight`` and the embedding differ on disk. The recipe resumes from it into a
    tied model: loading keeps only one of the two tensors, silently (transformers issue 45127's reload).

    Writes ``<output_dir>/<folder>/model.safetensors`` and ``trainer_state.json`` (HF's resume layout).
    """

    Config = UntiedCheckpointConfig

    def setup(self, model: nn.Module, output_dir: str) -> None:
        """Save the model's state with the head scaled apart from the embedding."""
        from safetensors.torch import save_file

        base = unwrap_model(model)
        head = base.get_output_embeddings().weight
        state: dict[str, torch.Tensor] = {}
        for name, tensor in base.state_dict().items():
            state[name] = tensor.detach().clone().contiguous()
        for name, tensor in base.named_parameters(remove_duplicate=False):
            if tensor is head and name != _first_name_of(base, head):
                state[name] = (tensor.detach() * self.config.head_scale).contiguous()
        folder = os.path.join(output_dir, self.config.folder)
        os.makedirs(folder, exist_ok=True)
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        if getattr(base, "config", None) is not None:
            config = copy.deepcopy(base.config)
            config.architectures = [type(base).__name__]
            config.save_pretrained(folder)
        from transformers import TrainerControl, TrainerState

        state = TrainerState(global_step=self.config.step, max_steps=self.config.step,
                             train_batch_size=self.config.batch_size,
                             stateful_callbacks={"TrainerControl": TrainerControl().state()})
        state.save_to_json(os.path.join(folder, "trainer_state.json"))


def _first_name_of(model: nn.Module, tensor: torch.Tensor) -> str:
    """The name ``named_parameters()`` keeps for a shared tensor (its first name)."""
    return next(n for n, p in model.named_parameters() if p is tensor)
