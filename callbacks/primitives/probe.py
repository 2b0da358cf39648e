"""Probe batches: a small synthetic input built from a model's config, run without leaving a trace.

A probe compares a model's output across an operation (an adapter's init, a merge): the same batch goes
through the model before and after. :func:`build_probe_batch` draws the batch from its own generator (the
global RNG is never consumed); :func:`run_probe` runs it in eval mode under ``no_grad`` and restores RNG state
(torch CPU and CUDA, ``random``, numpy) and every module's train/eval flag afterwards, so gradients,
``requires_grad``, modes and random streams are exactly as they were.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from callbacks.primitives.naming import unwrap_model


class ProbeUnavailable(Exception):
    """No synthetic input can be built for this model (pass one explicitly)."""


def _floating_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.get_default_dtype()


def _device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def _first_embedding(model: nn.Module) -> nn.Embedding | None:
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module
    return None


def build_probe_batch(model: nn.Module, *, batch_size: int = 2, seq_len: int = 8, seed: int = 0) -> dict[str, Any]:
    """A small synthetic batch for ``model`` (wrappers allowed), on the model's device.

    HF models: ``input_ids`` (+ ``attention_mask``, and ``decoder_input_ids`` for encoder-decoders) drawn from
    the config's ``vocab_size``; ``pixel_values`` for vision models (``image_size``, else 64, and
    ``num_channels``); ``input_features`` / ``input_values`` for speech models.
    Models without a config: ``input_ids`` within the vocabulary of their first ``nn.Embedding``. Raises
    :class:`ProbeUnavailable` otherwise. Draws from a private generator: the global RNG is not consumed.
    """
    inner = unwrap_model(model)
    gen = torch.Generator().manual_seed(seed)
    device = _device(inner)
    config = getattr(inner, "config", None)
    main_input = getattr(inner, "main_input_name", "input_ids")

    if config is not None and main_input == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size, channels = getattr(vision, "image_size", None), getattr(vision, "num_channels", 3)
        # convolutional backbones (ResNet, RegNet, PoolFormer, ConvNeXt) take any size and name none
        size = CONV_IMAGE_SIZE if size is None else size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        pixels = torch.randn((batch_size, channels, *size), generator=gen)
        return {"pixel_values": pixels.to(device=device, dtype=_floating_dtype(inner))}
    if config is not None and main_input in ("input_features", "input_values"):
        return _speech_batch(inner, config, main_input, batch_size, gen, device)

    vocab = None
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text, "vocab_size", None)
        max_pos = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        if max_pos:
            seq_len = max(1, min(seq_len, int(max_pos)))
    if vocab is None:
        embedding = _first_embedding(inner)
        if embedding is None:
            raise ProbeUnavailable(f"{type(inner).__name__}: no config vocab_size, pixel input or nn.Embedding "
                                   "to draw a probe input from")
        vocab = embedding.num_embeddings
    if main_input not in ("input_ids", None) and config is not None:
        raise ProbeUnavailable(f"{type(inner).__name__}: main input {main_input!r} is not supported")
    ids = torch.randint(0, int(vocab), (batch_size, seq_len), generator=gen).to(device)
    batch: dict[str, Any] = {"input_ids": ids}
    if config is not None:
        batch["attention_mask"] = torch.ones_like(ids)
        if getattr(config, "is_encoder_decoder", False):
            batch["decoder_input_ids"] = ids.clone()
    return batch


#: image side for vision configs without ``image_size``: a multiple of every usual stride (32)
CONV_IMAGE_SIZE = 64


def _speech_batch(inner: nn.Module, config: Any, main_input: str, batch_size: int, gen: torch.Generator,
                  device: torch.device) -> dict[str, Any]:
    """Whisper-style ``input_features`` (``num_mel_bins`` x ``2 * max_source_positions``, the length its
    encoder requires) or wav2vec2-style raw ``input_values``; ``decoder_input_ids`` for encoder-decoders."""
    dtype = _floating_dtype(inner)
    if main_input == "input_features":
        mels, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
        if not mels or not positions:
            raise ProbeUnavailable(f"{type(inner).__name__}: input_features without num_mel_bins and "
                                   "max_source_positions in its config")
        batch: dict[str, Any] = {main_input: torch.randn((batch_size, int(mels), 2 * int(positions)),
                                                         generator=gen).to(device=device, dtype=dtype)}
    else:
        batch = {main_input: torch.randn((batch_size, SPEECH_SAMPLES), generator=gen).to(device=device,
                                                                                          dtype=dtype)}
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None) or 0
        batch["decoder_input_ids"] = torch.full((batch_size, 4), int(start), dtype=torch.long, device=device)
    return batch


#: raw audio samples for ``input_values`` models: enough for every stride of a tiny or full feature encoder
SPEECH_SAMPLES = 4000


def _set_training(module: nn.Module, training: bool) -> None:
    """``module.training = training``; through ``object.__setattr__`` when the class keeps nn.Module's own
    ``__setattr__`` (which ends there for a plain attribute, after microseconds of lookups: most of a probe on
    a model with thousands of modules)."""
    if type(module).__setattr__ is nn.Module.__setattr__:
        object.__setattr__(module, "training", training)
    else:
        module.training = training


@contextlib.contextmanager
def preserved_state(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """Put ``model`` in eval mode for the duration; restore RNG states and every module's mode afterwards.

    ``modules``: ``list(model.modules())`` when the caller already has it (walking a large model costs).
    """
    modes = [(module, module.training) for module in (model.modules() if modules is None else modules)]
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_rng = random.getstate()
    numpy = sys.modules.get("numpy")
    np_rng = numpy.random.get_state() if numpy is not None else None
    try:
        for module, training in modes:  # what model.eval() does, without the per-module train() call overhead
            if training:
                _set_training(module, False)
        yield
    finally:
        for module, training in modes:
            if module.training is not training:
                _set_training(module, training)
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(py_rng)
        if np_rng is not None:
            numpy.random.set_state(np_rng)


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a forward's output: ``logits`` of a ModelOutput, else the first tensor found."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        values = list(output.to_tuple()) if hasattr(output, "to_tuple") else []
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise ProbeUnavailable(f"the model's output ({type(output).__name__}) holds no tensor to compare")


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def run_probe(model: nn.Module, batch: Mapping[str, Any], *, modules: Sequence[nn.Module] | None = None
              ) -> torch.Tensor:
    """``model``'s main output on ``batch`` (detached), in eval mode under ``no_grad``, leaving no trace.

    Modes, RNG states, gradients and ``requires_grad`` are as before the call (see :func:`preserved_state`;
    ``modules``: ``list(model.modules())`` when the caller already has it).
    """
    kwargs = dict(batch)
    if "use_cache" not in kwargs and _accepts(model, "use_cache"):
        kwargs["use_cache"] = False  # no cache objects built or kept
    with preserved_state(model, modules), torch.no_grad():
        return output_tensor(model(**kwargs)).detach()


__all__ = ["ProbeUnavailable", "build_probe_batch", "output_tensor", "preserved_state", "run_probe"]
